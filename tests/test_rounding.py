"""bench.verify's floating-point soundness (DeepPoly's handling, Singh et al. 2019): the
model in fp32 is the graph with each affine and add op's output perturbed by up to its
LOCAL rounding (rounding.local_radii), and CROWN (bounds.py) and alpha-CROWN (alpha.py)
bound that family. Checked here against the model itself run in fp32 by torch: the
perturbed bounds hold at sampled points and corners of the box (shallow, deep, pooled and
residual nets), the perturbation term is far below rounding.py's propagated E on wide
MLPs, and a robust or certified verdict needs a positive perturbed bound."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from bench.core.models import Normalize
from bench.verify import SearchConfig, certify, to_graph, verify_images
from bench.verify.alpha import chain_of, finish
from bench.verify.bab import BaBConfig, Problem, root_bounds
from bench.verify.bounds import box, crown_bounds, fp32_margins, fp32_tolerance
from bench.verify.rounding import SAFETY, fp32_error, local_radii, margin_tolerance
from bench.verify.search import box32


def mlp(seed: int, d: int, widths: tuple[int, ...], classes: int = 10, scale: float = 1.0) -> nn.Module:
    """d pixels -> Normalize -> Linear/ReLU layers of `widths` -> logits, seeded (weights
    times `scale`, to push the logits, and their rounding, up)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize((0.1307,), (0.3081,)), nn.Flatten()]
    fan_in = d
    for w in widths:
        layers += [nn.Linear(fan_in, w), nn.ReLU()]
        fan_in = w
    layers.append(nn.Linear(fan_in, classes))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


class PoolRes(nn.Module):
    """conv -> relu -> maxpool -> conv (+ residual) -> relu -> linear: every op kind."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize((0.5,), (0.25,))
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.c1(self.norm(x))))
        h = torch.relu(self.c2(h) + h)
        return self.fc(h.flatten(1))


def fp32_worst(model: nn.Module, pts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, K) the fp32 model's margins z_y - z_j at points pts (n, ...), float64 of fp32 logits."""
    with torch.no_grad():
        z = model(pts.float()).double()
    return z.gather(1, y[:, None]) - z


def sample(lo32: torch.Tensor, hi32: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 points of the box: uniform (even k) or corners (odd k), clamped into the fp32 box."""
    t = torch.rand(lo32.shape, generator=gen)
    t = t.round() if k % 2 else t
    return torch.maximum(torch.minimum(lo32 + (hi32 - lo32) * t, hi32), lo32)


def assert_bounds_hold(model, shape, x, eps, points=200, y=None):
    g = to_graph(model, shape)
    if y is None:
        with torch.no_grad():
            y = model(x).argmax(1)
    lo, hi = box(x, eps)
    bounds = crown_bounds(g, lo, hi)
    b0, pert = fp32_margins(g, lo, hi, y, bounds)
    lower = (b0 - pert).scatter(1, y[:, None], float("-inf"))  # of the fp32 model's margins over the box
    assert bool(torch.isfinite(pert).all()) and bool((pert >= 0).all())
    lo32, hi32 = box32(x, eps)
    gen = torch.Generator().manual_seed(0)
    worst = torch.full_like(b0, float("inf"))
    for k in range(points):
        pts = sample(lo32, hi32, k, gen)
        m = fp32_worst(model, pts, y)
        worst = torch.minimum(worst, m)
        assert bool((lower <= m).all()), float((lower - m).max())
    return g, y, b0, pert, worst


@pytest.mark.parametrize("seed", range(4))
def test_perturbed_crown_holds_for_the_fp32_model_on_small_nets(seed):
    model = mlp(seed, 6, (16, 16, 12), classes=4, scale=3.0)
    x = torch.rand(3, 1, 1, 6, generator=torch.Generator().manual_seed(seed))
    assert_bounds_hold(model, (1, 1, 6), x, 0.1)


def test_perturbed_crown_holds_for_the_fp32_model_on_a_deep_net():
    model = mlp(7, 16, (64,) * 6, classes=5, scale=2.0)
    x = torch.rand(3, 1, 1, 16, generator=torch.Generator().manual_seed(7))
    g, _, _b0, _pert, _ = assert_bounds_hold(model, (1, 1, 16), x, 0.02)
    # the deep net's intermediate bounds hold for the fp32 pre-activations too
    lo, hi = box(x, 0.02)
    bounds = crown_bounds(g, lo, hi)
    lo32, hi32 = box32(x, 0.02)
    gen = torch.Generator().manual_seed(1)
    linears = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for k in range(100):
        h = sample(lo32, hi32, k, gen)
        with torch.no_grad():
            h = model[1](model[0](h))
            for layer, node in zip(linears, g.relu_inputs(), strict=True):
                z = layer(h)
                low, up = bounds[node]
                assert bool((z.double() >= low).all() and (z.double() <= up).all())
                h = torch.relu(z)


def test_perturbed_crown_holds_on_pooled_and_residual_nets():
    torch.manual_seed(3)
    model = PoolRes().eval()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    assert_bounds_hold(model, (1, 6, 6), x, 0.05, points=100)


def two_pixel() -> nn.Module:
    """test_soundness' net: logits near 60, an exact margin of ~6e-7 that fp32 gets wrong."""
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    w = float(np.nextafter(np.float32(50), np.float32(100)))
    b = float(np.nextafter(np.float32(10), np.float32(0)))
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[50.0, 50.0], [w, 50.0]]))
        last.bias.copy_(torch.tensor([10.0, b]))
    return nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten(), first, nn.ReLU(), last).eval()


