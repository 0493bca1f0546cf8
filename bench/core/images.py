"""An evaluation set held as uint8 and read as float32 a slice at a time.

ImageNet's 5,000-image evaluation set is 0.75 GB as uint8 and 3 GB as float32. Every
attack, verdict and check reads the set in batches (`x[i : i + batch]`, `x[indices]`), so
the set that `load_dataset` gives for a folder dataset is this: indexing it returns the
float32 in [0, 1] of those rows alone, exactly what `pixels.float() / 255` would hold
there, and the float32 of the whole set is never made on the paths that stream
(bench.engine.cell, bench.engine.verdicts).

A caller that wants the whole set as one tensor asks for it with `x[:]`: that is a whole
float32 copy, made on purpose where a path needs one (a randomized model's votes, a
verifier's rounds), never behind the caller's back.

Crafted sets are read the same way from disk (`StoredImages`: a float32 tensor of a
safetensors file, read a slice at a time), and a selection of rows of either is kept as
one (`Picked`), so a transfer's examples and breaks are never whole in memory either.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import safe_open


class HeldImages:
    """uint8 pixels (N, C, H, W) read as float32 in [0, 1] by indexing, like a tensor."""

    def __init__(self, pixels: torch.Tensor):
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(f"held images are uint8 (N, C, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def __getitem__(self, index) -> torch.Tensor:
        rows = self.pixels[index]
        # Dividing in float32 gives the same bits as the whole set converted at once.
        return rows.float().div_(255.0)

    def __repr__(self) -> str:
        return f"HeldImages({len(self)} uint8 images of {tuple(self.shape[1:])})"


class StoredImages:
    """A float32 tensor (N, C, H, W) of a safetensors file, read by indexing, like a tensor.

    The file is opened for each read and closed after it: safetensors maps the whole file,
    and pages of a mapping kept open would stay resident as it is read through."""

    READ_ROWS = 64
    """Rows of an index that is not a slice read at a time (ImageNet's: 39 MB)."""

    def __init__(self, path, name: str):
        self.path, self.name = str(path), name
        with safe_open(self.path, "pt") as f:
            if name not in f.keys():
                raise ValueError(f"{self.path} holds no tensor {name!r}")
            self._shape = torch.Size(f.get_slice(name).get_shape())
            self.metadata: dict[str, str] = f.metadata() or {}
            """The file's metadata (what wrote it, and what that cost)."""

    def __len__(self) -> int:
        return self._shape[0]

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            with safe_open(self.path, "pt") as f:
                rows = f.get_slice(self.name)[start : max(start, stop)]
            return rows[::step] if step != 1 else rows
        wanted_rows = np.asarray(index)
        if wanted_rows.dtype == bool:  # a mask, as a tensor takes one
            wanted_rows = wanted_rows.nonzero()[0]
        at = torch.as_tensor(wanted_rows, dtype=torch.long)
        at = torch.where(at < 0, at + len(self), at)
        if at.numel() and (int(at.min()) < 0 or int(at.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} stored images")
        if at.dim() == 0:
            return self[int(at) : int(at) + 1][0]
        out = torch.empty((len(at), *self._shape[1:]), dtype=torch.float32)
        order = at.argsort()
        for j in range(0, len(at), self.READ_ROWS):
            place = order[j : j + self.READ_ROWS]
            wanted = at[place]
            low, high = int(wanted[0]), int(wanted[-1]) + 1
            if high - low <= 2 * self.READ_ROWS:  # near rows: one read of their span
                out[place] = self[low:high][wanted - low]
            else:  # rows far apart: one read each, never the span between them
                for k, i in zip(place.tolist(), wanted.tolist(), strict=True):
                    out[k] = self[i : i + 1][0]
        return out

    def __repr__(self) -> str:
        return f"StoredImages({len(self)} float32 images of {tuple(self.shape[1:])} in {self.path})"


class Picked:
    """Rows `at` of a set, in that order, read only when indexed: a subset kept as lazily
    as the set it is taken from."""

    def __init__(self, images: Images, at: torch.Tensor):
        self.images, self.at = images, at.to(torch.long)

    def __len__(self) -> int:
        return len(self.at)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.at), *self.images.shape[1:]))

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[self.at[index]]


Images = torch.Tensor | HeldImages | StoredImages | Picked
"""An evaluation set: a tensor, or images held or stored and read like one."""


def as_tensor(x: Images) -> torch.Tensor:
    """x as one float32 tensor: itself, or a held set's whole float32 copy."""
    return x if isinstance(x, torch.Tensor) else x[:]
