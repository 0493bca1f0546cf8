"""A zoo of models that cheat gradient attacks, and two honest controls.

Each cheater wraps a trained digits model (tests/cheats.py: rounded inputs, saturated
logits, input noise, rounding under noise, custom backwards that pass the gradient
straight through or reverse it, a staircase activation; benchmarks/cheating_zoo.py runs
these and the two randomized ones, random resizing and stochastic activation pruning). Each must raise a masking flag, and its worst case must land
within ten points of an attack written for its cheat, computed there independently of
the bench on the same images. The honest controls (a natural and an adversarially
trained model) must raise no masking flag.
"""

from __future__ import annotations

import pytest
import torch
from cheats import BY_NAME, Noisy, Quantized, Saturated, margin, pgd, quantize, robust, xent
from conftest import train_digits
from custom_backward import Reversed, StraightThrough, Wrapped

import bench
from bench.core.data import get_spec
from bench.core.presets import default_preset
from bench.engine.verdicts import EOT, majority_correct
from bench.science.adaptive import BPDA
from bench.science.admission import admit
from bench.science.flags import MASKING, compute_flags
from bench.store.db import Checkpoint

THREAT = get_spec("digits").threat
MATRIX = """
[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 20
loss = ["xent", "cw"]

[[cell]]
attack = "square"
queries = 1000
"""


@pytest.fixture(scope="module")
def adv_trained():
    return train_digits("pgd_at", epochs=8, **default_preset("pgd_at", "digits").config)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "zoo.toml"
    path.write_text(MATRIX)
    return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-results")


def judge(model, name, matrix, results):
    rows = bench.evaluate(model, name=name, matrix=matrix, results=results, device="cpu")
    *_, wc = [r for r in rows if r["attack"] == "worst_case"]  # its own radius's, last
    return wc, rows


def masking(wc) -> set[str]:
    return set(wc["flags"]) & set(MASKING)


def test_bpda_forward_is_exact_and_backward_follows_the_approximation():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = BPDA(quantize)(x)
    assert torch.equal(out, quantize(x.detach()))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity backward
    x.grad = None
    out = BPDA(quantize, lambda t: 2 * t)(x)
    assert torch.equal(out, quantize(x.detach()))
    (out * torch.arange(4.0).view(4, 1, 1, 1)).sum().backward()
    assert torch.equal(x.grad, 2 * torch.arange(4.0).view(4, 1, 1, 1).expand_as(x))
    assert torch.equal(BPDA(quantize)(x.detach()), quantize(x.detach()))  # no graph: plain step


def test_quantized_input_is_caught_and_judged_like_bpda(natural_model, digits_test, matrix, results):
    x, y = digits_test
    cheat = Quantized(natural_model).eval()
    wc, rows = judge(cheat, "zoo_quantized", matrix, results)
    assert {"zero_gradients", "square_stronger_than_pgd"} <= masking(wc)
    pgd20 = next(r for r in rows if r["attack"].startswith("pgd:") and "loss=xent" in r["attack"])
    assert pgd20["robust_acc"] > 0.8  # what the cheat buys against plain PGD
    adaptive = robust(cheat, pgd(Quantized(natural_model, bpda=True), x, y, xent), x, y)
    assert abs(wc["robust_acc"] - adaptive) <= 0.10, (wc["robust_acc"], adaptive)


def test_saturated_logits_are_caught_and_judged_like_a_margin_attack(natural_model, digits_test, matrix, results):
    x, y = digits_test
    cheat = Saturated(natural_model).eval()
    wc, _ = judge(cheat, "zoo_saturated", matrix, results)
    assert "zero_gradients" in masking(wc)
    adaptive = robust(cheat, pgd(cheat, x, y, margin), x, y)
    assert abs(wc["robust_acc"] - adaptive) <= 0.10, (wc["robust_acc"], adaptive)


RANDOM_MATRIX = """
[[cell]]
attack = "pgd"
steps = 20

# Ten cells that barely move the input: on a deterministic model each reads the clean
# accuracy and so does their AND; on a noisy one, judged by one pass each, their AND
# would fall with every cell.
[[cell]]
attack = "fgsm"
eps = [1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 6e-6, 7e-6, 8e-6, 9e-6, 1e-5]
"""


