"""bench.verify: hand-built networks whose exact robust radius is known in closed form,
the max-pool and residual encodings against brute force, to_graph's fidelity and
refusals, soundness on a trained digits MLP, and the IBP training bounds."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import PGD, run_pgd
from bench.core.data import get_spec, load_dataset
from bench.core.models import Normalize, build_model
from bench.engine.train import TrainConfig, train_model
from bench.registry import DEFENSES
from bench.verify import SearchConfig, Unsupported, certify, ibp_bounds, interval_margin, to_graph, verify_images
from bench.verify.bounds import box, crown_bounds
from bench.verify.complete import exact_margins
from bench.verify.milp import build, numpy_bounds, tighten, unstable_count


def two_neuron(w1, b1, w2, b2) -> nn.Module:
    """Two pixels -> two ReLUs -> two logits, weights set by hand."""
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for layer, w, b in ((first, w1, b1), (last, w2, b2)):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    return nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten(), first, nn.ReLU(), last).eval()


def image(*pixels: float) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float32).view(1, 1, 1, -1)


def abs_net(c: float) -> nn.Module:
    """Margin of class 0 over class 1: c - |x1 - x2| (relu(x1 - x2) + relu(x2 - x1))."""
    return two_neuron([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0], [[-1.0, -1.0], [0.0, 0.0]], [c, 0.0])


def assert_counterexample(model, verdict, x, y: int, eps: float):
    assert verdict.status == "not_robust" and verdict.x_adv is not None
    adv = verdict.x_adv
    assert adv.shape == x.shape[1:] and adv.dtype == torch.float32
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert float((adv.double() - x[0].double()).abs().max()) <= eps
    with torch.no_grad():
        assert int(model(adv[None]).argmax(1)) != y


def test_closed_form_radius_robust_inside_and_broken_outside():
    # c - |x1 - x2| at (0.5, 0.5): the worst corner moves both pixels apart, radius c / 2 = 0.3.
    model, x, y = abs_net(0.6), image(0.5, 0.5), torch.tensor([0])
    g = to_graph(model, (1, 1, 2))
    (inside,) = verify_images(g, model, x, y, 0.29)
    assert inside.status == "robust" and inside.lower > 0
    (outside,) = verify_images(g, model, x, y, 0.31)
    assert_counterexample(model, outside, x, 0, 0.31)


def test_box_clipping_to_the_unit_interval_matters():
    # c - |x1 - x2| at (0.9, 0.5), c = 0.65: x1 cannot pass 1, so the radius is 0.15, not the
    # unclipped (c - 0.4) / 2 = 0.125.
    model, x, y = abs_net(0.65), image(0.9, 0.5), torch.tensor([0])
    g = to_graph(model, (1, 1, 2))
    unclipped = g.forward(image(0.9 + 0.14, 0.5 - 0.14))
    assert float(unclipped[0, 0] - unclipped[0, 1]) < 0  # the unclipped box would hold a counterexample
    (robust,) = verify_images(g, model, x, y, 0.14)
    assert robust.status == "robust"
    assert bool(certify(g, x, y, 0.14)[0][0])
    (broken,) = verify_images(g, model, x, y, 0.16)
    assert_counterexample(model, broken, x, 0, 0.16)
    assert float(broken.x_adv.flatten()[0]) > 0.99


def test_the_milp_decides_where_crown_and_intervals_do_not():
    # c - relu(x1 + x2 - 1) - relu(x1 - x2) at (0.5, 0.5): the true worst case is 2 eps, so the
    # radius is c / 2 = 0.3; CROWN's chords give c - 3 eps and intervals c - 4 eps.
    model = two_neuron([[1.0, 1.0], [1.0, -1.0]], [-1.0, 0.0], [[-1.0, -1.0], [0.0, 0.0]], [0.6, 0.0])
    x, y = image(0.5, 0.5), torch.tensor([0])
    g = to_graph(model, (1, 1, 2))
    bits, margin = certify(g, x, y, 0.25)
    # (CROWN's intermediate bounds are the fp32 values', bench.verify.bounds: a few ulps wider)
    assert not bool(bits[0]) and float(margin[0]) == pytest.approx(0.6 - 3 * 0.25, abs=1e-5)
    assert float(interval_margin(g, x, y, 0.25)[0]) == pytest.approx(0.6 - 4 * 0.25)
    (verdict,) = verify_images(g, model, x, y, 0.25)
    assert verdict.status == "robust" and verdict.decided_by == "milp" and verdict.binaries >= 1
    assert verdict.unstable == 2
    (broken,) = verify_images(g, model, x, y, 0.31)
    assert_counterexample(model, broken, x, 0, 0.31)
    assert bool(certify(g, x, y, 0.19)[0][0])
    (late,) = verify_images(g, model, x, y, 0.25, time_limit=0.0)  # no time for the MILP: undecided
    assert (late.status, late.decided_by, late.x_adv) == ("unknown", "timeout", None)
    assert late.lower == pytest.approx(0.6 - 3 * 0.25, abs=1e-5)


def test_every_open_target_gets_its_own_milp():
    # Three classes: against class 1 the margin is c - relu(x1 + x2 - 1) - relu(x1 - x2) (CROWN
    # says -0.15 at eps 0.25, the truth is +0.1), against class 2 it is 0.62 - x1 (exact: -0.13).
    # The loosest bound comes first and is ruled out; the verdict must come from the second.
    first, last = nn.Linear(2, 3), nn.Linear(3, 3)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 0.0]]))
        first.bias.copy_(torch.tensor([-1.0, 0.0, 0.0]))
        last.weight.copy_(torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 1.0]]))
        last.bias.copy_(torch.tensor([0.6, 0.0, 0.6 - 0.12 - 0.5]))
    model = nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten(), first, nn.ReLU(), last).eval()
    x, y = image(0.5, 0.5), torch.tensor([0])
    g = to_graph(model, (1, 1, 2))
    (verdict,) = verify_images(g, model, x, y, 0.25, search=SearchConfig(steps=0, restarts=1))
    assert_counterexample(model, verdict, x, 0, 0.25)
    assert verdict.decided_by == "milp" and int(model(verdict.x_adv[None]).argmax()) == 2


class PoolNet(nn.Module):
    """1x2x2 image -> 1x1 conv to 3 channels -> ReLU -> one 2x2 max-pool window each -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 3, 1), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


