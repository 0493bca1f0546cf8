"""Unbounded PGD: the sanity sweep of Shafahi et al. (2019), Appendix F, Table 9.

L-inf PGD whose budget grows from a multiple of the threat model's eps up to the whole
input range (eps = 1 on [0, 1] inputs, where every image is reachable). Accuracy must
fall to zero at the top of the sweep; if it does not, PGD cannot follow the model's
gradients (Athalye et al.'s sanity check) and every bounded number for that model is
suspect. The cells count toward their own threat model, `unbounded-<eps>`, so they
never enter the worst case.

Steps and step size grow with eps as in Table 9 (30 steps at eps 50/255 up to 200 steps
at 255/255): 20 steps per threat-eps of budget, at most 200, with Madry et al.'s step
of 2.5 * eps / steps. The PGD itself is attacks.pgd.run_pgd, so the sweep tests the
very code the bounded cells run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

from attacks.pgd import PGD, run_pgd
from bench.plugin import LOSSES, Crafted, Role, at_least, one_of, positive, radius, register_attack

STEPS_PER_THREAT_EPS = 20
"""The threat model's own PGD-20 at multiple 1, growing linearly with the budget."""
MAX_STEPS = 200
"""Table 9's longest run: 200 steps at the whole input range."""


@dataclass(frozen=True)
class Unbounded:
    role: ClassVar[Role] = Role.SWEEP
    """A budget sweep past the threat model: the sanity check."""
    multiple: float = field(default=32.0, metadata={"key": False})
    """eps as a multiple of the threat model's L-inf eps, capped at 1.0. Only fills an
    unset eps: the key records eps itself, so two multiples that cap at the same eps
    (16 and 32 on digits, say) are one cell."""
    eps: float | None = None
    """L-inf radius; unset means min(1, multiple * threat eps)."""
    steps: int | None = None
    """PGD steps; unset means 20 per threat-eps of budget, at most 200 (Table 9)."""
    step_size: float | None = None
    """Step length; unset means 2.5 * eps / steps."""
    loss: str = "xent"
    """Objective: `xent` (cross-entropy, as in Table 9) or `cw` (Carlini-Wagner margin)."""
    random_start: bool = True
    """Start from a uniform point of the ball."""
    early_stop: bool = field(default=True, metadata={"key": False})
    """Drop a sample from the batch once broken (speed only, as in PGD)."""

    def __post_init__(self):
        one_of("loss", self.loss, LOSSES)
        positive("multiple", self.multiple)
        radius("eps", self.eps, "linf")
        if self.steps is not None:
            at_least("steps", self.steps, 1)
        if self.step_size is not None:
            positive("step_size", self.step_size)

    def with_threat(self, threat) -> Unbounded:
        eps = self.eps if self.eps is not None else min(1.0, self.multiple * threat.eps)
        # Derived from eps, not from multiple, so equal budgets give equal cells.
        steps = self.steps or min(MAX_STEPS, math.ceil(STEPS_PER_THREAT_EPS * eps / threat.eps - 1e-9))
        step = self.step_size if self.step_size is not None else 2.5 * eps / steps
        return replace(self, eps=eps, steps=steps, step_size=step)

    def threat_key(self) -> str:
        return f"unbounded-{self.eps:g}"

    def pgd(self) -> PGD:
        """The PGD config this cell runs."""
        return PGD(
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            loss=self.loss,
            norm="linf",
            random_start=self.random_start,
            restarts=1,
            early_stop=self.early_stop,
        )


@register_attack("unbounded", config=Unbounded)
def perturb(model, x, y, cfg: Unbounded, *, generator=None) -> Crafted:
    """L-inf PGD at a budget up to the whole input range (Shafahi et al. Table 9)."""
    return Crafted(run_pgd(model, x, y, cfg.pgd(), generator)[0])