def test_randomized_model_is_judged_by_eot_and_majority(adv_trained, digits_test, results, tmp_path):
    from bench.store.db import Store

    x, y = digits_test
    matrix = tmp_path / "random.toml"
    matrix.write_text(RANDOM_MATRIX)
    torch.manual_seed(0)
    cheat = Noisy(adv_trained, sigma=0.2).eval()
    wc, rows = judge(cheat, "zoo_noisy", str(matrix), results)
    assert "randomized_forward" in masking(wc)
    cells = [r for r in rows if r["attack"] != "worst_case"]
    assert len(cells) == 11 and all(r["attack"].endswith(",eot=8,rounds=3,votes=21") for r in cells)
    # Not saved by its noise: within ten points of EOT PGD written here (the loss gradient
    # averaged over 8 passes), judged by a majority of 21 passes.

    def eot_xent(model, xa, ya):
        return sum(xent(model, xa, ya) for _ in range(8)) / 8

    x_adv = pgd(cheat, x, y, eot_xent, steps=20)
    clean = majority_correct(cheat, x, y, 21, device="cpu", batch_size=1024)
    adaptive = float((majority_correct(cheat, x_adv, y, 21, device="cpu", batch_size=1024) & clean).float().mean())
    assert abs(wc["robust_acc"] - adaptive) <= 0.10, (wc["robust_acc"], adaptive)
    # Not broken by the AND over noisy cells: the ten near-identity cells together keep
    # most of the clean accuracy, where the AND of ten single passes loses much more.
    store = Store.for_results(results)
    (ck,) = [c for c in store.checkpoints() if c.defense == "zoo_noisy"]
    tiny = [e.correct() for e in store.evaluations([ck.id]) if e.attack == "fgsm"]
    together = float(torch.as_tensor(sum(1 - t for t in tiny) == 0).float().mean())
    with torch.no_grad():
        single = torch.stack([cheat(x).argmax(1) == y for _ in range(10)]).all(0).float().mean()
    majority = float(clean.float().mean())
    # Samples the model itself gets right about half the time are coin flips under any
    # rule; the majority rule must lose at most half of what ten one-pass verdicts lose.
    assert majority - together <= 0.5 * (majority - float(single)), (together, majority, float(single))


@pytest.mark.parametrize("which", ["natural", "adversarially_trained"])
def test_honest_controls_raise_no_masking_flag(natural_model, adv_trained, matrix, results, which):
    model = natural_model if which == "natural" else adv_trained
    wc, _ = judge(model, f"zoo_{which}", matrix, results)
    assert masking(wc) == set(), wc["flags"]
    assert 0 <= wc["robust_acc"] < wc["clean_acc"]


