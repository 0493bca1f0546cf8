"""bench.verify's branch and bound (bab.py) and optimized bounds (alpha.py) on small seeded
chains, against the truth: exact margins by MILP (complete.exact_margins) and dense grids
of the input box. Every bound must stay below the true minimum of its domain, whatever
its alpha, beta and splits; every counterexample must be real; and branch and bound must
decide what CROWN alone cannot, within its time limit."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from bench.core.models import Normalize
from bench.verify import SearchConfig, to_graph, verify_images
from bench.verify.alpha import Chain, chain_of, linear_bound, relax
from bench.verify.bab import BaBConfig, Problem, branch_and_bound, root_bounds
from bench.verify.bounds import box, crown_bounds, target_margins
from bench.verify.complete import DECIDERS, exact_margins
from bench.verify.rounding import local_radii
from bench.verify.search import box32

CLASSES = 3


def chain_net(seed: int, d: int, widths: tuple[int, ...]) -> nn.Module:
    """d inputs -> Linear/ReLU layers of `widths` -> CLASSES logits, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize((0.0,), (1.0,)), nn.Flatten()]
    fan_in = d
    for w in widths:
        layers += [nn.Linear(fan_in, w), nn.ReLU()]
        fan_in = w
    layers.append(nn.Linear(fan_in, CLASSES))
    return nn.Sequential(*layers).eval()


def problem(model: nn.Module, x: torch.Tensor, eps: float) -> tuple[Problem, int, torch.Tensor]:
    """The BaB problem of image x (1, 1, 1, d), its label (the clean prediction), CROWN's bounds."""
    g = to_graph(model, tuple(x.shape[1:]))
    chain = chain_of(g)
    assert chain is not None
    y = int(g.forward(x).argmax(1))
    lo, hi = box(x, eps)
    bounds = crown_bounds(g, lo, hi)
    root = ([bounds[k][0] for k in chain.relus], [bounds[k][1] for k in chain.relus])
    crown = target_margins(g, lo, hi, torch.tensor([y]), bounds)[0]
    return Problem(chain, lo[0], hi[0], root, model, y, box32(x, eps)), y, crown


CASES = list(itertools.product(range(8), (0.25, 0.4)))


@pytest.mark.parametrize("seed, eps", CASES)
def test_alpha_bound_lies_between_crown_and_the_exact_minimum(seed, eps):
    model = chain_net(seed, 4, (12, 12, 8))
    x = torch.rand(1, 1, 1, 4, generator=torch.Generator().manual_seed(seed))
    p, y, crown = problem(model, x, eps)
    targets = [j for j in range(CLASSES) if j != y]
    opt = root_bounds(p, targets, BaBConfig(), time.perf_counter() + 30, torch.full((2,), float("inf")))
    exact, _ = exact_margins(to_graph(model, (1, 1, 4)), x[0], y, eps)
    for r, j in enumerate(targets):
        alpha = float(opt.result.bound[r])
        assert alpha >= float(crown[j]) - 1e-9
        assert alpha <= float(exact[j]) + 1e-7


def grid(d: int, n: int) -> torch.Tensor:
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.cartesian_prod(*[axis] * d)


@pytest.mark.parametrize("seed", range(6))
def test_every_split_bound_stays_below_its_domains_minimum(seed):
    # Random splits, random alpha in [0, 1] and beta >= 0: the bound of each subdomain must
    # not pass the smallest margin among a dense grid's points that satisfy its splits.
    model = chain_net(seed, 2, (10, 10, 8))
    x = torch.full((1, 1, 1, 2), 0.5)
    p, y, _ = problem(model, x, 0.5)
    g = to_graph(model, (1, 1, 2))
    pts = p.lo + (p.hi - p.lo) * grid(2, 161)
    values = g.values(pts)
    pre = [values[k] for k in p.chain.relus]
    gen = torch.Generator().manual_seed(seed)
    n, checked = 64, 0
    for j in (j for j in range(CLASSES) if j != y):
        spec_w, spec_b = p.spec([j])
        margin = values[-1][:, y] - values[-1][:, j]
        unstable = [((lw < 0) & (u > 0))[0] for lw, u in zip(*p.root, strict=True)]
        draws = [torch.randint(0, 8, (n, len(m)), generator=gen) for m in unstable]  # a few splits per domain
        split = [torch.where(m & (d < 2), 1 - 2 * d, 0).to(torch.int8) for m, d in zip(unstable, draws, strict=True)]
        alpha = [torch.rand(n, len(m), generator=gen, dtype=torch.float64) for m in unstable]
        beta = [torch.rand(n, len(m), generator=gen, dtype=torch.float64) * 2 for m in unstable]
        r = relax(*p.root, split, torch.float64)
        bound = linear_bound(p.chain, p.lo, p.hi, spec_w.expand(n, -1), spec_b.expand(n), r, alpha, beta).bound
        for i in range(n):
            inside = torch.ones(len(pts), dtype=torch.bool)
            for z, s in zip(pre, split, strict=True):
                inside &= ((z * s[i].double()) >= 0).all(1)
            if inside.any():
                checked += 1
                assert float(bound[i]) <= float(margin[inside].min()) + 1e-9
    assert checked >= 20


