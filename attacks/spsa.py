"""SPSA: the gradient-free attack of Uesato et al. (2018), L-inf.

Written here from the paper: torchattacks has no SPSA, and a gradient-free attack is
the bench's main witness against gradient masking (Summers & Dinneen Table 6), so it
must not lean on model gradients anywhere. Each iteration estimates the gradient of
the margin loss (best wrong logit minus true logit) by simultaneous perturbation:
draw `samples / 2` Rademacher directions v, evaluate the loss at x_adv + delta * v and
x_adv - delta * v, and average (f+ - f-) / (2 delta) * v. Adam ascends that estimate,
and the iterate is projected back onto the eps-ball and onto [0, 1].

Uesato et al.'s settings are the defaults: Adam learning rate 0.01, delta 0.01, 8192
evaluations per iteration, up to 100 iterations, a uniform random start in the ball
(as the CleverHans reference does), and a per-sample early stop as soon as the iterate
is misclassified (a margin above zero), which then is the returned adversary. A cell
may run on a seeded subset of the test set, and with `samples_per_dim` its evaluations
per iteration scale with the input's size (2 per dimension: 128 on digits' 64 pixels,
1568 on MNIST's 784, 6144 on CIFAR's 3072), so the estimate is as good on every
dataset; both are in its key.

On a randomized model (noise drawn from torch's global generator, which the bench seeds
for the craft) the two probes of a pair see the same noise: the + probes run with the
generator forked and restored, and the - probes then draw exactly what the + probes
drew. Their difference then holds the model's slope and no noise term; evaluated with
independent noise, it would carry a noise term of size noise / delta into every pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from bench.plugin import Crafted, Role, at_least, cw_margin, non_negative, positive, radius, register_attack


@dataclass(frozen=True)
class SPSA:
    role: ClassVar[Role] = Role.GRADIENT_ESTIMATE
    """Gradients estimated from queries, compared on its own images."""
    queries_only: ClassVar[bool] = True
    """Reads only the model's outputs: on a randomized model its own averaging over
    directions faces the noise, with no EOT wrapper around the model (bench.science.adaptive)."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    iterations: int = 100
    """Adam steps at most (Uesato et al.: 100)."""
    samples: int = 8192
    """Model evaluations per iteration: samples / 2 Rademacher directions, each
    evaluated at +delta and -delta (Uesato et al.'s batch of 8192). Even. 0 (and so
    in the key) when `samples_per_dim` sets the count instead."""
    samples_per_dim: float = 0.0
    """Evaluations per input dimension: above 0, an input of d values gets
    samples = 2 * ceil(samples_per_dim * d / 2) (2 gives 128 on digits' 64 pixels);
    0 means the fixed `samples`."""
    lr: float = 0.01
    """Adam learning rate."""
    delta: float = 0.01
    """Finite-difference radius of the perturbations."""
    max_batch: int = field(default=16384, metadata={"key": False})
    """Most inputs in one forward pass; bounds memory, changes no result."""

    def __post_init__(self):
        radius("eps", self.eps, "linf")
        at_least("iterations", self.iterations, 1)
        non_negative("samples_per_dim", self.samples_per_dim)
        positive("lr", self.lr)
        positive("delta", self.delta)
        at_least("max_batch", self.max_batch, 1)
        if self.samples_per_dim > 0:
            if self.samples not in (0, SPSA.samples):
                raise ValueError(
                    f"give samples ({self.samples}) or samples_per_dim ({self.samples_per_dim:g}), not both"
                )
            # No fixed count runs, so the key says samples=0 (and parses back to this config).
            object.__setattr__(self, "samples", 0)
            return
        at_least("samples", self.samples, 2)
        if self.samples % 2:
            raise ValueError(f"samples must be a positive even number (antithetic pairs), got {self.samples!r}")
        if self.max_batch < self.samples:
            raise ValueError(f"max_batch ({self.max_batch}) must hold one image's samples ({self.samples})")

    def samples_for(self, x: torch.Tensor) -> int:
        """The evaluations per iteration that run on inputs shaped like x (N, ...)."""
        if self.samples_per_dim <= 0:
            return self.samples
        samples = 2 * math.ceil(self.samples_per_dim * x[0].numel() / 2)
        if self.max_batch < samples:
            raise ValueError(
                f"max_batch ({self.max_batch}) must hold one image's samples ({samples}: "
                f"{self.samples_per_dim:g} per dimension of {x[0].numel()})"
            )
        return samples

    def with_threat(self, threat) -> SPSA:
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


