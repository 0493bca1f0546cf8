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
is misclassified (a margin above zero), which then is the returned adversary. On digits
a cell may run on a seeded subset of the test set with fewer samples; both are in its
key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from bench.plugin import at_least, cw_margin, positive, radius, register_attack


@dataclass(frozen=True)
class SPSA:
    queries_only: ClassVar[bool] = True
    """Reads only the model's outputs: on a randomized model its own averaging over
    directions faces the noise, with no EOT wrapper around the model (bench.science.adaptive)."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    iterations: int = 100
    """Adam steps at most (Uesato et al.: 100)."""
    samples: int = 8192
    """Model evaluations per iteration: samples / 2 Rademacher directions, each
    evaluated at +delta and -delta (Uesato et al.'s batch of 8192). Even."""
    lr: float = 0.01
    """Adam learning rate."""
    delta: float = 0.01
    """Finite-difference radius of the perturbations."""
    max_batch: int = field(default=16384, metadata={"key": False})
    """Most inputs in one forward pass; bounds memory, changes no result."""

    def __post_init__(self):
        radius("eps", self.eps, "linf")
        at_least("iterations", self.iterations, 1)
        at_least("samples", self.samples, 2)
        if self.samples % 2:
            raise ValueError(f"samples must be a positive even number (antithetic pairs), got {self.samples!r}")
        positive("lr", self.lr)
        positive("delta", self.delta)
        at_least("max_batch", self.max_batch, 1)
        if self.max_batch < self.samples:
            raise ValueError(f"max_batch ({self.max_batch}) must hold one image's samples ({self.samples})")

    def with_threat(self, threat) -> "SPSA":
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


# Adam's moment decay rates and denominator guard, as in Kingma & Ba (and CleverHans).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _spsa_gradient(model, x, y, cfg: SPSA, generator) -> torch.Tensor:
    """The SPSA estimate of grad_x margin(model(x), y), one per sample."""
    pairs = cfg.samples // 2
    per_chunk = max(1, cfg.max_batch // cfg.samples)
    grads = []
    for i in range(0, len(x), per_chunk):
        xc, yc = x[i:i + per_chunk], y[i:i + per_chunk]
        n = len(xc)
        v = torch.randint(0, 2, (n, pairs, *x.shape[1:]), generator=generator, device=x.device)
        v = v.to(x.dtype).mul_(2).sub_(1)
        # Both signs in one forward pass: (n, 2, pairs, ...) -> (n * samples, ...).
        # The probes are not clipped to [0, 1]: the estimate is of the model's loss
        # around x_adv, and clipping would bias it at the box edges.
        probes = xc[:, None, None] + cfg.delta * torch.stack((v, -v), 1)
        losses = cw_margin(model(probes.flatten(0, 2)), yc.repeat_interleave(cfg.samples))
        losses = losses.view(n, 2, pairs)
        diff = (losses[:, 0] - losses[:, 1]) / (2 * cfg.delta)
        grads.append((diff.view(n, pairs, *([1] * (x.dim() - 1))) * v).mean(1))
    return torch.cat(grads)


@register_attack("spsa", config=SPSA)
def perturb(model, x, y, cfg: SPSA, *, generator=None):
    """Gradient-free L-inf attack: SPSA gradient estimates, Adam, projection, early stop."""
    # Finite differences over delta = 0.01 need fp32: under a caller's bf16 autocast
    # (about three significant digits) f+ - f- would be rounding noise.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return _spsa(model, x.float(), y, cfg, generator).to(x.dtype)


def _spsa(model, x, y, cfg: SPSA, generator) -> torch.Tensor:
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
        g = _spsa_gradient(model, x_adv[idx], y[idx], cfg, generator)
        m[idx] = _BETA1 * m[idx] + (1 - _BETA1) * g
        v[idx] = _BETA2 * v[idx] + (1 - _BETA2) * g * g
        step = cfg.lr * (m[idx] / (1 - _BETA1 ** t)) / ((v[idx] / (1 - _BETA2 ** t)).sqrt() + _ADAM_EPS)
        xs = x[idx]
        moved = torch.min(torch.max(x_adv[idx] + step, xs - cfg.eps), xs + cfg.eps)
        x_adv[idx] = moved.clamp_(0, 1)
    return best