def robust_targets(model, x, y, eps):
    exact, _ = exact_margins(to_graph(model, tuple(x.shape[1:])), x[0], y, eps)
    return [(j, float(exact[j])) for j in range(CLASSES) if j != y and float(exact[j]) > 0]


@pytest.fixture(scope="module")
def gaps():
    """Per seeded chain and robust target: (CROWN's bound, the root alpha bound, tol, the
    exact minimum, BaB's outcome, y, model), with tol just under the exact minimum, so
    that the root bound falls short and branching must close the gap."""
    out, cfg = [], BaBConfig()
    for seed in range(6):
        model = chain_net(seed, 4, (16, 16, 12))
        x = torch.rand(1, 1, 1, 4, generator=torch.Generator().manual_seed(100 + seed))
        p, y, crown = problem(model, x, 0.35)
        for j, exact in robust_targets(model, x, y, 0.35):
            start = root_bounds(p, [j], cfg, time.perf_counter() + 30, torch.full((1,), float("inf")))
            tol = exact - 1e-3
            result = branch_and_bound(p, j, tol, start, 0, cfg, time.perf_counter() + 20)
            out.append((float(crown[j]), float(start.result.bound[0]), tol, exact, result, y, model))
    return out


def test_branch_and_bound_never_proves_more_than_the_truth(gaps):
    for _, _, tol, exact, out, y, model in gaps:
        assert out.status in ("robust", "not_robust")  # not robust: a real counterexample for another class
        if out.status == "robust":
            assert tol < out.lower <= exact + 1e-7
        else:
            with torch.no_grad():
                assert int(model(out.x_adv[None]).argmax(1)) != y


def test_branch_and_bound_decides_cases_crown_cannot(gaps):
    hard = [out for crown, alpha, tol, _, out, _, _ in gaps if max(crown, alpha) <= tol]
    assert sum(out.status == "robust" and out.domains > 1 for out in hard) >= 5


def assert_counterexample(model, verdict, x, y, eps):
    assert verdict.status == "not_robust" and verdict.x_adv is not None
    adv = verdict.x_adv
    assert adv.dtype == torch.float32 and adv.shape == x.shape[1:]
    assert float((adv.double() - x[0].double()).abs().max()) <= eps
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert int(model(adv[None]).argmax(1)) != y


@pytest.mark.parametrize("seed", range(10))
def test_verdicts_agree_with_the_exact_margins(seed):
    # With the PGD search reduced to the clean image, branch and bound must find the
    # counterexamples itself; a robust verdict needs every exact margin > 0.
    model = chain_net(seed, 4, (16, 16, 12))
    x = torch.rand(1, 1, 1, 4, generator=torch.Generator().manual_seed(200 + seed))
    g = to_graph(model, (1, 1, 4))
    y = g.forward(x).argmax(1)
    eps = 0.4
    (v,) = verify_images(
        g, model, x, y, eps, time_limit=20, search=SearchConfig(steps=0, restarts=1), bab=BaBConfig(min_unstable=0)
    )
    exact, _ = exact_margins(g, x[0], int(y), eps)
    truth = float(exact.min())
    assert v.decided_by in DECIDERS
    if v.status == "robust":
        assert truth > 0 and v.lower <= truth + 1e-7
    elif v.status == "not_robust":
        assert_counterexample(model, v, x, int(y), eps)
    assert v.status != "unknown" or abs(truth) < 1e-3


