"""The truth holds for the model as it runs: fp32 rounding is inside every robust and
certified verdict, the graph is held to the model (hooks, overridden layers), the bracket
withholds its figures when a verifier and an attack (or two verifiers) contradict each
other, and a non-finite adversarial batch fails its cell."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from test_truth import N, _store  # the stored checkpoint the bracket tests share
from torch import nn

from attacks.certify import Certify
from attacks.verify import Verify
from bench import api
from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.models import Normalize, build_model
from bench.engine.budget import BudgetError, check_budget
from bench.plugin import Crafted, register_attack
from bench.registry import ATTACKS
from bench.reporting.results import result_rows
from bench.store.bits import pack_bits
from bench.store.bracket import bracket
from bench.verify import SearchConfig, Unsupported, certify, to_graph, verify_images
from bench.verify.bounds import box, crown_bounds

THREAT = get_spec("digits").threat


def _two_pixel() -> nn.Module:
    """Two pixels -> identity -> ReLU -> logits near 60 whose float64 margin (class 1 over
    class 0) is 0.3 * ulp(50) - ulp(10) / 2 ~ 5.7e-7 at its least over [0.4, 0.6]^2: z_0 =
    50 h1 + 50 h2 + 10 and z_1 = (50 + ulp) h1 + 50 h2 + (10 - ulp(10) / 2). fp32 rounds
    each logit by up to half an ulp of 60 (1.9e-6), so it often gets the order wrong."""
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    w = float(np.nextafter(np.float32(50), np.float32(100)))
    b = float(np.nextafter(np.float32(10), np.float32(0)))
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[50.0, 50.0], [w, 50.0]]))
        last.bias.copy_(torch.tensor([10.0, b]))
    return nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten(), first, nn.ReLU(), last).eval()


def _fp32_grid(lo: float, hi: float, n: int) -> torch.Tensor:
    a = torch.linspace(lo, hi, n)
    return torch.cartesian_prod(a, a).view(-1, 1, 1, 2)


def test_fp32_rounding_is_inside_robust_and_certified():
    model, eps, y = _two_pixel(), 0.1, torch.tensor([1])
    g = to_graph(model, (1, 1, 2))
    pts = _fp32_grid(0.4, 0.6, 121)
    z = g.forward(pts)
    assert 0 < float((z[:, 1] - z[:, 0]).min()) < 1e-6  # robust for the float64 copy ...
    with torch.no_grad():
        wrong = model(pts).argmax(1) != 1
    assert 1000 < int(wrong.sum()) < len(pts) - 1000  # ... but fp32 misclassifies many points of the box
    # A clean image (the grid point nearest the centre) the fp32 model gets right: the box
    # around it lies in [0.4, 0.6]^2, the margin's least is some 1e-6.
    right = pts[~wrong]
    x = right[(right - 0.5).abs().flatten(1).sum(1).argmin()][None]
    assert float((x - 0.5).abs().max()) < 0.01
    bits, margin = certify(g, x, y, eps)
    assert 0 < float(margin[0]) < 1e-6  # the float64 bound is right about the float64 copy
    assert not bool(bits[0])
    for search in (SearchConfig(), SearchConfig(steps=0, restarts=1)):
        (v,) = verify_images(g, model, x, y, eps, search=search)
        assert v.status != "robust"
        if v.status == "not_robust":
            with torch.no_grad():
                assert int(model(v.x_adv[None]).argmax(1)) != 1
            assert float((v.x_adv - x[0]).abs().max()) <= eps
    info = ATTACKS.get("certify").fn(model, x, y, Certify(eps=eps)).verdicts
    assert not bool(info.certified[0])
    info = ATTACKS.get("certify").fn(model, x, y, Certify(eps=eps, method="ibp")).verdicts
    assert not bool(info.certified[0])


def test_the_rounding_bound_holds_on_digits_mlp_and_is_small(digits_test):
    # |fp32 logits - exact logits| <= fp32_error at sampled points of a box, and the bound
    # stays far below a margin that matters (a worst case: ~1.5e-4 here, where the errors
    # seen are ~6e-8).
    from bench.verify.rounding import fp32_error

    torch.manual_seed(0)
    model = build_model("digits_mlp", get_spec("digits")).eval()
    g = to_graph(model)
    x = digits_test[0][:16]
    lo, hi = box(x, 0.1)
    err = fp32_error(g, lo, hi, crown_bounds(g, lo, hi))
    assert err.shape == (16, 10) and bool((err > 0).all()) and float(err.max()) < 1e-3
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pt = (lo + (hi - lo) * torch.rand(lo.shape, generator=gen, dtype=torch.float64)).float()
        pt = pt.view_as(x)
        with torch.no_grad():
            diff = (model(pt).double() - g.forward(pt)).abs()
        assert bool((diff <= err).all())
        point = pt.double().flatten(1)
        assert bool((diff <= fp32_error(g, point, point)).all())


# Three ways to make the model compute something its traced graph does not: each turns
# the logits around where both pixels are below 0.41, a corner of the box around
# (0.5, 0.5) at eps 0.1 that neither the clean image nor a gradient step goes near.


def _base() -> nn.Module:
    """margin of class 0 = 1 - 0.1 (x1 + x2) > 0 on [0, 1]^2: robust everywhere."""
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[0.1, 0.1], [0.2, 0.2]]))
        last.bias.copy_(torch.tensor([1.0, 0.0]))
    return nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten(), first, nn.ReLU(), last).eval()


def _corner(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(1) < 0.41).all(1)


class Sneaky(Normalize):
    """A Normalize whose forward sends the low corner far away."""

    def forward(self, x):
        return torch.where(_corner(x).view(-1, 1, 1, 1), 100.0 * x, super().forward(x))


def _last_layer_hook(model):
    def hook(module, inputs, out):
        return out + 10.0 * _corner(inputs[0])[:, None] * torch.tensor([-1.0, 1.0])

    return model[-1].register_forward_hook(hook)


def _root_pre_hook(model):
    def hook(module, args):
        return (torch.where(_corner(args[0]).view(-1, 1, 1, 1), 100.0 * args[0], args[0]),)

    return model.register_forward_pre_hook(hook)


def _global_hook(model):
    def hook(module, inputs, out):
        return out + 10.0 * _corner(inputs[0])[:, None] * torch.tensor([-1.0, 1.0]) if module is model[-1] else out

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _refused_or_never_robust(model, name: str):
    x, y, eps = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2), torch.tensor([0]), 0.1
    with torch.no_grad():
        assert int(model(x).argmax(1)) == 0  # the clean image is right ...
        assert int(model(torch.full_like(x, 0.405)).argmax(1)) == 1  # ... a corner of its box is not
    try:
        verdicts = ATTACKS.get("verify").fn(model, x, y, Verify(eps=eps, time_limit=5.0)).verdicts
        certified = ATTACKS.get("certify").fn(model, x, y, Certify(eps=eps)).verdicts
    except Unsupported as exc:
        assert "\n" not in str(exc) and str(exc).startswith("verify: "), name
        return
    assert verdicts.status[0] != "robust", name
    assert not bool(certified.certified[0]), name


@pytest.mark.parametrize(
    "attach", [_last_layer_hook, _root_pre_hook, _global_hook], ids=["forward hook", "root pre-hook", "global hook"]
)
def test_a_hooked_model_is_refused(attach):
    model = _base()
    handle = attach(model)
    try:
        with pytest.raises(Unsupported, match=r"^verify: [^\n]*hook[^\n]*$"):
            to_graph(model, (1, 1, 2))
        _refused_or_never_robust(model, attach.__name__)
    finally:
        handle.remove()
    to_graph(model, (1, 1, 2))  # the same model without its hook is taken


def test_a_normalize_subclass_is_not_read_as_normalize():
    model = _base()
    model[0] = Sneaky((0.0,), (1.0,))
    _refused_or_never_robust(model, "Normalize subclass")


class Shifty(nn.Module):
    """Reads as a Linear but shifts its output in one corner of the unit square only:
    caught by comparing the graph with the model on the box, not on random images."""

    def __init__(self):
        super().__init__()
        self.net = _base()

    def forward(self, x):
        return self.net(x)


def test_the_graph_is_held_to_the_model_on_the_box(monkeypatch):
    model = Shifty().eval()
    g = to_graph(model, (1, 1, 2))
    x, y = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2), torch.tensor([0])
    # The graph is right about the model everywhere; now make the model disagree in the box.
    monkeypatch.setattr(Shifty, "forward", lambda self, x: self.net(x) + 1e-3 * (x.flatten(1)[:, :1] > 0.45))
    with pytest.raises(Unsupported, match=r"^verify: [^\n]*differ[^\n]*$"):
        verify_images(g, model, x, y, 0.1)
    with pytest.raises(Unsupported, match=r"^verify: [^\n]*differ[^\n]*$"):
        certify(g, x, y, 0.1, model=model)


# A NaN in an adversarial batch: the harness fails the cell, whatever the plugin did.


def test_check_budget_refuses_non_finite_inputs():
    x = torch.rand(4, 1, 8, 8)
    cell = make_cell("fgsm", {}, THREAT)
    for bad in (float("nan"), float("inf")):
        x_adv = x.clone()
        x_adv[1, 0, 2, 3] = bad
        with pytest.raises(BudgetError, match=r"^attack 'fgsm' returned 1 non-finite value"):
            check_budget(cell, x, x_adv)


@dataclass(frozen=True)
class NanInTheBatch:
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""

    def with_threat(self, threat) -> NanInTheBatch:
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


@pytest.fixture
def nan_attack():
    """A plugin whose every adversarial image holds one NaN pixel, registered for the test."""
    name = "nan_in_the_batch"

    @register_attack(name, config=NanInTheBatch)
    def perturb(model, x, y, cfg, *, generator=None):
        """Returns its inputs with one NaN pixel each."""
        out = x.clone()
        out[:, 0, 0, 0] = float("nan")
        return Crafted(out)

    yield name
    ATTACKS.unregister(name)


def test_a_nan_batch_fails_its_cell(nan_attack, natural_model, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[[cell]]\nattack = "{nan_attack}"\n\n[[cell]]\nattack = "fgsm"\n')
    with pytest.raises(api.IncompleteEvaluation) as exc:
        api.evaluate(natural_model, name="nan", matrix=str(matrix), results=tmp_path / "results", device="cpu")
    assert list(exc.value.failures) == [f"{nan_attack}:eps=0.2"]


# The bracket.


def _add(store, ck, key, attack, correct, threat=THREAT.name, extra=None, proven=None):
    """One stored cell; a verifier's (`verify`, `certify`) with the images it proved."""
    store.add_evaluation(
        ck.id,
        cell_key=key,
        attack=attack,
        params={},
        threat=threat,
        clean_acc=0.9,
        robust_acc=float(np.mean(correct)),
        n=N,
        seconds=0.0,
        correct_bits=pack_bits(correct),
        indices=None,
        extra=extra or {},
        test_size=N,
        kind=attack if attack in ("verify", "certify") else "attack",
        proven_bits=None if proven is None else pack_bits(proven),
    )


