"""The model's side of verification: the fp32 box every counterexample must lie in, the
check that a point really is one (the model itself, in true fp32), and the cheap seeded
PGD search on the CW margin that settles most non-robust images before any MILP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.engine.device import full_fp32


@dataclass(frozen=True)
class SearchConfig:
    """A deliberately cheap attack: it only has to find the easy counterexamples, the MILP
    finds the rest (and proves the others robust)."""

    steps: int = 40
    """Sign-gradient steps per restart (0: only the starts are tried)."""
    restarts: int = 3
    """Run as one batch; the first starts at the clean image, the others uniformly in the box."""
    step_factor: float = 2.5
    """Step size is step_factor * eps / steps (Madry et al.'s rule: the walk can cross the box)."""
    seed: int = 0
    """The generator of image i is seeded with seed * 1_000_003 + i."""


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def box32(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box [max(x - eps, 0), min(x + eps, 1)] in float32, rounded inward, so any float32
    point between the two lies in the exact (float64) box too."""
    x64 = x.detach().double()
    lo64, hi64 = (x64 - eps).clamp(0, 1), (x64 + eps).clamp(0, 1)
    lo, hi = lo64.float(), hi64.float()
    lo = torch.where(lo.double() < lo64, torch.nextafter(lo, torch.full_like(lo, 2.0)), lo)
    hi = torch.where(hi.double() > hi64, torch.nextafter(hi, torch.full_like(hi, -1.0)), hi)
    return lo, hi


def misclassified(model: torch.nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    """Per row of x (n, ...): does the model, in true fp32, predict something other than y?"""
    with full_fp32(), torch.no_grad():
        return model(x.to(model_device(model), torch.float32)).argmax(1).cpu() != y


def reproduce(
    model: torch.nn.Module, point: torch.Tensor, y: int, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor | None:
    """`point` clamped into the float32 box, if the model misclassifies it there; else None."""
    x = torch.maximum(torch.minimum(point.detach().float().reshape(lo.shape), hi), lo)
    return x[0].clone() if bool(misclassified(model, x, y)[0]) else None


def pgd_search(
    model: torch.nn.Module, x: torch.Tensor, y: int, eps: float, index: int, cfg: SearchConfig = SearchConfig()
) -> torch.Tensor | None:
    """A reproduced counterexample for one image x (1, C, H, W) inside its box, or None.
    Minimizes z_y - max_{j != y} z_j with sign steps from `cfg.restarts` starts at once."""
    if eps <= 0:
        return None
    dev = model_device(model)
    lo, hi = box32(x, eps)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    start = lo + (hi - lo) * torch.rand((cfg.restarts, *x.shape[1:]), generator=gen)
    start[0] = x[0]
    lo_d, hi_d, xs = lo.to(dev), hi.to(dev), start.to(dev)
    step = cfg.step_factor * eps / max(cfg.steps, 1)
    for _ in range(cfg.steps + 1):
        xs = xs.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xs)
            others = z.clone()
            others[:, y] = float("-inf")
            margin = z[:, y] - others.amax(1)
        hits = torch.nonzero(margin.detach() < 0).flatten()
        for h in hits.tolist():
            found = reproduce(model, xs[h : h + 1].detach().cpu(), y, lo, hi)
            if found is not None:
                return found
        (grad,) = torch.autograd.grad(margin.sum(), xs)
        xs = torch.maximum(torch.minimum(xs.detach() - step * grad.sign(), hi_d), lo_d)
    return None