def test_the_milp_path_keeps_its_time_limit_on_a_large_program():
    # 784-256-256 random chain, about 270k nonzeros in its MILP: with HiGHS's presolve the
    # solve ran 7.5 s against 3 s (presolve reads the clock only between its passes).
    model = chain_net(0, 784, (256, 256))
    x = torch.rand(1, 1, 1, 784, generator=torch.Generator().manual_seed(0))
    g = to_graph(model, (1, 1, 784))
    y = g.forward(x).argmax(1)
    limit = 3.0
    start = time.perf_counter()
    (v,) = verify_images(g, model, x, y, 0.02, time_limit=limit, bab=None)
    assert time.perf_counter() - start <= limit + 1.0
    assert (v.status, v.decided_by) == ("unknown", "timeout") and v.binaries > 300  # the MILP ran


def test_the_time_limit_holds_on_a_hard_instance():
    # A deeper random chain with a robust image and tens of unstable ReLUs per layer:
    # branch and bound cannot finish in a second, and must stop then.
    model = chain_net(0, 16, (48, 48, 48, 48))
    x = torch.rand(1, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    g = to_graph(model, (1, 1, 16))
    y = g.forward(x).argmax(1)
    limit = 1.0
    start = time.perf_counter()
    (v,) = verify_images(g, model, x, y, 0.5, time_limit=limit, bab=BaBConfig(min_unstable=0))
    assert time.perf_counter() - start <= limit + 1.0
    assert v.seconds <= limit + 1.0
    assert (v.status, v.decided_by) == ("unknown", "timeout")


class Placed(TorchFunctionMode):
    """Records each tensor factory that bab.py or alpha.py calls without naming a device:
    on a GPU such a tensor would land on the CPU beside the search's CUDA tensors. The
    factories are those torch's default device applies to (torch.utils._device), the
    same set that would put a tensor on the wrong device."""

    FILES = ("bab.py", "alpha.py")

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: list[str] = []
        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and Path(frame.f_code.co_filename).parent.name == "verify":
                if Path(frame.f_code.co_filename).name in self.FILES:
                    self.unplaced.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def test_branch_and_bound_makes_every_tensor_on_the_problems_device():
    # Only a CPU here: the placement is checked where it is decided, at each factory call,
    # over full searches that split, bound and attack (both verdicts among them).
    placed, verdicts = Placed(), []
    for seed in (1, 3, 4):  # of test_verdicts_agree_with_the_exact_margins' seeds, those BaB decides
        model = chain_net(seed, 4, (16, 16, 12))
        x = torch.rand(1, 1, 1, 4, generator=torch.Generator().manual_seed(200 + seed))
        g = to_graph(model, (1, 1, 4))
        y = g.forward(x).argmax(1)
        with placed:
            verdicts += verify_images(
                g,
                model,
                x,
                y,
                0.4,
                time_limit=20,
                search=SearchConfig(steps=0, restarts=1),
                bab=BaBConfig(min_unstable=0),
            )
    assert [(v.status, v.decided_by) for v in verdicts] == [("robust", "bab"), ("not_robust", "bab"), ("robust", "bab")]
    assert placed.unplaced == []


def test_a_problem_moves_every_tensor_it_holds():
    model = chain_net(0, 4, (8, 8))
    p, _, _ = problem(model, torch.full((1, 1, 1, 4), 0.5), 0.3)
    g = to_graph(model, (1, 1, 4))
    lo, hi = box(torch.full((1, 1, 1, 4), 0.5), 0.3)
    radii = local_radii(g, lo, hi, crown_bounds(g, lo, hi))
    p = replace(p, radii=([radii[k] for k in p.chain.relus], radii[g.output][0]))

    def tensors(value) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, (tuple, list)):
            return [t for v in value for t in tensors(v)]
        if isinstance(value, Chain):
            return tensors((value.weights, value.biases))
        return []

    held = [f.name for f in fields(Problem) if tensors(getattr(p, f.name))]
    assert held == ["chain", "lo", "hi", "root", "box32", "radii"]
    moved = p.to(torch.device("meta"))
    assert all(t.device.type == "meta" for name in held for t in tensors(getattr(moved, name)))
    assert moved.device.type == "meta" and all(
        t.device.type == "meta" for t in moved.no_split(2) + moved.zeros(2, torch.float64)
    )
    assert moved.spec([0])[0].device.type == "meta"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch", "0"], "--batch must be at least 1 (domains split per round), got 0"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
    ],
)
def test_the_benchmark_refuses_bad_options_in_one_line(argv, says, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bab_mlp import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith(says)
