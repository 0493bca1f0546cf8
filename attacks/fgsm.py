"""FGSM: the fast gradient sign method (Goodfellow et al., 2015).

One signed-gradient step of size eps on the cross-entropy, L-inf, no random start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from bench.plugin import LOSSES, Crafted, Role, one_of, radius, register_attack


@dataclass(frozen=True)
class FGSM:
    role: ClassVar[Role] = Role.ONE_STEP
    """One gradient step: what the iterative attacks are compared with."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    loss: str = "xent"
    """Objective: `xent` (cross-entropy) or `cw` (Carlini-Wagner margin)."""

    def with_threat(self, threat) -> FGSM:
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"

    def __post_init__(self):
        one_of("loss", self.loss, LOSSES)
        radius("eps", self.eps, "linf")


@register_attack("fgsm", config=FGSM)
def perturb(model, x, y, cfg: FGSM, *, generator=None) -> Crafted:
    """x + eps * sign(grad_x loss), clipped to [0, 1]."""
    x_adv = x.clone().requires_grad_(True)
    loss = LOSSES[cfg.loss](model(x_adv), y).sum()
    (grad,) = torch.autograd.grad(loss, x_adv)
    return Crafted((x + cfg.eps * grad.sign()).clamp_(0.0, 1.0).detach())