class ConvPool(nn.Module):
    """1x3x3 image -> 2x2 conv to two 2x2 maps (window entries of unequal widths) -> one
    2x2 max-pool window each -> 3 logits: little for CROWN to lose but the pool's bound."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 2), nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(self.conv(x), 2).flatten(1))


@pytest.mark.parametrize("seed", range(4))
def test_crown_through_max_pooling_stays_below_the_exact_minimum(seed):
    torch.manual_seed(seed)
    model = ConvPool().eval()
    x = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(seed))
    g = to_graph(model, (1, 3, 3))
    y = int(g.forward(x).argmax(1))
    mins, points = exact_margins(g, x[0], y, 0.2)
    for j, p in enumerate(points):
        if p is not None:
            at = g.forward(torch.from_numpy(p).view(1, 1, 3, 3))[0]
            assert float(at[y] - at[j]) == pytest.approx(float(mins[j]), abs=1e-6)
    _, crown = certify(g, x, torch.tensor([y]), 0.2)
    assert float(crown[0]) <= float(mins.min()) + 1e-9


class ResidualNet(nn.Module):
    """Two pixels -> relu(fc1) -> fc2, plus the input (a residual add) -> ReLU -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(2, 6), nn.Linear(6, 2), nn.Linear(2, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(torch.relu(self.fc2(F.relu(self.fc1(x))) + x))


def grid(side: int, n: int) -> torch.Tensor:
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.tensor(list(itertools.product(axis.tolist(), repeat=side)), dtype=torch.float64)


def _against_brute_force(model: nn.Module, shape, x: torch.Tensor, points: int):
    """For each target: the MILP minimum margin over the whole unit box (eps 1) is attained
    at its own minimizer and is no larger than a dense grid's minimum, which it matches to
    the grid's resolution."""
    g = to_graph(model.eval(), shape)
    y = int(g.forward(x).argmax(1))
    mins, argmins = exact_margins(g, x[0], y, 1.0)
    pts = grid(int(np.prod(shape)), points)
    z = g.forward(pts.view(-1, *shape))
    for j in range(g.num_classes):
        if j == y:
            continue
        brute = float((z[:, y] - z[:, j]).min())
        at = g.forward(torch.from_numpy(argmins[j]).view(1, *shape))[0]
        assert float(at[y] - at[j]) == pytest.approx(float(mins[j]), abs=1e-6)
        assert float(mins[j]) <= brute + 1e-7
        assert brute - float(mins[j]) < 0.05
    _, crown = certify(g, x.float(), torch.tensor([y]), 1.0)
    assert float(crown[0]) <= float(mins.min()) + 1e-9
    lo, hi = box(x, 1.0)
    bounds = crown_bounds(g, lo, hi)
    return g, build(g, lo[0].numpy(), hi[0].numpy(), numpy_bounds(bounds)).binaries, unstable_count(g, bounds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_pool_encoding_matches_a_grid_search(seed):
    torch.manual_seed(seed)
    g, binaries, relus = _against_brute_force(
        PoolNet(), (1, 2, 2), torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64), 21
    )
    assert any(n.op == "maxpool" for n in g.nodes) and binaries > relus  # the windows have binaries of their own


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_add_encoding_matches_a_grid_search(seed):
    torch.manual_seed(seed)
    g, binaries, _ = _against_brute_force(
        ResidualNet(), (1, 1, 2), torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64), 301
    )
    assert any(n.op == "add" for n in g.nodes) and binaries > 0


