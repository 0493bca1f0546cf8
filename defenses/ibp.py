"""Interval bound propagation training (Gowal et al., 2018): a verification-friendly
defense.

loss = kappa CE(f(x), y) + (1 - kappa) CE(z_hat(x, eps_t), y)
where z_hat holds, for the true class, the lower interval bound of its logit over the
eps_t-ball and, for every other class, the upper bound of its logit: the logits of the
worst case the intervals allow. Training starts naturally (eps_t = 0, kappa = 1) for a
warm-up, then ramps eps_t linearly up to the training radius and kappa down to
kappa_end, and holds them for the rest (Gowal et al.: kappa from 1 to 0.5, a training
radius above the test radius, e.g. 0.4 for 0.3 on MNIST). Networks trained so have
tight interval and linear bounds, which is what lets the verifier decide them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.plugin import ibp_bounds, in_range, positive, register_defense


@dataclass(frozen=True)
class IBP:
    eps_scale: float = 1.1
    """Training radius as a multiple of the threat model's eps (Gowal et al. train above it)."""
    warmup: float = 0.1
    """Fraction of the training steps trained naturally (eps_t = 0, kappa = 1)."""
    rampup: float = 0.5
    """Fraction of the training steps, after the warm-up, over which eps_t and kappa ramp."""
    kappa_end: float = 0.5
    """Weight of the natural loss once ramped (Gowal et al.'s 0.5)."""

    def __post_init__(self):
        positive("eps_scale", self.eps_scale)
        in_range("warmup", self.warmup, 0, 1)
        in_range("rampup", self.rampup, 0, 1)
        in_range("kappa_end", self.kappa_end, 0, 1)
        if self.warmup + self.rampup > 1:
            raise ValueError(f"warmup + rampup must be at most 1, got {self.warmup + self.rampup:g}")


def schedule(cfg: IBP, progress: float) -> float:
    """How far along the ramp training is: 0 during the warm-up, 1 once ramped."""
    if progress < cfg.warmup:
        return 0.0
    return 1.0 if cfg.rampup == 0 else min(1.0, (progress - cfg.warmup) / cfg.rampup)


def worst_logits(lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The true class's lower bound, every other class's upper bound."""
    return hi.scatter(1, y[:, None], lo.gather(1, y[:, None]))


@register_defense("ibp", config=IBP)
def loss(model, x, y, cfg: IBP, ctx):
    """Natural cross-entropy mixed with the cross-entropy of the interval worst case."""
    ramp = schedule(cfg, ctx.step / max(ctx.total_steps, 1))
    natural = F.cross_entropy(model(x), y)
    if ramp == 0:
        return natural
    kappa = 1 - ramp * (1 - cfg.kappa_end)
    lo, hi = ibp_bounds(model, x, ramp * cfg.eps_scale * ctx.threat.eps)
    return kappa * natural + (1 - kappa) * F.cross_entropy(worst_logits(lo, hi, y), y)
