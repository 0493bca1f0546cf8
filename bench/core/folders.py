"""Datasets read from folders of image files: ImageNet in the ILSVRC-2012 layout that
torchvision's ImageFolder reads (`train/` and `val/` under the data root, one folder per
class, named by its synset; a class's index is its folder's rank among the sorted names
of `train/`, as ImageFolder gives it).

The evaluation set is a fixed, seeded subset of `val/` (5,000 images by default, as
RobustBench judges ImageNet), decoded with the standard evaluation transform (resize the
shorter side to 256, center crop 224) and held as uint8, 150 KB an image; the float32 the
attacks read is made from it when a command loads the set. Its image ids (paths relative
to the data root) are the record of which images a number is about.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError

EVAL_SIZE = 5000
"""Images of `val/` in the evaluation set (RobustBench's ImageNet protocol)."""
EVAL_SEED = 0
RESIZE, CROP = 256, 224
"""The standard evaluation transform: shorter side to 256, center crop 224."""
EXTENSIONS = (".jpeg", ".jpg", ".png")
LOADER_WORKERS_FROM = 256
"""Decode in worker processes from this many images on (fewer decode faster in-process)."""


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one split, uint8, with their labels and ids."""

    images: torch.Tensor
    """(N, 3, CROP, CROP) uint8."""
    labels: torch.Tensor
    """(N,) int64 class indices."""
    ids: tuple[str, ...]
    """Each image's path relative to the data root (`val/n01440764/ILSVRC2012_val_00000293.JPEG`)."""

    @property
    def digest(self) -> str:
        """sha256 of the ids in order: two runs on the same digest judged the same images."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()


def class_names(root: Path, hint: str) -> list[str]:
    """The class folders of `train/` (or of `val/` where there is no `train/`), sorted."""
    for split in ("train", "val"):
        folder = root / split
        if folder.is_dir():
            names = sorted(d.name for d in folder.iterdir() if d.is_dir())
            if names:
                return names
    raise BenchError(f"dataset 'imagenet': {str(root)!r} has no train/ or val/ class folders; {hint}")


def image_files(root: Path, split: str, classes: Sequence[str], hint: str) -> list[tuple[str, int]]:
    """(path relative to root, class index) of every image of a split, in sorted order."""
    folder = root / split
    if not folder.is_dir():
        raise BenchError(f"dataset 'imagenet': {str(folder)!r} is missing; {hint}")
    index = {name: i for i, name in enumerate(classes)}
    found = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in index:
            raise BenchError(
                f"dataset 'imagenet': {str(d)!r} is a class folder that train/ lacks; "
                f"every class of {split}/ must be one of train/'s ({hint})"
            )
        found += [
            (f"{split}/{d.name}/{f.name}", index[d.name]) for f in sorted(d.iterdir()) if f.suffix.lower() in EXTENSIONS
        ]
    if not found:
        raise BenchError(f"dataset 'imagenet': {str(folder)!r} holds no images (.JPEG, .jpg, .png); {hint}")
    return found


def evaluation_files(files: list[tuple[str, int]], size: int = EVAL_SIZE) -> list[tuple[str, int]]:
    """The fixed, seeded subset of `size` files (all of them where fewer), in sorted order."""
    if len(files) <= size:
        return files
    pick = np.sort(np.random.default_rng(EVAL_SEED).permutation(len(files))[:size])
    return [files[i] for i in pick]


class _Decoded(torch.utils.data.Dataset):
    """Each file decoded and transformed for evaluation, uint8 (3, CROP, CROP)."""

    def __init__(self, root: Path, files: list[tuple[str, int]]):
        self.root, self.files = root, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode(self.root / self.files[i][0])


def decode(path: Path) -> torch.Tensor:
    """One image file as uint8 (3, CROP, CROP): RGB, shorter side resized to RESIZE
    (bilinear, antialiased), center crop CROP; torchvision's reference evaluation transform."""
    # PIL and torchvision's transforms serve the folder datasets alone: imported when one loads.
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BenchError(f"dataset 'imagenet': {str(path)!r} is not a readable image ({exc})") from exc
    out = TF.center_crop(TF.resize(TF.pil_to_tensor(rgb), RESIZE, antialias=True), [CROP, CROP])
    return out.contiguous()


def decode_all(root: Path, files: list[tuple[str, int]], workers: int | None = None) -> ImageSet:
    """Decode `files` into an ImageSet, in worker processes where there are many."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(files) >= LOADER_WORKERS_FROM else 0
    loader = torch.utils.data.DataLoader(_Decoded(root, files), batch_size=64, num_workers=workers)
    images = torch.cat(list(loader)) if files else torch.zeros(0, 3, CROP, CROP, dtype=torch.uint8)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images, labels, tuple(name for name, _ in files))