def _bits(*ones: int) -> np.ndarray:
    out = np.zeros(N, dtype=bool)
    out[list(ones)] = True
    return out


def _contradicted(tmp_path):
    """certify proves images 0-2; verify breaks image 2 with a counterexample (and proves
    0, 1); the attacks leave 0-4 standing."""
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", _bits(0, 1, 2, 3, 4))
    _add(store, ck, "verify:eps=0.2,method=milp,time_limit=10", "verify", _bits(0, 1, 3, 4), proven=_bits(0, 1, 3, 4))
    _add(store, ck, "certify:eps=0.2,method=crown", "certify", _bits(0, 1, 2), proven=_bits(0, 1, 2))
    return store, store.checkpoint("k" * 64)


def test_certify_against_verify_is_unsound(tmp_path):
    store, ck = _contradicted(tmp_path)
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    assert b.unsound == 1 and b.unsound_indices == (2,)


def test_an_unsound_bracket_withholds_its_figures(tmp_path):
    from bench.cli.output import BRACKET, bracket_note
    from bench.reporting.site import build_site

    store, ck = _contradicted(tmp_path)
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    assert b.certified is None and b.exact is None and b.gap is None
    assert b.withheld == "unsound"
    (row,) = [r for r in result_rows(store) if r["attack"] == "worst_case"]
    assert row["certified"] is None and row["exact"] is None and row["withheld"] == "unsound"
    assert bracket_note(row) == "certified and exact withheld: unsound"
    assert "withheld" in BRACKET  # a column of the csv
    out = build_site(store, tmp_path / "site")
    index = out.read_text()
    assert "withheld: unsound" in index
    page = next(p for p in out.parent.rglob("*.html") if ck.key[:8] in p.name).read_text()
    assert "withheld" in page and "Certified floor" not in page and "Exact robust accuracy" not in page


