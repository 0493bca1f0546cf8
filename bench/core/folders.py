"""Datasets read from folders of image files: ImageNet in the ILSVRC-2012 layout that
torchvision's ImageFolder reads (`train/` and `val/` under the data root, one folder per
class, named by its synset; a class's index is its folder's rank among the sorted names
of `train/`, as ImageFolder gives it).

The evaluation set is a fixed, seeded subset of `val/` (5,000 images by default, as
RobustBench judges ImageNet), decoded with the standard evaluation transform (resize the
shorter side to 256, center crop 224) and held as uint8, 150 KB an image; the float32 the
attacks read is made from it when a command loads the set. Its image ids (paths relative
to the data root) are the record of which images a number is about.

Training streams `train/` from disk instead (StreamedFolder): worker processes decode the
JPEG files of each minibatch as the loop asks for it, with the standard training
transform (random resized crop to 224, scale 0.08 to 1, and a horizontal flip), so
ImageNet's 1.28 million images never sit in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
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
MAX_LOADER_WORKERS = 8
"""Decoding processes at most (an evaluation set's, or a training's per data-parallel worker)."""


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
    # torchvision's transforms serve the folder datasets alone: imported when one loads.
    from torchvision.transforms.v2 import functional as TF

    out = TF.center_crop(TF.resize(TF.pil_to_tensor(_open_rgb(path)), RESIZE, antialias=True), [CROP, CROP])
    return out.contiguous()


def loader_workers(images: int) -> int:
    """DataLoader worker processes for decoding `images` files: none for a few (decoding
    in-process is faster than starting processes), else up to MAX_LOADER_WORKERS of the
    cores this process may use."""
    if images < LOADER_WORKERS_FROM:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_LOADER_WORKERS, cores)


def decode_all(root: Path, files: list[tuple[str, int]], workers: int | None = None) -> ImageSet:
    """Decode `files` into an ImageSet, in worker processes where there are many."""
    workers = loader_workers(len(files)) if workers is None else workers
    loader = torch.utils.data.DataLoader(_Decoded(root, files), batch_size=64, num_workers=workers)
    # Filled in place: a list of batches and their concatenation held the set twice.
    images = torch.empty(len(files), 3, CROP, CROP, dtype=torch.uint8)
    done = 0
    for batch in loader:
        images[done : done + len(batch)] = batch
        done += len(batch)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images, labels, tuple(name for name, _ in files))


def _open_rgb(path: Path):
    # PIL serves the folder datasets alone: imported when one loads.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BenchError(f"dataset 'imagenet': {str(path)!r} is not a readable image ({exc})") from exc


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: the same whichever process
    decodes it and in whatever order, so a training's images do not depend on how many
    decoding processes or data-parallel workers it runs on."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def augmented(path: Path, seed: int) -> torch.Tensor:
    """One training image as uint8 (3, CROP, CROP): torchvision's RandomResizedCrop (scale
    0.08 to 1, aspect 3/4 to 4/3, bilinear, antialiased) and RandomHorizontalFlip, the
    reference ImageNet training transform, drawing from `seed` alone."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    image = _open_rgb(path)
    # torchvision's transforms draw from torch's global CPU generator: seeded per image, and
    # put back after, so the process's own draws (a loss's noise) are untouched where the
    # loop's process decodes. The generator itself, not torch.manual_seed, which also seeds
    # every accelerator and costs 0.08 ms an image; and not fork_rng (0.2 ms). They run on
    # the PIL image, as torchvision's reference pipeline does: PIL's resize is faster than
    # resizing the decoded tensor (benchmarks/imagenet_io.py).
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        image = v2.RandomHorizontalFlip()(v2.RandomResizedCrop(CROP, antialias=True)(image))
    finally:
        generator.set_state(state)
    return TF.pil_to_tensor(image).contiguous()


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, root: Path, files: Sequence[tuple[str, int]], seed: int, epoch: int):
        self.root, self.files, self.seed, self.epoch = root, files, seed, epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        name, label = self.files[i]
        return augmented(self.root / name, image_seed(self.seed, self.epoch, i)), label


@dataclass(frozen=True)
class StreamedFolder:
    """The training images of a folder dataset, decoded and augmented per minibatch in
    DataLoader worker processes (bench.core.trainsets.TrainSet). Batches cross from the
    workers as uint8, a quarter of float32's bytes, and become float32 on the device."""

    root: Path
    files: tuple[tuple[str, int], ...]
    seed: int
    workers: int | None = None
    """Decoding processes; None: up to MAX_LOADER_WORKERS of the machine's cores, none for a
    folder under LOADER_WORKERS_FROM images."""
    augments = True

    def __len__(self) -> int:
        return len(self.files)

    def to(self, device: torch.device | str) -> StreamedFolder:
        return self  # each batch moves to the device as it comes

    def batches(
        self, indices: Sequence[torch.Tensor], epoch: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = loader_workers(len(self.files)) if self.workers is None else self.workers
        loader = torch.utils.data.DataLoader(
            _Augmented(self.root, self.files, self.seed, epoch),
            batch_sampler=[idx.tolist() for idx in indices],
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        for images, labels in loader:
            yield images.to(device, non_blocking=True).float().div_(255.0), labels.to(device)
