"""PGD: projected gradient descent (Madry et al., 2018), L-inf or L2.

Ascends the cross-entropy or the Carlini-Wagner margin from a uniform random start in
the eps-ball (or from x itself), projecting back onto the ball and onto [0, 1] after
each step. L-inf steps move by step_size * sign(grad); L2 steps by step_size along the
normalized gradient.

Two things make it stronger and faster than a textbook loop, never weaker:
- a sample counts as broken at the first iterate that misclassifies it; that iterate is
  kept and the sample leaves the working batch (no more forward or backward passes on
  it), which is the per-sample early stop;
- with restarts > 1, every restart runs only on the samples no earlier restart broke,
  and each sample keeps the adversary of highest loss among unbroken ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attacks._losses import LOSSES
from bench.registry import register_attack


@dataclass(frozen=True)
class PGD:
    eps: float | None = None
    """Radius of the ball; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    steps: int = 20
    """Gradient steps per restart."""
    step_size: float | None = None
    """Step length; unset means the threat model's L-inf step, or 2.5 * eps / steps for L2."""
    loss: str = "xent"
    """Objective: `xent` (cross-entropy) or `cw` (Carlini-Wagner margin)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    random_start: bool = True
    """Start from a uniform point of the ball (Madry et al.) rather than from x."""
    restarts: int = 1
    """Independent random starts; each sample keeps its best."""
    early_stop: bool = field(default=True, metadata={"key": False})
    """Drop a sample from the batch once broken. Changes speed, never results, so it is
    left out of the cell key; off gives equal work for benchmarks."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("steps and restarts must be at least 1")

    def with_threat(self, threat) -> "PGD":
        eps = self.eps if self.eps is not None else (threat.eps if self.norm == "linf" else threat.l2_eps)
        step = self.step_size
        if step is None:
            step = threat.step_size if self.norm == "linf" else 2.5 * eps / self.steps
        return replace(self, eps=eps, step_size=step)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x, cfg: PGD, generator):
    if not cfg.random_start:
        return x.clone()
    if cfg.norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + (2 * u - 1) * cfg.eps).clamp_(0, 1)
    # Uniform in the L2 ball: a Gaussian direction scaled by radius * U^(1/d).
    d = x[0].numel()
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return (x + g / _l2(g) * cfg.eps * r ** (1.0 / d)).clamp_(0, 1)


def _step(x_adv, x, grad, cfg: PGD):
    if cfg.norm == "linf":
        x_adv = x_adv + cfg.step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps)
    else:
        x_adv = x_adv + cfg.step_size * grad / _l2(grad)
        delta = x_adv - x
        delta = delta * torch.clamp(cfg.eps / _l2(delta), max=1.0)
        x_adv = x + delta
    return x_adv.clamp_(0, 1)


def run_pgd(model, x, y, cfg: PGD, generator=None):
    """PGD over one batch; returns (x_adv, broken) with broken a bool per sample."""
    loss_fn = LOSSES[cfg.loss]
    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(cfg.restarts):
        idx = (~broken).nonzero().squeeze(1) if cfg.early_stop else torch.arange(len(x), device=x.device)
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]
        # Draw the start for the whole batch and then subset, so the random stream and
        # hence every result are the same with early stop on or off.
        x_adv = _random_start(x, cfg, generator)[idx]
        for step in range(cfg.steps + 1):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            losses = loss_fn(logits, ys)
            last = step == cfg.steps
            if not last:
                (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            with torch.no_grad():
                hit = logits.argmax(1) != ys
                # A hit is final: keep that iterate. Among misses keep the highest loss.
                newly = hit & ~broken[idx]
                better = ~hit & ~broken[idx] & (losses > best_loss[idx])
                take = newly | better
                best[idx[take]] = x_adv[take].detach()
                best_loss[idx[better]] = losses[better].detach()
                broken[idx[newly]] = True
                if last:
                    break
                x_adv = x_adv.detach()
                if cfg.early_stop and hit.any():
                    keep = ~hit
                    idx, xs, ys, x_adv, grad = idx[keep], xs[keep], ys[keep], x_adv[keep], grad[keep]
                    if len(idx) == 0:
                        break
                x_adv = _step(x_adv, xs, grad, cfg)
    return best, broken


@register_attack("pgd", config=PGD)
def perturb(model, x, y, cfg: PGD, *, generator=None):
    """L-inf or L2 PGD with random start, restarts and per-sample early stop."""
    return run_pgd(model, x, y, cfg, generator)[0]
