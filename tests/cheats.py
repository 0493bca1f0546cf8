"""The cheating zoo: models that cheat gradient attacks, each with an attack written for
its cheat, outside the bench (the truth its worst case is held to).

Built after the defenses Athalye, Carlini & Wagner (2018) and Tramer et al. (2020)
broke. Each wraps a trained digits model (`tests/conftest.py::train_digits`):

- `quantized`: input rounded to 4 grey levels (zero gradients); truth: PGD through a
  straight-through estimator (BPDA).
- `saturated`: logits times 1000 (a saturated softmax); truth: PGD on the margin.
- `noisy`: Gaussian input noise at every pass; truth: EOT PGD judged by a majority.
- `round_noisy`: rounded to 4 grey levels, then Gaussian noise (sigma 0.1) at every
  pass: zero gradients that EOT cannot average into anything; truth: BPDA + EOT PGD.
- `straight_through`: the rounding as a user's own custom autograd.Function whose
  backward is the identity (hand-written BPDA); truth: BPDA PGD.
- `reversed`: an identity custom Function whose backward reverses the gradient (a
  misleading gradient); truth: PGD on the network behind it.
- `reversed_robust`: the same Function around a PGD-trained network, whose answers a
  surrogate distils poorly; truth: PGD on the network behind it (its honest gradient).
- `reversed_over_16`: an identity custom Function whose backward reverses the gradient
  only for batches of more than 16 (honest on a small check, lying at the attacks'
  batch size); truth: PGD on the network behind it.
- `resize_pad`: random resizing and padding at every pass (Xie et al. 2018, an input
  transformation); truth: EOT PGD judged by a majority.
- `sap`: stochastic activation pruning (Dhillon et al. 2018, stochastic activations);
  truth: EOT PGD judged by a majority.
- `staircase`: ReLUs whose outputs are rounded to steps of 1/4 (a non-smooth, piecewise
  constant activation: zero gradients inside the network); truth: PGD with a straight-
  through estimator at every activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from custom_backward import Reversed, StraightThrough, Wrapped

from bench.core.data import get_spec
from bench.engine.verdicts import majority_correct
from bench.science.adaptive import BPDA

THREAT = get_spec("digits").threat


class ReversedOver16(torch.autograd.Function):
    """The identity forward; the backward reverses the gradient of batches over 16 and
    passes that of smaller ones as it is."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad if len(grad) > 16 else grad


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


class RoundNoisy(torch.nn.Module):
    """Rounded to 4 grey levels, then Gaussian noise at every pass."""

    def __init__(self, net, sigma: float = 0.1, bpda: bool = False):
        super().__init__()
        self.net, self.sigma = net, sigma
        self.step = BPDA(quantize) if bpda else quantize

    def forward(self, x):
        return self.net((self.step(x) + self.sigma * torch.randn_like(x)).clamp(0, 1))


class ResizePad(torch.nn.Module):
    """Each pass shrinks the image to a random side of 6 to 8 pixels (bilinear) and pads it
    back to 8 at a random offset (Xie et al.'s randomization, at the scale of digits)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        side = int(torch.randint(6, 9, (1,)))
        small = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        pad = 8 - side
        left, top = int(torch.randint(0, pad + 1, (1,))), int(torch.randint(0, pad + 1, (1,)))
        return self.net(F.pad(small, (left, pad - left, top, pad - top)))


def _prune(a: torch.Tensor) -> torch.Tensor:
    """SAP on one layer's activations: each unit survives with the probability that one
    of n draws (n = the layer's width) proportional to the activations' magnitudes picks it,
    and survivors are scaled by the inverse of that probability (unbiased). Independent
    draws per unit with the same marginals as Dhillon et al.'s draws with replacement."""
    flat = a.flatten(1)
    p = flat.abs() / flat.abs().sum(1, keepdim=True).clamp_min(1e-12)
    keep = 1 - (1 - p) ** flat.shape[1]
    mask = torch.rand_like(keep) < keep
    return torch.where(mask, flat / keep.clamp_min(1e-12), torch.zeros_like(flat)).view_as(a)


class SAP(torch.nn.Module):
    """A trained digits CNN (`Sequential(Normalize, TwoConvCNN)`) with stochastic
    activation pruning after each hidden layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        norm, net = self.model[0], self.model[1]
        h = _prune(F.max_pool2d(F.relu(net.conv1(norm(x))), 2))
        h = _prune(F.max_pool2d(F.relu(net.conv2(h)), 2))
        return net.fc2(_prune(F.relu(net.fc1(h.flatten(1)))))


def stairs(h):
    return torch.round(F.relu(h) * 4) / 4


class Staircase(torch.nn.Module):
    """A trained digits CNN whose ReLUs round their outputs to steps of 1/4."""

    def __init__(self, model, bpda: bool = False):
        super().__init__()
        self.model = model
        self.act = BPDA(stairs, F.relu) if bpda else stairs

    def forward(self, x):
        norm, net = self.model[0], self.model[1]
        h = F.max_pool2d(self.act(net.conv1(norm(x))), 2)
        h = F.max_pool2d(self.act(net.conv2(h)), 2)
        return net.fc2(self.act(net.fc1(h.flatten(1))))


def pgd(model, x, y, loss_fn, steps=50, eps=THREAT.eps, step=THREAT.eps / 8, seed=0):
    """Plain L-inf PGD with a uniform start; returns the last iterate (independent of the bench)."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model, x_adv, y), x_adv)
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


def eot_truth(judged, attacked, x, y, steps=100, passes=8, votes=21) -> float:
    """EOT PGD on the margin (its gradient averaged over `passes` passes of `attacked`),
    judged by a seeded majority of `votes` passes of `judged`."""

    def eot_margin(m, xa, ya):
        return sum(margin(m, xa, ya) for _ in range(passes)) / passes

    torch.manual_seed(1)
    x_adv = pgd(attacked, x, y, eot_margin, steps=steps)
    ok = majority_correct(judged, x_adv, y, votes, device="cpu", batch_size=1024)
    return float((ok & majority_correct(judged, x, y, votes, device="cpu", batch_size=1024)).float().mean())


@dataclass(frozen=True)
class Cheat:
    """One row of the zoo: how to build it from a natural and a PGD-AT digits model, which
    it wraps, the truth (an attack written for it), and what that attack is."""

    name: str
    describe: str
    build: Callable[[torch.nn.Module, torch.nn.Module], torch.nn.Module]
    truth: Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor], float]
    truth_name: str


