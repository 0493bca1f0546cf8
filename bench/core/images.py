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
"""

from __future__ import annotations

import torch


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


Images = torch.Tensor | HeldImages
"""An evaluation set: a tensor, or held images read like one."""


def as_tensor(x: Images) -> torch.Tensor:
    """x as one float32 tensor: itself, or a held set's whole float32 copy."""
    return x if isinstance(x, torch.Tensor) else x[:]