# Adam's moment decay rates and denominator guard, as in Kingma & Ba (and CleverHans).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _spsa_gradient(model, x, y, cfg: SPSA, generator, samples: int) -> torch.Tensor:
    """The SPSA estimate of grad_x margin(model(x), y), one per sample."""
    pairs = samples // 2
    per_chunk = max(1, cfg.max_batch // samples)
    devices = [x.device] if x.device.type == "cuda" else []
    grads = []
    for i in range(0, len(x), per_chunk):
        xc, yc = x[i : i + per_chunk], y[i : i + per_chunk]
        n = len(xc)
        v = torch.randint(0, 2, (n, pairs, *x.shape[1:]), generator=generator, device=x.device)
        v = v.to(x.dtype).mul_(2).sub_(1)
        # One forward pass per sign, (n, pairs, ...) -> (n * pairs, ...), under the same
        # state of torch's global generators: the + pass runs forked (its draws are then
        # undone), so the - pass draws the same noise probe for probe, and leaves the
        # generators where one pass would. A single pass over both signs would give the
        # two probes of a pair independent noise. The probes are not clipped to [0, 1]:
        # the estimate is of the model's loss around x_adv, and clipping would bias it at
        # the box edges.
        ys = yc.repeat_interleave(pairs)
        with torch.random.fork_rng(devices=devices):
            plus = cw_margin(model((xc[:, None] + cfg.delta * v).flatten(0, 1)), ys)
        minus = cw_margin(model((xc[:, None] - cfg.delta * v).flatten(0, 1)), ys)
        diff = (plus - minus).view(n, pairs) / (2 * cfg.delta)
        grads.append((diff.view(n, pairs, *([1] * (x.dim() - 1))) * v).mean(1))
    return torch.cat(grads)


@register_attack("spsa", config=SPSA)
def perturb(model, x, y, cfg: SPSA, *, generator=None) -> Crafted:
    """Gradient-free L-inf attack: SPSA gradient estimates, Adam, projection, early stop."""
    # Finite differences over delta = 0.01 need fp32: under a caller's bf16 autocast
    # (about three significant digits) f+ - f- would be rounding noise.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return Crafted(_spsa(model, x.float(), y, cfg, generator).to(x.dtype))


def _spsa(model, x, y, cfg: SPSA, generator) -> torch.Tensor:
    samples = cfg.samples_for(x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * u - 1) * cfg.eps).clamp_(0, 1)
    best = x_adv.clone()
    idx = torch.arange(len(x), device=x.device)  # samples still unbroken
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t in range(1, cfg.iterations + 2):
        # Early stop: a sample misclassified at this iterate is done, and keeps it.
        hit = model(x_adv[idx]).argmax(1) != y[idx]
        best[idx] = x_adv[idx]
        idx = idx[~hit]
        if len(idx) == 0 or t > cfg.iterations:
            break
        g = _spsa_gradient(model, x_adv[idx], y[idx], cfg, generator, samples)
        m[idx] = _BETA1 * m[idx] + (1 - _BETA1) * g
        v[idx] = _BETA2 * v[idx] + (1 - _BETA2) * g * g
        step = cfg.lr * (m[idx] / (1 - _BETA1**t)) / ((v[idx] / (1 - _BETA2**t)).sqrt() + _ADAM_EPS)
        xs = x[idx]
        moved = torch.min(torch.max(x_adv[idx] + step, xs - cfg.eps), xs + cfg.eps)
        x_adv[idx] = moved.clamp_(0, 1)
    return best