def test_eot_view_averages_passes():
    class Count(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x.flatten(1) * self.calls

    m = Count()
    out = EOT(m, 4)(torch.ones(2, 1, 1, 3))
    assert m.calls == 4 and torch.equal(out, torch.full((2, 3), 2.5))


def test_randomized_models_get_eot_for_gradients_and_autoattack_rand():
    from bench.core.cells import make_cell
    from bench.science.adaptive import adapt_cells

    noisy = {"randomized": {"share_prediction_changed": 0.2, "max_relative_diff": 0.3, "max_output_diff": 1.0}}
    steady = {"randomized": {"share_prediction_changed": 0.0, "max_relative_diff": 1e-7, "max_output_diff": 1e-6}}
    cells = [make_cell(a, p, THREAT) for a, p in (("pgd", {"steps": 20}), ("square", {}), ("autoattack", {}))]
    assert adapt_cells(cells, steady) == cells  # a GPU kernel's rounding is not randomness
    pgd20, square, aa = adapt_cells(cells, noisy)
    assert (pgd20.eot, pgd20.votes, pgd20.rounds) == (8, 21, 3) and pgd20.key == cells[
        0
    ].key + ",eot=8,rounds=3,votes=21"
    assert (square.eot, square.votes) == (1, 21) and square.key == cells[1].key + ",rounds=3,votes=21"
    assert aa.config.version == "rand" and aa.eot == 1
    assert aa.key == "autoattack:eps=0.2,norm=linf,version=rand,rounds=3,votes=21"


def test_a_model_whose_gradients_say_nothing_gets_the_witness():
    from bench.core.cells import make_cell
    from bench.science.adaptive import adapt_cells

    steady = {"randomized": {"share_prediction_changed": 0.0, "max_relative_diff": 0.0, "max_output_diff": 0.0}}
    honest = {
        **steady,
        "zero_gradient": {"count": 0, "n": 500, "share": 0.0},
        "gradient_check": {"median_cosine": 0.99, "sign_agreement": 0.98},
    }
    zero = {**honest, "zero_gradient": {"count": 3, "n": 500, "share": 0.006}}
    lying = {**honest, "gradient_check": {"median_cosine": 0.03, "sign_agreement": 0.5}}
    noisy = {**zero, "randomized": {"share_prediction_changed": 0.2, "max_relative_diff": 0.3, "max_output_diff": 1}}
    cells = [make_cell("pgd", {"steps": 20}, THREAT)]
    assert adapt_cells(cells, honest, THREAT) == cells
    for admission in (zero, lying):
        (_, witness) = adapt_cells(cells, admission, THREAT)
        assert witness.attack == "distill" and witness.threat == THREAT.name and witness.config.eps == THREAT.eps
    # Under noise it reads the model's answers as they come (a majority of passes), no EOT.
    (_, witness) = adapt_cells(cells, noisy, THREAT)
    assert (witness.eot, witness.votes, witness.rounds) == (1, 21, 3)
    # A matrix that already has the witness gets it once.
    assert len(adapt_cells([*cells, make_cell("distill", {}, THREAT)], zero, THREAT)) == 2


def test_randomized_cells_are_reproducible(natural_model, digits_test):
    import dataclasses

    from bench.core.cells import make_cell
    from bench.engine.cell import run_cell

    x, y = digits_test
    cell = make_cell("pgd", {"steps": 5}, THREAT)
    cell = dataclasses.replace(cell, key=cell.key + ",eot=2,rounds=2,votes=5", eot=2, votes=5, rounds=2)
    noisy = Noisy(natural_model, sigma=0.2).eval()
    first, second = (run_cell(noisy, cell, x[:64], y[:64], device="cpu", batch_size=1024) for _ in range(2))
    assert first.correct_bits == second.correct_bits and first.clean_acc == second.clean_acc
    assert 0 < first.robust_acc < first.clean_acc


@pytest.mark.parametrize("fn", [StraightThrough, Reversed], ids=["straight_through", "reversed"])
def test_a_backward_that_disagrees_with_the_forward_is_flagged(natural_model, digits_test, fn):
    x, y = digits_test

    def flags(model):
        ck = Checkpoint(id=1, threat=THREAT.name, meta={"admission": admit(model, x, y, THREAT.eps)})
        return {f["name"]: f["numbers"] for f in compute_flags(ck, [], [])}

    honest = flags(natural_model)
    assert "gradient_disagrees" not in honest
    found = flags(Wrapped(natural_model, fn).eval())["gradient_disagrees"]
    assert found["median_cosine"] < 0.5 and found["sign_agreement"] < 0.7
    assert "gradient_disagrees" in MASKING


WIDER = ["round_noisy", "straight_through", "reversed", "staircase"]
"""The cheats whose gradients say nothing or lie; the two randomized ones of tests/cheats.py
(resize_pad, sap) meet the EOT and majority machinery `noisy` tests here, and are held to
their truth by benchmarks/cheating_zoo.py, whose table the README quotes."""
WIDER_MATRIX = """
[[cell]]
attack = "pgd"
steps = 20

[[cell]]
attack = "square"
queries = 1000
"""
"""PGD-20 and Square only (the README's zoo runs them on `full`): each cheat's EOT and
three rounds per cell make every cell count."""


@pytest.mark.parametrize("name", WIDER)
def test_the_wider_zoo_is_caught_and_lands_near_its_truth(natural_model, digits_test, results, tmp_path, name):
    x, y = digits_test
    cheat = BY_NAME[name]
    torch.manual_seed(0)
    model = cheat.build(natural_model, None).eval()
    matrix = tmp_path / "wider.toml"
    matrix.write_text(WIDER_MATRIX)
    wc, rows = judge(model, f"zoo_{name}", str(matrix), results)
    assert masking(wc), wc["flags"]
    truth = cheat.truth(model, natural_model, x, y)
    assert abs(wc["robust_acc"] - truth) <= 0.10, (wc["robust_acc"], truth)
    # The cells on the model's own gradient (not those crafted through its forward).
    attacks = {r["attack"].split(":")[0]: r["robust_acc"] for r in rows if not r["attack"].endswith(",grad=forward")}
    if name in ("round_noisy", "reversed", "staircase"):
        # Gradients that say nothing: PGD is fooled, the witness that needs none is added.
        assert attacks["pgd"] > 0.8 and "distill" in attacks
    if name in ("round_noisy", "staircase"):
        assert {"distilled_stronger_than_pgd"} <= masking(wc)
    if name == "reversed":
        # PGD through the custom Function's own forward (bench.engine.mirror) is a white-box
        # cell too, and breaks what the witness breaks: the disagreeing gradient is the flag.
        assert "gradient_disagrees" in masking(wc)
        assert min(r["robust_acc"] for r in rows if r["attack"].endswith(",grad=forward")) <= truth + 0.05
