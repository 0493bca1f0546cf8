"""Multi-targeted PGD (Gowal et al., 2019, "An alternative surrogate loss for PGD-based
adversarial testing"), L-inf.

For each of the `targets` wrong classes with the highest clean logits, in that order,
L-inf PGD ascends the targeted margin z_t - z_y (the logit of target t over the true
one) from a random start in the eps-ball, with sign steps of `step_size` and the
projection onto the ball and [0, 1]. Untargeted PGD follows the gradient of whichever
wrong class is nearest now and can stall between two; one run per target follows each
direction to its end, which the paper finds stronger than untargeted PGD.

As the bench's PGD (attacks.pgd.run_pgd) does: every iterate is checked (the start and
the last one too), a sample counts as broken at the first iterate that misclassifies it
(towards any class), keeps that iterate and leaves the batch, and each later target
runs only on the samples earlier ones left standing. A sample nothing breaks keeps the
iterate of highest Carlini-Wagner margin over all targets. The step is fixed (the
threat model's L-inf step unless set), as in the bench's fixed-step PGD cells, so that
this cell differs from them by its targets alone.

The loop is written here rather than borrowed from attacks.pgd: run_pgd takes its
objective by name from a fixed table with the true label, and the targeted margin needs
a second label per sample. Under low-precision autocast (the bench's GPU fast path) a
hit near the decision boundary is confirmed in true fp32 before it is final, with the
band attacks.pgd measured for bf16 (attacks.pgd.BAND), so rounding can neither end a
sample's attack early nor hide a break.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from attacks.pgd import BAND
from bench.plugin import Crafted, Role, at_least, cw_margin, full_fp32, positive, radius, register_attack


@dataclass(frozen=True)
class MultiTargeted:
    role: ClassVar[Role] = Role.ITERATIVE
    """An iterative white-box gradient attack: the masking checks' reference."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    steps: int = 100
    """Gradient steps per target class."""
    step_size: float | None = None
    """Fixed sign-step length; unset means the threat model's L-inf PGD step."""
    targets: int = 9
    """Wrong classes attacked, by clean logit from the highest down (all of them on a
    10-class dataset); at most the number of classes less one are attacked."""
    random_start: bool = True
    """Start each target's run from a random point of the ball rather than from x."""

    def __post_init__(self):
        radius("eps", self.eps, "linf")
        at_least("steps", self.steps, 1)
        at_least("targets", self.targets, 1)
        if self.step_size is not None:
            positive("step_size", self.step_size)

    def with_threat(self, threat) -> MultiTargeted:
        eps = self.eps if self.eps is not None else threat.eps
        return replace(self, eps=eps, step_size=self.step_size if self.step_size is not None else threat.step_for(eps))

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


def _hits(model, x_adv, y, logits) -> torch.Tensor:
    """Misclassified samples; under autocast, every sample within BAND of the boundary
    is decided again by a forward pass in true fp32 (autocast and TF32 off)."""
    hit = logits.argmax(1) != y
    if not torch.is_autocast_enabled(x_adv.device.type):
        return hit
    z = logits.float()
    near = (cw_margin(z, y) >= -BAND * z.abs().amax(1)).nonzero().squeeze(1)
    if len(near):
        with torch.autocast(x_adv.device.type, enabled=False), full_fp32():
            hit[near] = model(x_adv[near]).argmax(1) != y[near]
    return hit


def run_multitargeted(model, x, y, cfg: MultiTargeted, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, broken) for one batch, broken a bool per sample."""
    n = len(x)
    with torch.no_grad():
        clean = model(x).float()
    k = min(cfg.targets, clean.shape[1] - 1)
    # The wrong classes by clean logit, highest first (the label itself sorts last).
    order = clean.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :k]
    lo, hi = (x - cfg.eps).clamp(min=0), (x + cfg.eps).clamp(max=1)
    best = x.clone()
    best_margin = torch.full((n,), float("-inf"), device=x.device)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    for j in range(k):
        # Every target draws its start for the whole batch, so the random stream (and so
        # each sample's result) does not depend on what earlier targets broke.
        if cfg.random_start:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            start = (x + (2 * u - 1) * cfg.eps).clamp(0, 1)
        else:
            start = x
        idx = (~broken).nonzero().squeeze(1)
        ys, ts, low, high, x_adv = y[idx], order[idx, j : j + 1], lo[idx], hi[idx], start[idx].clone()
        for step in range(cfg.steps + 1):
            if len(idx) == 0:
                break
            last = step == cfg.steps
            with torch.enable_grad() if not last else torch.no_grad():
                x_adv.requires_grad_(not last)
                logits = model(x_adv)
                if not last:
                    gain = logits.gather(1, ts).squeeze(1) - logits.gather(1, ys[:, None]).squeeze(1)
                    (grad,) = torch.autograd.grad(gain.float().sum(), x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach()
                hit = _hits(model, x_adv, ys, logits)
                margin = cw_margin(logits.float(), ys)
                better = ~hit & (margin > best_margin[idx])
                take = hit | better
                best[idx[take]] = x_adv[take]
                best_margin[idx[better]] = margin[better]
                if bool(hit.any()):  # a hit is final: that sample leaves the batch
                    broken[idx[hit]] = True
                    keep = (~hit).nonzero().squeeze(1)
                    idx, ys, ts, low, high, x_adv = idx[keep], ys[keep], ts[keep], low[keep], high[keep], x_adv[keep]
                    if not last:
                        grad = grad[keep]
                if not last and len(idx):
                    x_adv = x_adv.add_(grad.sign(), alpha=cfg.step_size).clamp_(min=low, max=high)
    return best, broken


@register_attack("multitargeted", config=MultiTargeted)
def perturb(model, x, y, cfg: MultiTargeted, *, generator=None) -> Crafted:
    """Multi-targeted L-inf PGD: `steps` sign steps of `step_size` towards each of the
    top `targets` wrong classes in turn, per-sample early stop."""
    return Crafted(run_multitargeted(model, x, y, cfg, generator)[0])