def test_the_perturbed_bound_sees_the_fp32_misclassification():
    model, eps, y = two_pixel(), 0.1, torch.tensor([1])
    axis = torch.linspace(0.49, 0.51, 21)
    grid = torch.cartesian_prod(axis, axis).view(-1, 1, 1, 2)
    with torch.no_grad():
        x = grid[model(grid).argmax(1) == 1][:1]  # a clean image the fp32 model gets right
    assert len(x) == 1
    _, _, b0, pert, worst = assert_bounds_hold(model, (1, 1, 2), x, eps, points=400, y=y)
    assert 0 < float(b0[0, 0]) < 1e-6  # the exact margin is positive ...
    assert float(worst[0, 0]) <= 0  # ... the fp32 model misclassifies (ties go to class 0) somewhere
    assert float(b0[0, 0]) <= float(fp32_tolerance(pert)[0, 0])  # so nothing is proven
    g = to_graph(model, (1, 1, 2))
    bits, _ = certify(g, x, y, eps)
    assert not bool(bits[0])
    # branch and bound too, with the fp32 perturbations inside its bounds
    for bab in (BaBConfig(min_unstable=0), None):
        (v,) = verify_images(g, model, x, y, eps, time_limit=5, search=SearchConfig(steps=0, restarts=1), bab=bab)
        assert v.status != "robust"


@pytest.mark.parametrize("seed", range(3))
def test_alpha_crown_with_radii_holds_for_the_fp32_model(seed):
    model = mlp(seed, 6, (16, 16, 12), classes=4, scale=3.0)
    shape = (1, 1, 6)
    x = torch.rand(1, 1, 1, 6, generator=torch.Generator().manual_seed(50 + seed))
    g = to_graph(model, shape)
    chain = chain_of(g)
    assert chain is not None
    eps = 0.15
    lo, hi = box(x, eps)
    bounds = crown_bounds(g, lo, hi)
    radii = local_radii(g, lo, hi, bounds)
    y = int(model(x).argmax(1))
    root = ([bounds[k][0] for k in chain.relus], [bounds[k][1] for k in chain.relus])
    scaled = ([radii[k] for k in chain.relus], radii[g.output][0])  # SAFETY 1: the bare perturbed bound
    p = Problem(chain, lo[0], hi[0], root, model, y, box32(x, eps), scaled)
    targets = [j for j in range(4) if j != y]
    opt = root_bounds(p, targets, BaBConfig(), time.perf_counter() + 20, torch.full((3,), float("inf")))
    # random alpha as well as the optimized ones
    gen = torch.Generator().manual_seed(seed)
    alpha = [torch.rand(3, w, generator=gen, dtype=torch.float64) for w in chain.widths]
    w, b = p.spec(targets)
    rand = finish(chain, p.lo, p.hi, w, b, p.root, p.no_split(3), alpha, p.zeros(3, torch.float64), p.layer_radii)
    lo32, hi32 = box32(x, eps)
    yt = torch.tensor([y])
    for k in range(300):
        m = fp32_worst(model, sample(lo32, hi32, k, gen), yt)[0, targets]
        assert bool((opt.result.bound <= m).all()) and bool((rand.result.bound <= m).all())


