"""The threat model, enforced by the harness: every crafted batch must lie in the cell's
ball around its clean inputs and in [0, 1], whatever the attack plugin did.

A NaN or an infinity is outside every ball: min and max skip NaN's comparisons, and the
argmax of NaN logits would count as a break, so a batch holding one fails its cell first.

The ball is the cell config's own (`eps`, `norm`), else the one its threat key names
(`linf-0.2`, `l2-1`, `unbounded-0.4`: an L-inf ball). Tolerances are for fp32 rounding
only: a projection computes x - eps and x + eps in fp32, which round by at most half an
ulp of 1.0 (6e-8), and an L2 projection rescales by eps / ||delta||, off by a few ulps
relative. LINF_TOLERANCE (1e-6, some 16 such roundings) and L2_RELATIVE (1e-5) admit that
and nothing an attack could use: the smallest pixel step of an 8-bit image is 3.9e-3.
"""

from __future__ import annotations

import torch

from bench.core import contract
from bench.core.cells import Cell

LINF_TOLERANCE = 1e-6
"""Largest |x_adv - x| beyond eps that fp32 rounding explains (pixel units)."""
L2_RELATIVE = 1e-5
"""Largest ||x_adv - x||_2 beyond eps that fp32 rounding explains, relative to eps."""


class BudgetError(RuntimeError):
    """An attack returned inputs outside its threat model: its cell fails."""


def ball(cell: Cell) -> tuple[str, float]:
    """(norm, eps) of the cell's threat model."""
    kind, _, value = cell.threat.partition("-")
    declared = contract.hooks(cell.config)
    norm = declared.norm or ("l2" if kind == "l2" else "linf")
    eps = declared.eps
    return norm, float(eps if eps is not None else value)


def check_budget(cell: Cell, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Raise BudgetError, naming the attack and its largest violation, if any x_adv is not
    finite or leaves [0, 1] or the cell's ball around x."""
    bad = int((~torch.isfinite(x_adv)).sum())
    if bad:
        raise BudgetError(
            f"attack {cell.attack!r} returned {bad} non-finite value{'' if bad == 1 else 's'} "
            f"(NaN or inf) in its inputs; its cell fails"
        )
    low, high = float(x_adv.min()), float(x_adv.max())
    if low < 0 or high > 1:
        raise BudgetError(
            f"attack {cell.attack!r} returned inputs outside [0, 1] (min {low:.6g}, max {high:.6g}); its cell fails"
        )
    norm, eps = ball(cell)
    delta = (x_adv.float() - x.float()).flatten(1)
    if norm == "l2":
        worst = float(delta.norm(dim=1).max()) if len(delta) else 0.0
        if worst > eps * (1 + L2_RELATIVE):
            raise BudgetError(
                f"attack {cell.attack!r} left the L2 ball of radius {eps:g}: largest "
                f"||x_adv - x||_2 is {worst:.6g}; its cell fails"
            )
        return
    worst = float(delta.abs().max()) if delta.numel() else 0.0
    if worst > eps + LINF_TOLERANCE:
        raise BudgetError(
            f"attack {cell.attack!r} left the L-inf ball of radius {eps:g}: largest "
            f"|x_adv - x| is {worst:.6g}; its cell fails"
        )
