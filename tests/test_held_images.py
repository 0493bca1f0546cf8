"""Held images (bench.core.images): an evaluation set kept as uint8 and read as float32 a
batch at a time gives every cell the very bits the float32 tensor gives, and a plain cell
never asks it for more than one batch; the batch itself shrinks with the image, or is
what --batch-size says."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from cli_run import run_bench

from bench.core.cells import make_cell
from bench.core.data import get_spec, load_dataset
from bench.core.images import HeldImages, as_tensor
from bench.engine.cell import craft, run_cell
from bench.engine.verdicts import predict

THREAT = get_spec("digits").threat


class Watched(HeldImages):
    """Held images that remember the most rows one read asked for."""

    def __init__(self, pixels: torch.Tensor):
        super().__init__(pixels)
        self.most = 0

    def __getitem__(self, index):
        rows = super().__getitem__(index)
        self.most = max(self.most, len(rows))
        return rows


@pytest.fixture(scope="module")
def pixels():
    x, _ = load_dataset("digits", "test")
    return (x * 255).round().to(torch.uint8)


def test_reads_are_the_float32_of_those_rows(pixels):
    held = HeldImages(pixels)
    whole = pixels.float() / 255
    assert len(held) == len(pixels) and held.shape == pixels.shape
    for index in (slice(3, 40), slice(None), torch.tensor([5, 1, 300]), np.array([0, 359]), 7):
        assert torch.equal(held[index], whole[index])
    assert held[0:0].shape == (0, 1, 8, 8)
    assert torch.equal(as_tensor(held), whole)
    with pytest.raises(ValueError, match="uint8"):
        HeldImages(whole)


@pytest.mark.parametrize(
    "attack, values",
    [("fgsm", {}), ("pgd", {"steps": 10}), ("pgd", {"steps": 5, "loss": "cw", "restarts": 2})],
)
def test_a_plain_cell_on_held_images_gives_the_tensors_bits_one_batch_at_a_time(
    natural_model, digits_test, pixels, attack, values
):
    _, y = digits_test
    whole = pixels.float() / 255
    held = Watched(pixels)
    cell = make_cell(attack, values, THREAT)
    on_tensor = run_cell(natural_model, cell, whole, y, device="cpu", batch_size=64)
    on_held = run_cell(natural_model, cell, held, y, device="cpu", batch_size=64)
    assert held.most == 64  # the faithful check reads 8, each batch 64, the last 40
    assert on_held.correct_bits == on_tensor.correct_bits
    assert on_held.top5_bits == on_tensor.top5_bits
    assert on_held.clean_acc == on_tensor.clean_acc and on_held.robust_acc == on_tensor.robust_acc
    assert on_held.extra["logit_hist"] == on_tensor.extra["logit_hist"]
    assert on_held.forward_passes == on_tensor.forward_passes
    assert on_held.backward_passes == on_tensor.backward_passes
    # The breaks are kept batch by batch: the same images, the same inputs, and each one
    # misclassified where its clean image was not.
    assert torch.equal(on_held.breaks.indices, on_tensor.breaks.indices)
    assert torch.equal(on_held.breaks.inputs, on_tensor.breaks.inputs)
    assert len(on_held.breaks.indices) > 0
    at = on_held.breaks.indices
    logits = predict(natural_model, on_held.breaks.inputs, device="cpu", batch_size=64)
    assert bool((logits.argmax(1) != y[at]).all())
    assert bool((predict(natural_model, whole[at], device="cpu", batch_size=64).argmax(1) == y[at]).all())
    # craft, which returns the set whole, reads the held images batch by batch too.
    held.most = 0
    assert torch.equal(
        craft(natural_model, cell, held, y, device="cpu", batch_size=64),
        craft(natural_model, cell, whole, y, device="cpu", batch_size=64),
    )
    assert held.most == 64


def test_a_cell_that_reads_the_set_whole_takes_its_float32_copy(natural_model, digits_test, pixels):
    """A randomized model's votes judge x_adv whole: the cell asks the held set for its
    float32 once, and its bits are the tensor's."""
    _, y = digits_test
    whole = pixels.float() / 255
    voted = dataclasses.replace(make_cell("fgsm", {}, THREAT), votes=3)
    held = Watched(pixels)
    on_held = run_cell(natural_model, voted, held, y, device="cpu", batch_size=64)
    on_tensor = run_cell(natural_model, voted, whole, y, device="cpu", batch_size=64)
    assert held.most == len(pixels)
    assert on_held.correct_bits == on_tensor.correct_bits


def test_the_default_batch_shrinks_with_the_image_and_batch_size_sets_it(tmp_path):
    from bench.run.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws", device="cpu")
    assert [ws.batch_size(d) for d in ("digits", "mnist5k", "cifar10", "imagenet")] == [1024, 1024, 1024, 20]
    assert ws.batch_size() == 1024
    results = tmp_path / "res"
    done = run_bench(
        "run", "--defense", "natural", "--set", "epochs=1", "--matrix", "quick", "--batch-size", "100",
        "--results", str(results),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    assert {r["label"] for r in rows if r["attack"] != "worst_case"} >= {"fgsm", "pgd10", "pgd20"}
    from bench.store.db import Store

    (ck,) = Store.for_results(results).checkpoints()
    # The admission checks ran at the attacks' batches: 100, and the 60 left of 360.
    assert ck.admission["config"]["batch_sizes"] == [60, 100]