@pytest.mark.parametrize("depth", [2, 4])
def test_the_perturbation_term_is_far_below_the_propagated_error(depth):
    # 784-256xk at eps 0.03: rounding.py's E (|W| products) grows ~13x per layer, the
    # perturbed bound's term T only as the margin's coefficients do.
    model = mlp(0, 784, (256,) * depth)
    g = to_graph(model, (1, 28, 28))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    lo, hi = box(x, 0.03)
    bounds = crown_bounds(g, lo, hi)
    _, pert = fp32_margins(g, lo, hi, y, bounds)
    new = fp32_tolerance(pert)
    old = margin_tolerance(fp32_error(g, lo, hi, bounds), y)
    off = torch.ones_like(new, dtype=torch.bool).scatter(1, y[:, None], False)
    assert float(new[off].median()) * 10 <= float(old[off].median())
    assert bool((new[off] > 0).all())


def test_a_certified_verdict_needs_a_positive_perturbed_bound():
    # Certified (and robust "by bound") exactly where B0 > SAFETY T for every target,
    # which makes B0 - T > 0; a larger T (here: radii blown up) takes the verdict away.
    model = mlp(1, 8, (12, 12), classes=3)
    x = torch.rand(24, 1, 1, 8, generator=torch.Generator().manual_seed(1))
    g = to_graph(model, (1, 1, 8))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.01
    bits, _margin = certify(g, x, y, eps)
    lo, hi = box(x, eps)
    b0, pert = fp32_margins(g, lo, hi, y, crown_bounds(g, lo, hi))
    assert torch.equal(bits, (b0 > SAFETY * pert).all(1))
    assert bool(((b0 - pert).amin(1)[bits] > 0).all())
    assert int(bits.sum()) >= 5
    verdicts = verify_images(g, model, x[:6], y[:6], eps, time_limit=5)
    for i, v in enumerate(verdicts):
        if v.status == "robust" and v.decided_by == "bound":
            assert bool((b0[i] - pert[i] > 0).all())
            assert v.tolerance == pytest.approx(float(SAFETY * pert[i].max()))


def test_huge_radii_take_every_verdict_away(monkeypatch):
    import bench.verify.bounds as bounds_mod
    import bench.verify.complete as complete_mod

    model = mlp(1, 8, (12, 12), classes=3)
    x = torch.rand(6, 1, 1, 8, generator=torch.Generator().manual_seed(1))
    g = to_graph(model, (1, 1, 8))
    with torch.no_grad():
        y = model(x).argmax(1)
    assert int(certify(g, x, y, 0.01)[0].sum()) > 0

    def huge(*args, **kwargs):
        return {k: r + 1e3 for k, r in local_radii(*args, **kwargs).items()}

    monkeypatch.setattr(bounds_mod, "local_radii", huge)
    monkeypatch.setattr(complete_mod, "local_radii", huge)
    assert int(certify(g, x, y, 0.01)[0].sum()) == 0
    for bab in (BaBConfig(min_unstable=0),):
        verdicts = verify_images(g, model, x, y, 0.01, time_limit=3, bab=bab)
        assert all(v.status != "robust" for v in verdicts)
