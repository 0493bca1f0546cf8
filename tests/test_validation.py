"""Validation at the edge: every matrix field, --set value, preset value and data file is
checked before anything trains or runs, and the error names the file, cell and field."""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from bench.core.data import get_spec, load_dataset
from bench.core.matrix import BUILTIN, load_matrix, matrix_cells
from bench.core.presets import all_presets
from bench.engine.train import TrainConfig
from bench.errors import BenchError
from bench.registry import ATTACKS, DEFENSES, build_config
from bench.run.driver import plan_run
from bench.run.recipe import TrainRequest, resolve

DIGITS = get_spec("digits")


def _matrix(tmp_path: Path, body: str) -> str:
    path = tmp_path / "m.toml"
    path.write_text('[[cell]]\nattack = "fgsm"\n\n[[cell]]\n' + body)
    return str(path)


@pytest.mark.parametrize(
    "body, message",
    [
        ('attack = "pgd"\neps = nan', "cell 2 (pgd): eps must be a finite number, got nan"),
        ('attack = "pgd"\neps = inf', "cell 2 (pgd): eps must be a finite number, got inf"),
        ('attack = "pgd"\neps = 7.0', "cell 2 (pgd): eps must be in (0, 1] for L-inf"),
        ('attack = "pgd"\neps = -0.1', "cell 2 (pgd): eps must be in (0, 1] for L-inf"),
        ('attack = "pgd"\nsteps = [5, 10]\neps = [0.1, 0]', "cell 2 (pgd): eps must be in (0, 1] for L-inf, got 0.0"),
        (
            'attack = "pgd"\nnorm = "l2"\neps = -1.0',
            "cell 2 (pgd): eps (an L2 radius) must be a finite number above zero",
        ),
        ('attack = "pgd"\nnorm = "l3"', "cell 2 (pgd): norm must be one of linf, l2, got 'l3'"),
        ('attack = "pgd"\nloss = "hinge"', "cell 2 (pgd): loss must be one of xent, cw, got 'hinge'"),
        ('attack = "pgd"\nsteps = 0', "cell 2 (pgd): steps must be an integer of at least 1, got 0"),
        ('attack = "pgd"\nrestarts = -2', "cell 2 (pgd): restarts must be an integer of at least 1"),
        ('attack = "pgd"\nstep_size = -0.01', "cell 2 (pgd): step_size must be a finite number above zero"),
        ('attack = "pgd"\nsteps = 2.5', "cell 2 (pgd): steps must be int, got 2.5"),
        ('attack = "pgd"\nsteps = []', "cell 2 (pgd): steps = [] gives no cells"),
        ('attack = "fgsm"\neps = 1.5', "cell 2 (fgsm): eps must be in (0, 1] for L-inf"),
        ('attack = "spsa"\niterations = 0', "cell 2 (spsa): iterations must be an integer of at least 1"),
        ('attack = "spsa"\nsamples = 0', "cell 2 (spsa): samples must be an integer of at least 2"),
        ('attack = "spsa"\neps = 2.0', "cell 2 (spsa): eps must be in (0, 1] for L-inf"),
        ('attack = "autoattack"\nnorm = "l2"\neps = nan', "cell 2 (autoattack): eps must be a finite number"),
        ('attack = "unbounded"\nmultiple = -1.0', "cell 2 (unbounded): multiple must be a finite number above zero"),
        ('attack = "pgd"\nsubset = 361', "cell 2 (pgd): subset must be at most the test set's 360 images, got 361"),
        ('attack = "pgd"\nsubset = -1', "cell 2 (pgd): subset must be a non-negative integer"),
        ('attack = "pgdd"', "cell 2: unknown attack 'pgdd'; did you mean pgd"),
    ],
)
def test_bad_matrix_cells_name_the_file_the_cell_and_the_field(tmp_path, body, message):
    path = _matrix(tmp_path, body)
    with pytest.raises(BenchError) as exc:
        plan_run(TrainRequest("natural"), load_matrix(path), None)
    assert str(exc.value).startswith(f"matrix {path!r}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_subset_within_the_test_set_is_accepted(tmp_path):
    plan = plan_run(TrainRequest("natural"), load_matrix(_matrix(tmp_path, 'attack = "pgd"\nsubset = 360')), None)
    assert [c.subset for c in plan.cells] == [0, 360]


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=nan", "lr must be a finite number, got nan"),
        ("lr=-1", "lr must be a finite number above zero"),
        ("epochs=0", "epochs must be an integer of at least 1, got 0"),
        ("batch_size=true", "batch_size must be int, got True"),
        ("momentum=1.5", "momentum must be in [0, 1), got 1.5"),
        ("weight_decay=-inf", "weight_decay must be a finite number, got -inf"),
        ("milestones=[10, inf]", "milestones[1] must be int, got inf"),
        ("milestones=[0]", "each milestone must be an integer of at least 1"),
        ('optimizer="adamw"', "optimizer must be one of sgd, adam, rmsprop, got 'adamw'; did you mean adam?"),
        ("beta=nan", "beta must be a finite number, got nan"),
        ("sigma=inf", "sigma must be a finite number, got inf"),
    ],
)
def test_bad_set_values_are_refused_by_name(override, message):
    with pytest.raises(BenchError) as exc:
        resolve(TrainRequest("logit_squeeze", overrides=(override,)))
    assert message in str(exc.value) and "--set" in str(exc.value)


