"""Admission checks that a custom backward cannot game, and the attack through the forward.

A custom autograd.Function may lie only where the gradient check does not look: at the
attacks' batch size rather than the check's 16 images, or away from the clean test
images. Admission checks at every batch size the attacks use and inside the threat balls
(bench.science.admission). A lying backward around a robust network fools PGD, and a
surrogate distilled from a robust network's answers falls short of its truth; so the
model's gradient cells are crafted again through BPDA's mirror, each Function
differentiated through its own forward (bench.engine.mirror), and judged on the model.
Each cheat's worst case must land within ten points of PGD with the honest network's
gradient (tests/cheats.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cheats import BY_NAME, ReversedOver16, quantize
from conftest import train_digits
from custom_backward import Reversed, Wrapped

import bench
from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.presets import default_preset
from bench.engine.mirror import ThroughForward, custom_functions
from bench.science.adaptive import BPDA, adapt_cells
from bench.science.admission import AdmissionConfig, admit, attack_batches
from bench.science.admitted import gradient_disagrees

THREAT = get_spec("digits").threat
MATRIX = """
[[cell]]
attack = "pgd"
steps = 20
"""
ATTACK_BATCH = (360,)
"""The batch the bench attacks digits in: its whole test set (360 images, under 1,024)."""


class ReversedOffData(torch.autograd.Function):
    """The identity forward; the backward is honest on batches of digits' own pixel values
    (multiples of 1/16, i.e. clean test images) and reversed anywhere else: on every point
    an attack moves to."""

    @staticmethod
    def forward(ctx, x):
        ctx.clean = bool(torch.equal(x * 16, (x * 16).round()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad if ctx.clean else -grad


@pytest.fixture(scope="module")
def robust_net():
    # Fifteen epochs of PGD-AT: robust enough that a surrogate distilled from its answers
    # falls short (measured on this net: distill 49-51% against a truth of 35%), where the
    # eight-epoch net of tests/test_cheaters.py leaves distill within two points.
    return train_digits("pgd_at", epochs=15, **default_preset("pgd_at", "digits").config)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("gaming-results")


def test_attack_batches_are_the_full_batch_and_the_remainder():
    assert attack_batches(360, 1024) == (360,)
    assert attack_batches(10_000, 4096) == (1808, 4096)
    assert attack_batches(8192, 4096) == (4096,)


def test_the_forward_view_follows_the_forward_and_keeps_the_outputs(natural_model, digits_test):
    x, y = digits_test
    # Off the data's grid of 1/16 (as every point an attack moves to), in a batch over 16.
    x = (x[:64] + 0.01 * torch.rand(x[:64].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    x = x.requires_grad_(True)

    def grad(model):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y[:64], reduction="sum"), x)
        return g

    honest = grad(natural_model)
    for fn in (Reversed, ReversedOver16, ReversedOffData):
        cheat = Wrapped(natural_model, fn).eval()
        assert torch.equal(grad(cheat), -honest)  # the lie: a batch of 64 off the grid
        view = ThroughForward(cheat)
        assert torch.equal(grad(view), honest)  # the forward's own gradient
        with torch.no_grad():
            assert torch.equal(view(x), cheat(x))
        assert custom_functions(cheat, x) == [f"{fn.__module__}.{fn.__qualname__}"]
    assert custom_functions(natural_model, x) == []
    # A forward that leaves the graph (BPDA computes its exact step under no_grad) keeps
    # the author's backward: the identity here, not the rounding's zero.
    bpda = torch.nn.Sequential(BPDA(quantize), natural_model)
    assert torch.equal(grad(ThroughForward(bpda)), grad(bpda))
    assert torch.equal(grad(bpda), honest_at(natural_model, quantize(x.detach()), y[:64]))
    # Function.apply is torch's own again outside the view.
    assert torch.equal(grad(Wrapped(natural_model, Reversed)), -honest)


def honest_at(model, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g


@pytest.mark.parametrize(
    "fn, where",
    [(ReversedOver16, {"batch": 360}), (ReversedOffData, {"points": "ball"})],
    ids=["over_16", "off_the_data"],
)
def test_admission_catches_a_backward_that_lies_where_the_old_check_did_not_look(natural_model, digits_test, fn, where):
    x, y = digits_test
    cfg = AdmissionConfig(batch_sizes=ATTACK_BATCH)
    assert gradient_disagrees(admit(natural_model, x, y, THREAT.eps, cfg)) is None
    found = gradient_disagrees(admit(Wrapped(natural_model, fn).eval(), x, y, THREAT.eps, cfg))
    assert found is not None and found["median_cosine"] < -0.9, found
    assert {k: found[k] for k in where} == where
    assert found["custom_functions"] == [f"{fn.__module__}.{fn.__qualname__}"]
    # On the 16 clean images the check used to look at, the backward is honest.
    small = admit(Wrapped(natural_model, fn).eval(), x, y, THREAT.eps)["gradient_check"]["probes"]
    (clean16,) = [p for p in small if p["batch"] == 16 and p["points"] == "clean"]
    assert clean16["median_cosine"] > 0.9


def test_only_a_lying_custom_function_gets_the_forward_view():
    honest = {
        "randomized": {"share_prediction_changed": 0.0, "max_relative_diff": 0.0, "max_output_diff": 0.0},
        "zero_gradient": {"count": 0, "n": 360, "share": 0.0},
        "gradient_check": {"median_cosine": 0.99, "sign_agreement": 0.98, "custom_functions": []},
    }
    lying = {**honest, "gradient_check": {"median_cosine": -1.0, "sign_agreement": 0.0, "custom_functions": []}}
    lying_function = {**honest, "gradient_check": {**lying["gradient_check"], "custom_functions": ["m.Reversed"]}}
    cells = [
        make_cell(a, p, THREAT)
        for a, p in (("pgd", {"steps": 20}), ("fgsm", {}), ("square", {}), ("pgd", {"steps": 20, "norm": "l2"}))
    ]
    assert adapt_cells(cells, honest, THREAT) == cells
    assert [c.view for c in adapt_cells(cells, lying, THREAT)] == [None] * 5  # the witness only
    adapted = adapt_cells(cells, lying_function, THREAT)
    through = [c for c in adapted if c.view is not None]
    # The gradient cells of the threat model, again through the forward; not Square, not
    # the witness (they read only answers), not the L2 cell of another threat.
    assert [c.key for c in through] == [cells[0].key + ",grad=forward", cells[1].key + ",grad=forward"]
    assert all(c.view is ThroughForward and c.attack in ("pgd", "fgsm") for c in through)
    assert len(adapt_cells(adapted, lying_function, THREAT)) == len(adapted)  # idempotent


def _judge(model, name, results, tmp_path):
    matrix = tmp_path / "gaming.toml"
    matrix.write_text(MATRIX)
    rows = bench.evaluate(model, name=name, matrix=str(matrix), results=results, device="cpu")
    (wc,) = [r for r in rows if r["attack"] == "worst_case"]
    return wc, {r["attack"]: r["robust_acc"] for r in rows if r["attack"] != "worst_case"}


def test_a_reversed_backward_around_a_robust_net_lands_near_its_truth(
    natural_model, robust_net, digits_test, results, tmp_path
):
    x, y = digits_test
    cheat = BY_NAME["reversed_robust"]
    model = cheat.build(natural_model, robust_net).eval()
    wc, cells = _judge(model, "gaming_reversed_robust", results, tmp_path)
    truth = cheat.truth(model, natural_model, x, y)
    assert "gradient_disagrees" in wc["flags"]
    (plain,) = [v for k, v in cells.items() if k.startswith("pgd:") and not k.endswith(",grad=forward")]
    (forward,) = [v for k, v in cells.items() if k.endswith(",grad=forward")]
    assert plain > truth + 0.3  # what the lie buys against PGD
    assert abs(forward - truth) <= 0.05, (forward, truth)
    assert abs(wc["robust_acc"] - truth) <= 0.10, (wc["robust_acc"], truth)


def test_a_backward_lying_over_16_is_caught_and_lands_near_its_truth(
    natural_model, robust_net, digits_test, results, tmp_path
):
    x, y = digits_test
    cheat = BY_NAME["reversed_over_16"]
    model = cheat.build(natural_model, robust_net).eval()
    wc, cells = _judge(model, "gaming_reversed_over_16", results, tmp_path)
    truth = cheat.truth(model, natural_model, x, y)
    assert "gradient_disagrees" in wc["flags"]
    assert any(k.startswith("distill:") for k in cells)  # the witness
    assert max(cells.values()) > 0.8  # PGD at the attack's batch follows the lie
    assert abs(wc["robust_acc"] - truth) <= 0.10, (wc["robust_acc"], truth)
