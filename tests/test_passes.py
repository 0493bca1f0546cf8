"""What a cell costs, counted at the model: PGD-k against a count made by hand, FGSM,
an attack that only queries, and EOT's passes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bench
from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.engine.passes import Passes, counting
from bench.registry import ATTACKS

THREAT = get_spec("digits").threat


def _run(model, attack: str, x, y, **params):
    cell = make_cell(attack, params, THREAT)
    config = cell.config
    if "early_stop" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, early_stop=False)
    with counting(model) as count:
        ATTACKS.get(attack).fn(model, x, y, config, generator=torch.Generator().manual_seed(0))
    return Passes.per_image(count, len(x))


def _standing(model, x, y, n):
    """n images the model gets right: at a tiny radius no step breaks them, so every image
    takes every pass (PGD judges its last iterate only on the images still standing)."""
    with torch.no_grad():
        right = (model(x).argmax(1) == y).nonzero().squeeze(1)[:n]
    return x[right], y[right]


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_pgd_k_costs_k_plus_one_forwards_and_k_backwards_per_image(natural_model, digits_test, steps):
    x, y = _standing(natural_model, *digits_test, 64)
    # k steps, each a forward and a backward pass; then the last iterate is judged: one forward.
    assert _run(natural_model, "pgd", x, y, steps=steps, eps=1e-4) == Passes(steps + 1, steps)


def test_restarts_multiply_the_passes(natural_model, digits_test):
    x, y = _standing(natural_model, *digits_test, 32)
    assert _run(natural_model, "pgd", x, y, steps=5, restarts=3, eps=1e-4) == Passes(3 * 6, 3 * 5)


def test_broken_images_skip_the_last_judgement(natural_model, digits_test):
    x, y = _standing(natural_model, *digits_test, 64)
    passes = _run(natural_model, "pgd", x, y, steps=10, eps=1.0)  # the whole box: every image breaks
    assert passes.backward == 10 and passes.forward == 10


def test_fgsm_is_one_gradient(natural_model, digits_test):
    x, y = digits_test
    passes = _run(natural_model, "fgsm", x[:32], y[:32])
    assert passes.backward == 1 and passes.forward >= 1


def test_a_query_attack_takes_no_backward_pass(natural_model, digits_test):
    x, y = digits_test
    passes = _run(natural_model, "square", x[:8], y[:8], queries=20)
    assert passes.backward == 0 and 1 < passes.forward <= 21


MATRIX = """
[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 5
early_stop = false

[[cell]]
attack = "square"
queries = 10
subset = 36
"""


def test_every_stored_cell_counts_its_passes_and_the_worst_case_adds_them(natural_model, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    rows = bench.evaluate(natural_model, name="mlp", matrix=str(matrix), results=tmp_path / "r", device="cpu")
    by = {r["attack"].split(":")[0]: r for r in rows if r["threat"] == THREAT.name}
    assert by["pgd"]["backward_passes"] == 5 and 5 < by["pgd"]["forward_passes"] <= 6
    assert by["fgsm"]["backward_passes"] == 1
    assert by["square"]["backward_passes"] == 0 and by["square"]["n"] == 36
    worst = by["worst_case"]
    # Per test image: the subset cell's passes count in proportion to its 36 images of 360.
    cells = [by[a] for a in ("fgsm", "pgd", "square")]
    assert worst["forward_passes"] == pytest.approx(sum(c["forward_passes"] * c["n"] for c in cells) / 360)
    assert worst["backward_passes"] == pytest.approx(1 + 5)