def test_an_architecture_the_images_do_not_fit_is_refused_before_training():
    with pytest.raises(BenchError, match="architecture 'madry_mnist' does not fit the 1x8x8 images of digits"):
        resolve(TrainRequest("natural", arch="madry_mnist"))


@pytest.mark.parametrize("seed", [-1, 2**31, 10**30])
def test_seeds_outside_the_stored_range_are_refused(seed):
    with pytest.raises(BenchError, match="--seed must be an integer in"):
        resolve(TrainRequest("natural", seed=seed))


def test_every_builtin_preset_and_matrix_is_valid():
    # Each preset's values go through the same checks as --set (config, then training).
    for name, preset in all_presets().items():
        entry = DEFENSES.get(preset.defense)
        entry.make_config(preset.config, what=f"preset {name!r}")
        build_config(TrainConfig, preset.train, what=f"preset {name!r}")
        assert all(0 <= v <= 1 for v in preset.paper.values())
    for matrix in BUILTIN:
        for dataset in ("digits", "mnist", "cifar10", "svhn"):
            assert matrix_cells(matrix, get_spec(dataset).threat, test_size=10_000)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_config_refuses_non_finite_values_in_every_float_field(bad):
    configs = [(f"attack {n}", ATTACKS.get(n).config) for n in ATTACKS.names()]
    configs += [(f"defense {n}", DEFENSES.get(n).config) for n in DEFENSES.names()]
    configs += [("training", TrainConfig)]
    checked = 0
    for what, cls in configs:
        for field in dataclasses.fields(cls):
            if "float" in str(field.type):
                with pytest.raises(BenchError, match=f"{what}: {field.name} must be a finite number"):
                    build_config(cls, {field.name: bad}, what=what)
                checked += 1
    assert checked >= 20  # every registry contributes: this is no vacuous loop