def _behind(cheat, natural, x, y):
    """PGD-50 with the gradient of the network behind the cheat's custom Function."""
    return robust(cheat, pgd(cheat.net, x, y, xent), x, y)


def _bpda(cheat, natural, x, y):
    return robust(cheat, pgd(Quantized(natural, bpda=True), x, y, xent), x, y)


CHEATS = [
    Cheat(
        "quantized", "natural model, input rounded to 4 grey levels", lambda n, r: Quantized(n), _bpda, "BPDA PGD-50"
    ),
    Cheat(
        "saturated",
        "natural model, logits x 1000",
        lambda n, r: Saturated(n),
        lambda c, n, x, y: robust(c, pgd(c, x, y, margin), x, y),
        "margin PGD-50",
    ),
    Cheat(
        "noisy",
        "PGD-AT model, input noise sigma 0.2 at every pass",
        lambda n, r: Noisy(r, 0.2),
        lambda c, n, x, y: eot_truth(c, c, x, y),
        "EOT margin PGD-100, majority of 21",
    ),
    Cheat(
        "round_noisy",
        "natural model, rounded to 4 grey levels, then noise sigma 0.1 at every pass",
        lambda n, r: RoundNoisy(n),
        lambda c, n, x, y: eot_truth(c, RoundNoisy(n, bpda=True), x, y),
        "BPDA + EOT margin PGD-100, majority of 21",
    ),
    Cheat(
        "straight_through",
        "natural model, the rounding as a custom autograd.Function, identity backward",
        lambda n, r: Wrapped(n, StraightThrough),
        _bpda,
        "BPDA PGD-50",
    ),
    Cheat(
        "reversed",
        "natural model behind an identity custom Function whose backward is reversed",
        lambda n, r: Wrapped(n, Reversed),
        lambda c, n, x, y: robust(c, pgd(n, x, y, xent), x, y),
        "PGD-50 on the network behind it",
    ),
    Cheat(
        "reversed_robust",
        "PGD-AT model behind an identity custom Function whose backward is reversed",
        lambda n, r: Wrapped(r, Reversed),
        _behind,
        "PGD-50 on the network behind it",
    ),
    Cheat(
        "reversed_over_16",
        "natural model behind an identity custom Function whose backward is reversed for batches over 16",
        lambda n, r: Wrapped(n, ReversedOver16),
        _behind,
        "PGD-50 on the network behind it",
    ),
    Cheat(
        "resize_pad",
        "natural model, random resize to 6-8 pixels and pad at every pass",
        lambda n, r: ResizePad(n),
        lambda c, n, x, y: eot_truth(c, c, x, y),
        "EOT margin PGD-100, majority of 21",
    ),
    Cheat(
        "sap",
        "natural model, stochastic activation pruning",
        lambda n, r: SAP(n),
        lambda c, n, x, y: eot_truth(c, c, x, y),
        "EOT margin PGD-100, majority of 21",
    ),
    Cheat(
        "staircase",
        "natural model, ReLU outputs rounded to steps of 1/4",
        lambda n, r: Staircase(n),
        lambda c, n, x, y: robust(c, pgd(Staircase(n, bpda=True), x, y, xent), x, y),
        "BPDA (ReLU) PGD-50 at every activation",
    ),
]
"""The zoo, by name (`tests/test_cheaters.py`, `benchmarks/cheating_zoo.py`)."""
BY_NAME = {c.name: c for c in CHEATS}
