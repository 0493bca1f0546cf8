"""Reading the published dataset files a user places under --data-root, safely.

Every reader checks what it read against its format (shape, type, label range) and
raises one BenchError naming the file and what was expected, so a corrupt, truncated or
wrongly shaped file never reaches training as a crash (or as a silently wrong number).

CIFAR's python format is a pickle by definition, and a pickle can name any callable to
run while loading. It is read with a restricted unpickler that admits only what that
format holds (numpy arrays and their dtype), so a crafted file is an error and never
runs code. The exact-match allow-list is written here because the standard library
offers no safe pickle loader, and the format needs only these few names.
"""

from __future__ import annotations

import _codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError

# (module, name) pairs a CIFAR batch may refer to: the array reconstructors numpy has
# written under its old (numpy.core, 1.x) and new (numpy._core, 2.x) module names, the
# array and dtype classes, and `_codecs.encode`, which pickles of protocol 2 written
# by Python 3 use to rebuild bytes.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("", "ndarray"),
    ("numpy", "dtype"): ("", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


def _numpy_part(module: str, name: str) -> Any:
    """The installed numpy's own object, whichever numpy wrote the file."""
    if module == "_codecs":
        return _codecs.encode
    if not module:
        return getattr(np, name)
    for prefix in ("numpy._core", "numpy.core"):  # numpy 2 first: 1.x lacks _core
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {module}.{name}")


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referred to something its format never holds."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise ForbiddenGlobal(f"it refers to {module}.{name}, which a CIFAR batch never holds")
        return _numpy_part(*target)


def read_cifar_batch(
    path: Path, label_key: str, num_classes: int, dataset: str, hint: str
) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 3, 32, 32), y int64 (N,)) from one CIFAR python batch file."""
    expected = (
        f"expected a pickled dict with 'data' (a uint8 array of N rows of 3072 pixels) "
        f"and '{label_key}' (N labels in [0, {num_classes})); {hint}"
    )
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as exc:
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} is refused: {exc}; {expected}") from exc
    except OSError as exc:
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} cannot be read ({exc.strerror}); {hint}") from exc
    except Exception as exc:  # a pickle parser fed arbitrary bytes can raise almost anything
        raise BenchError(
            f"dataset {dataset!r}: {str(path)!r} is corrupt or truncated ({type(exc).__name__}); {expected}"
        ) from exc
    problem = _cifar_problem(batch, label_key, num_classes)
    if problem:
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} is not a CIFAR batch ({problem}); {expected}")
    x = np.asarray(batch["data"]).astype(np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(batch[label_key], dtype=np.int64)


def _cifar_problem(batch: Any, label_key: str, num_classes: int) -> str:
    """What is wrong with an unpickled batch, or '' when it holds what the format says."""
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        return f"no 'data' and '{label_key}' entries"
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui" or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        return f"'data' is {shape} of {getattr(data, 'dtype', '?')}"
    if len(data) == 0 or data.min() < 0 or data.max() > 255:
        return "'data' is empty or has values outside 0..255"
    labels = batch[label_key]
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return f"'{label_key}' is not a list of integers"
    if len(labels) != len(data):
        return f"{len(data)} images but {len(labels)} labels"
    if not all(0 <= v < num_classes for v in labels):
        return f"a label outside [0, {num_classes})"
    return ""


def read_idx(path: Path, ndim: int, dataset: str, hint: str):
    """One MNIST idx file (through torchvision's reader) as a uint8 tensor of `ndim` dims."""
    what = "images (N x 28 x 28)" if ndim == 3 else "labels (N)"
    if not path.is_file():
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} is missing; {hint}")
    # torchvision (over a second to import) serves MNIST's files alone: imported when they load.
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        t = read_sn3_pascalvincent_tensor(str(path), strict=False)
    except OSError as exc:
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} cannot be read ({exc.strerror}); {hint}") from exc
    except Exception as exc:  # the reader asserts, indexes and views raw bytes: anything goes
        raise BenchError(
            f"dataset {dataset!r}: {str(path)!r} is corrupt or truncated "
            f"({type(exc).__name__}); expected an idx file of uint8 {what}; {hint}"
        ) from exc

    if t.dtype != torch.uint8 or t.dim() != ndim or len(t) == 0:
        raise BenchError(
            f"dataset {dataset!r}: {str(path)!r} holds {t.dtype} of shape {tuple(t.shape)}; "
            f"expected an idx file of uint8 {what}; {hint}"
        )
    return t


def read_svhn_mat(path: Path, dataset: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """(X uint8 (32, 32, 3, N), y (N,)) from one SVHN .mat file, labels 1..10."""
    expected = "expected a MATLAB file with X (32 x 32 x 3 x N, uint8) and y (N labels in 1..10)"
    # scipy.io serves SVHN's files alone: imported when they load.
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except OSError as exc:
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} cannot be read ({exc}); {hint}") from exc
    except Exception as exc:  # scipy's MAT parser fed arbitrary bytes can raise almost anything
        raise BenchError(
            f"dataset {dataset!r}: {str(path)!r} is corrupt or truncated ({type(exc).__name__}); {expected}; {hint}"
        ) from exc
    x, y = mat.get("X"), mat.get("y")
    ok = (
        isinstance(x, np.ndarray)
        and isinstance(y, np.ndarray)
        and x.ndim == 4
        and x.shape[:3] == (32, 32, 3)
        and x.shape[3] > 0
        and x.dtype.kind in "ui"
        and y.dtype.kind in "ui"
        and y.size == x.shape[3]
    )
    if ok:
        y = y.astype(np.int64).ravel()
        ok = bool((y >= 1).all() and (y <= 10).all() and x.min() >= 0 and x.max() <= 255)
    if not ok:
        shapes = f"X {getattr(x, 'shape', None)}, y {getattr(y, 'shape', None)}"
        raise BenchError(f"dataset {dataset!r}: {str(path)!r} is not an SVHN file ({shapes}); {expected}; {hint}")
    return x.astype(np.uint8), y