class ConvResidual(nn.Module):
    """A conv block with eval-mode batch norm and a residual add, then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 1, 3, padding=1),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h) + x).view(x.size(0), -1))


def conv_residual() -> nn.Module:
    torch.manual_seed(0)
    spec = get_spec("digits")
    model = nn.Sequential(Normalize(spec.mean, spec.std), ConvResidual())
    with torch.no_grad():
        model[1].bn.running_mean.uniform_(-0.5, 0.5)
        model[1].bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["digits_cnn", "digits_mlp", "conv_residual"])
def test_to_graph_reproduces_the_logits(arch):
    torch.manual_seed(0)
    model = conv_residual() if arch == "conv_residual" else build_model(arch, get_spec("digits")).eval()
    g = to_graph(model)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert float((g.forward(x) - model(x).double()).abs().max()) < 1e-5
    assert g.input_shape == (1, 8, 8)


class Clip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class WithFunction(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(Clip.apply(x))


@pytest.mark.parametrize(
    "bad, names",
    [
        (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.1), nn.Linear(8, 10)),
            ("'2'", "(Dropout)"),
        ),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)), ("'2'", "(Tanh)")),
        (lambda: WithFunction(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), ("Clip.apply", "autograd.Function")),
    ],
)
def test_to_graph_refuses_what_it_cannot_encode_in_one_line(bad, names):
    with pytest.raises(Unsupported) as err:
        to_graph(bad().eval(), (1, 8, 8))
    message = str(err.value)
    assert "\n" not in message and message.startswith("verify: layer ")
    assert all(n in message for n in names)


@pytest.fixture(scope="module")
def mlp():
    spec, entry = get_spec("digits"), DEFENSES.get("natural")
    x, y = load_dataset("digits", "train")
    model, _ = train_model("digits_mlp", spec, entry.fn, entry.make_config({}), TrainConfig(epochs=5), x, y, seed=0)
    return model.eval()


def test_soundness_on_a_trained_mlp(mlp, digits_test):
    eps = 0.08  # a mix: about half certified by CROWN, a few more proven by the MILP, a third broken
    x, y = digits_test[0][:50], digits_test[1][:50]
    g = to_graph(mlp)
    bits, margin = certify(g, x, y, eps)
    attack = PGD(eps=eps, steps=50, step_size=eps / 10, loss="cw", restarts=2)
    _, broken = run_pgd(mlp, x, y, attack, torch.Generator().manual_seed(1))
    verdicts = verify_images(g, mlp, x, y, eps, time_limit=10.0)
    robust = torch.tensor([v.status == "robust" for v in verdicts])
    assert not (broken & bits).any() and not (broken & robust).any()
    assert not (bits & ~robust).any()  # certified implies robust
    for i, v in enumerate(verdicts):
        if v.status == "not_robust":
            assert_counterexample(mlp, v, x[i : i + 1], int(y[i]), eps)
        if v.decided_by == "clean":
            assert torch.equal(v.x_adv, x[i])
        else:
            assert v.lower >= float(margin[i]) - 1e-9  # CROWN's bound, or better
        if v.status == "robust":
            assert v.lower >= 0
    assert robust.sum() > bits.sum() > 0  # the MILP proves more than CROWN, which proves something
    assert any(v.decided_by == "milp" and v.binaries > 0 for v in verdicts)
    assert sum(v.status == "unknown" for v in verdicts) <= 2
    assert int((interval_margin(g, x, y, eps) > 0).sum()) <= int(bits.sum())
    lo, hi = ibp_bounds(mlp, x, eps)
    ibp = lo.gather(1, y[:, None])[:, 0] - hi.scatter(1, y[:, None], float("-inf")).amax(1)
    assert int((ibp > 0).sum()) <= int(bits.sum())


def test_the_milp_alone_finds_what_the_search_finds(mlp, digits_test):
    # With the search reduced to the clean image, every non-robust verdict comes from the
    # MILP: the statuses must not change, and each MILP counterexample must reproduce.
    eps = 0.08
    x, y = digits_test[0][:30], digits_test[1][:30]
    g = to_graph(mlp)
    with_search = verify_images(g, mlp, x, y, eps)
    alone = verify_images(g, mlp, x, y, eps, search=SearchConfig(steps=0, restarts=1))
    decided = [
        (a.status, b.status) for a, b in zip(alone, with_search, strict=True) if "unknown" not in (a.status, b.status)
    ]
    assert len(decided) >= len(x) - 2 and all(a == b for a, b in decided)
    assert sum(v.decided_by == "milp" and v.status == "not_robust" for v in alone) >= 5
    for i, v in enumerate(alone):
        if v.status == "not_robust":
            assert_counterexample(mlp, v, x[i : i + 1], int(y[i]), eps)


def test_lp_tightening_is_sound_and_tighter(mlp, digits_test):
    # Each tightened bound of a second-layer ReLU lies between CROWN's and the exact extreme
    # (an uncapped MILP over the box, whose optimum is attained at a real input).
    eps = 0.1
    x = digits_test[0][:4]
    g = to_graph(mlp)
    node = g.relu_inputs()[1]
    gained = 0.0
    for i in range(len(x)):
        lo, hi = box(x[i : i + 1], eps)
        crown = crown_bounds(g, lo, hi)
        tight = tighten(g, lo, hi, crown, time.perf_counter() + 30)
        (cl, cu), (tl, tu) = crown[node], tight[node]
        assert (tl >= cl).all() and (tu <= cu).all()
        gained += float((cu - cl).sum() - (tu - tl).sum())
        prog = build(g, lo[0].numpy(), hi[0].numpy(), numpy_bounds(crown), upto=node)
        for n in torch.nonzero((cl[0] < 0) & (cu[0] > 0)).flatten().tolist()[:6]:
            for sign in (1.0, -1.0):
                c = np.zeros(prog.n_vars)
                c[prog.offsets[node] + n] = sign
                res = prog.solve(c, integer=True, time_limit=30)
                real = float(g.values(torch.from_numpy(res.x[:64]).view(1, 1, 8, 8))[node][0, n])
                assert real == pytest.approx(sign * res.fun, abs=1e-5)
                assert (float(tl[0, n]) <= real + 1e-5) if sign > 0 else (float(tu[0, n]) >= real - 1e-5)
    assert gained > 0


@pytest.mark.parametrize("arch", ["digits_cnn", "conv_residual"])
def test_crown_bounds_hold_on_sampled_points(arch, digits_test):
    # Every intermediate bound and the margin bound hold at random points and vertices of the box.
    torch.manual_seed(0)
    model = conv_residual() if arch == "conv_residual" else build_model(arch, get_spec("digits")).eval()
    g, eps = to_graph(model), 0.1
    x, y = digits_test[0][:8], digits_test[1][:8]
    lo, hi = box(x, eps)
    bounds = crown_bounds(g, lo, hi)
    _, margin = certify(g, x, y, eps)
    gen = torch.Generator().manual_seed(0)
    for k in range(60):
        t = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
        values = g.values(lo + (hi - lo) * (t.round() if k % 2 else t))
        for node, (low, up) in bounds.items():
            assert (values[node] >= low - 1e-9).all() and (values[node] <= up + 1e-9).all(), g.nodes[node].name
        z = values[-1]
        worst = (z.gather(1, y[:, None]) - z).scatter(1, y[:, None], float("inf")).amin(1)
        assert (worst >= margin - 1e-9).all()


def test_ibp_bounds_hold_and_carry_gradients(mlp, digits_test):
    x, y, eps = digits_test[0][:32], digits_test[1][:32], 0.1
    lo, hi = ibp_bounds(mlp, x, eps)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            z = mlp((x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1))
            assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()
    worst = torch.where(F.one_hot(y, 10).bool(), lo, hi)  # Gowal et al.'s worst-case logits
    F.cross_entropy(worst, y).backward()
    grads = [p.grad for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
    with pytest.raises(Unsupported, match="Dropout"):
        ibp_bounds(nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(64, 10)), x, eps)