@pytest.mark.parametrize(
    "text, message",
    [
        ('defense = "logit_squeeze"\ndataset = "digits"\nconfig = 5', "config must be a table"),
        ('defense = "logit_squeeze"\ndataset = "digits"\n[paper]\nclean = "high"', "paper.clean must be an accuracy"),
        ('defense = "logit_squeeze"\ndataset = "digits"\n[paper]\nclean = 1.5', "paper.clean must be an accuracy"),
        ('defense = 3\ndataset = "digits"', "defense must be a string"),
        ('defense = "logit_squeeze"\ndataset = "digits"\npaper_eps = 0', "paper_eps must be an L-inf radius"),
        ('defense = "logit_squeeze"\ndataset = "digits"\npaper_eps = "16/255"', "paper_eps must be an L-inf radius"),
        ('defense = "logit_squeeze"\ndataset = "digits"\n[config]\nbeta = nan', "beta must be a finite number"),
        (
            'defense = "logit_squeeze"\ndataset = "digits"\n[train]\nepochs = 0',
            "epochs must be an integer of at least 1",
        ),
    ],
)
def test_bad_preset_files_are_refused(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(BenchError) as exc:
        resolve(TrainRequest("logit_squeeze", preset=str(path)))
    assert message in str(exc.value) and "mine" in str(exc.value)


# --- data files ------------------------------------------------------------------------
class _Planted:
    """What a crafted CIFAR batch would run while being unpickled: create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_folder(tmp_path: Path, batch: object) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    _cifar_folder(tmp_path, {"data": _Planted(marker), "labels": [1]})
    with pytest.raises(BenchError, match=r"test_batch' is refused: it refers to posix.system"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    assert not marker.exists()
    # Sanity check of the crafted file itself: the standard unpickler does run it.
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    pixels = np.random.default_rng(protocol).integers(0, 256, (2, 3072)).astype(np.uint8)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": pixels, "fine_labels": [99, 0], "coarse_labels": [1, 2]}, f, protocol=protocol)
    x, y = load_dataset("cifar100", "test", root=str(tmp_path))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [99, 0]
    assert x.flatten(1).mul(255).round().byte().numpy().tolist() == pixels.tolist()


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "2 images but 1 labels"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, "'data' is (2, 100)"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}, "a label outside [0, 10)"),
        ({"pixels": np.zeros((1, 3072), np.uint8)}, "no 'data' and 'labels' entries"),
        ([1, 2, 3], "no 'data' and 'labels' entries"),
    ],
)
def test_wrongly_shaped_cifar_batches_are_refused(tmp_path, batch, message):
    _cifar_folder(tmp_path, batch)
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "test", root=str(tmp_path))
    assert "test_batch' is not a CIFAR batch" in str(exc.value) and message in str(exc.value)


def test_truncated_cifar_batch_is_refused(tmp_path):
    folder = _cifar_folder(tmp_path, {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]})
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(BenchError, match="test_batch' is corrupt or truncated"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def _idx(path: Path, dims: tuple[int, ...], payload: int, magic: int) -> None:
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + bytes(payload))


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (((4, 28, 28), 4 * 784 // 2), ((4,), 4), "t10k-images-idx3-ubyte' is corrupt or truncated"),
        (((4, 28, 28), 4 * 784), ((4,), 2), "t10k-labels-idx1-ubyte' is corrupt or truncated"),
        (((4, 20, 20), 4 * 400), ((4,), 4), "expected N x 28 x 28 images"),
        (((4, 28, 28), 4 * 784), ((3,), 3), "expected N x 28 x 28 images and N labels"),
    ],
)
def test_truncated_or_misshapen_mnist_files_are_refused(tmp_path, images, labels, message):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "t10k-images-idx3-ubyte", *images, magic=0x0803)
    _idx(raw / "t10k-labels-idx1-ubyte", *labels, magic=0x0801)
    with pytest.raises(BenchError, match="dataset 'mnist'") as exc:
        load_dataset("mnist", "test", root=str(tmp_path))
    assert message in str(exc.value)


def test_corrupt_or_misshapen_svhn_files_are_refused(tmp_path):
    from scipy.io import savemat

    path = tmp_path / "test_32x32.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(40))
    with pytest.raises(BenchError, match=r"test_32x32\.mat' is corrupt or truncated"):
        load_dataset("svhn", "test", root=str(tmp_path))
    savemat(path, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.array([[1], [2]])})
    with pytest.raises(BenchError, match=r"is not an SVHN file \(X \(28, 28, 3, 2\)"):
        load_dataset("svhn", "test", root=str(tmp_path))
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[11], [2]])})
    with pytest.raises(BenchError, match=r"y \(N labels in 1\.\.10\)"):
        load_dataset("svhn", "test", root=str(tmp_path))