def test_a_sound_bracket_says_nothing_is_withheld(tmp_path):
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", _bits(0, 1, 2, 3, 4))
    _add(store, ck, "verify:eps=0.2,method=milp,time_limit=10", "verify", _bits(0, 1, 2, 3), proven=_bits(0, 1, 2))
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    assert b.withheld is None and b.certified == pytest.approx(0.3) and b.unsound == 0


def test_a_hook_added_after_tracing_is_refused_at_verification():
    model = _base()
    g = to_graph(model, (1, 1, 2))
    x, y = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2), torch.tensor([0])
    handle = _last_layer_hook(model)
    try:
        with pytest.raises(Unsupported, match=r"^verify: [^\n]*forward hook[^\n]*$"):
            verify_images(g, model, x, y, 0.1)
        with pytest.raises(Unsupported, match=r"^verify: [^\n]*forward hook[^\n]*$"):
            certify(g, x, y, 0.1, model=model)
    finally:
        handle.remove()


def test_lp_bounds_are_weak_duality_bounds():
    # min x1 + 2 x2 s.t. x1 + x2 >= 1, 0 <= x <= 5: the optimum is 1 (x = (1, 0)). HiGHS's
    # dual gives a bound within rounding of it, never above; any multiplier y gives the
    # hand-computed y * 1 + min over the box of (1 - y) x1 + (2 - y) x2.
    from bench.verify.milp import Program, dual_bound

    p = Program()
    p.new_vars([0.0, 0.0], [5.0, 5.0])
    p.rows(np.array([0, 0]), np.array([0, 1]), np.array([1.0, 1.0]), 1.0, np.inf)
    c = np.array([1.0, 2.0])
    assert 1 - 1e-12 <= p.lp_bound(c, 10.0) <= 1
    a, row_lb, row_ub, var, _ = p._rows()
    for y, hand in ((0.5, 0.5), (1.0, 1.0), (3.0, 3 - 2 * 5 - 1 * 5), (-1.0, -np.inf)):
        got = dual_bound(c, a, row_lb, row_ub, var.lb, var.ub, np.array([y]))
        assert got <= hand and (got == hand or got == pytest.approx(hand, rel=1e-12, abs=1e-12))
