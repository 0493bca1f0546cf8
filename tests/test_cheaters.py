"""A zoo of models that cheat gradient attacks, and two honest controls.

Each cheater wraps a trained digits model: its input rounded to four grey levels (zero
gradients), its logits multiplied a thousandfold (a saturated softmax), or noise added
to its input at every pass (randomness). Each must raise a masking flag, and its worst
case must land within ten points of an adaptive attack computed here, independently of
the bench, on the same images: PGD through a BPDA straight-through estimator, PGD on
the margin loss, and EOT PGD averaging the loss gradient over passes. The honest
controls (a natural and an adversarially trained model) must raise no masking flag.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bench
from bench.science.adaptive import BPDA
from bench.engine.verdicts import EOT, majority_correct
from bench.core.data import get_spec
from bench.science.admission import admit
from bench.science.flags import MASKING, compute_flags
from bench.store.db import Checkpoint
from bench.core.presets import default_preset
from conftest import train_digits
from custom_backward import Reversed, StraightThrough, Wrapped

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


def quantize(x):
    return torch.round(x * 3) / 3


class Quantized(torch.nn.Module):
    """Input rounded to 4 grey levels: exact forward, zero gradient everywhere."""

    def __init__(self, net, bpda: bool = False):
        super().__init__()
        self.net = net
        self.step = BPDA(quantize) if bpda else quantize

    def forward(self, x):
        return self.net(self.step(x))


class Saturated(torch.nn.Module):
    """Logits times 1000: the same predictions, a softmax saturated to exactly 0 and 1."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1000.0


class Noisy(torch.nn.Module):
    """Gaussian noise on the input at every forward pass."""

    def __init__(self, net, sigma: float):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


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
    (wc,) = [r for r in rows if r["attack"] == "worst_case"]
    return wc, rows


def pgd(model, x, y, loss_fn, steps=50, eps=THREAT.eps, step=THREAT.eps / 8, seed=0):
    """Plain L-inf PGD with a uniform start; returns the last iterate (independent of the bench)."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(model, x_adv, y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def margin(model, x, y):
    z = model(x)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return (other - z.gather(1, y[:, None]).squeeze(1)).sum()


def xent(model, x, y):
    return F.cross_entropy(model(x), y, reduction="sum")


def robust(model, x_adv, x, y) -> float:
    with torch.no_grad():
        return float(((model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)).float().mean())


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
    wc, rows = judge(cheat, "zoo_saturated", matrix, results)
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
    from bench.science.adaptive import adapt_cells
    from bench.core.matrix import make_cell

    noisy = {"randomized": {"share_prediction_changed": 0.2, "max_relative_diff": 0.3, "max_output_diff": 1.0}}
    steady = {"randomized": {"share_prediction_changed": 0.0, "max_relative_diff": 1e-7, "max_output_diff": 1e-6}}
    cells = [make_cell(a, p, THREAT) for a, p in (("pgd", {"steps": 20}), ("square", {}), ("autoattack", {}))]
    assert adapt_cells(cells, steady) == cells  # a GPU kernel's rounding is not randomness
    pgd20, square, aa = adapt_cells(cells, noisy)
    assert (pgd20.eot, pgd20.votes, pgd20.rounds) == (8, 21, 3) and pgd20.key == cells[0].key + ",eot=8,rounds=3,votes=21"
    assert (square.eot, square.votes) == (1, 21) and square.key == cells[1].key + ",rounds=3,votes=21"
    assert aa.config.version == "rand" and aa.eot == 1
    assert aa.key == "autoattack:eps=0.2,norm=linf,version=rand,rounds=3,votes=21"


def test_randomized_cells_are_reproducible(natural_model, digits_test):
    import dataclasses

    from bench.engine.evaluate import evaluate
    from bench.core.matrix import make_cell

    x, y = digits_test
    cell = make_cell("pgd", {"steps": 5}, THREAT)
    cell = dataclasses.replace(cell, key=cell.key + ",eot=2,rounds=2,votes=5", eot=2, votes=5, rounds=2)
    noisy = Noisy(natural_model, sigma=0.2).eval()
    first, second = (evaluate(noisy, cell, x[:64], y[:64], device="cpu", batch_size=1024) for _ in range(2))
    assert first["correct_bits"] == second["correct_bits"] and first["clean_acc"] == second["clean_acc"]
    assert 0 < first["robust_acc"] < first["clean_acc"]


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
