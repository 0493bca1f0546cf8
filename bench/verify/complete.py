"""The complete verifier: per image, the clean check, CROWN, a seeded PGD search, then
either branch and bound (bab.py: chains of affine ops and ReLUs with at least
BaBConfig.min_unstable unstable ReLUs) or LP tightening and one MILP per open target
class (bench.verify.milp's encoding on HiGHS), each image's answer a `Verdict`.

"Robust" is a claim about the model as it runs, in fp32: every exit that concludes it
needs each target's proven margin to exceed that pair's fp32 tolerance, and the graph is
first held to the model on points of each box (faithful.py). CROWN and branch and bound
bound the model's fp32 margin directly, the graph perturbed by each op's local rounding
(bounds.py, rounding.local_radii): CROWN's bound B0 must exceed SAFETY T, T the
perturbations' worst case on that margin, and a BaB domain's bound, with the
perturbations (times SAFETY) inside, must exceed 0. The LP tightening and the MILP are
about the graph in exact arithmetic (their bounds hold for the exact values only), so
they compare with rounding.py's tolerance SAFETY (E_y + E_j), which bounds how far the
fp32 logits are from the exact ones; a target proven either way is proven. "Not robust" always comes with a point the model itself
misclassifies in fp32, so it needs no tolerance."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bench.engine.device import frozen
from bench.verify.alpha import Chain, chain_of
from bench.verify.bab import BaBConfig, Problem, branch_and_bound, root_bounds
from bench.verify.bounds import Bounds, box, crown_bounds, fp32_margins, fp32_tolerance, target_margins
from bench.verify.faithful import check_box
from bench.verify.graph import Graph
from bench.verify.milp import (
    MILP_PAD,
    MIN_SOLVE,
    Program,
    build,
    finite_bounds,
    numpy_bounds,
    tighten,
    to_numpy,
    unstable_count,
)
from bench.verify.rounding import SAFETY, fp32_error, local_radii, margin_tolerance
from bench.verify.search import SearchConfig, box32, misclassified, model_device, pgd_search, reproduce

TIE = 1e-4
"""A MILP point is float64 and the model's input fp32: rounding the point moves the margin
a little, so a target whose MILP point does not reproduce is solved again asking for
margin <= -(TIE + tol) (see `verify_images`)."""
STATUSES = ("robust", "not_robust", "unknown")
DECIDERS = ("clean", "bound", "search", "milp", "bab", "timeout")
DEFAULT_SEARCH = SearchConfig()
"""The attack search before the MILP when a caller names none (frozen: one instance serves every call)."""
DEFAULT_BAB = BaBConfig()
"""Branch and bound for chains with many unstable ReLUs, when a caller names no config."""


@dataclass(frozen=True)
class Verdict:
    status: str
    """robust, not_robust or unknown."""
    x_adv: torch.Tensor | None
    """A counterexample (one input's shape, float32) the model misclassifies, for not_robust."""
    seconds: float
    unstable: int
    """ReLUs whose input bounds straddle 0 (after tightening, when it ran)."""
    binaries: int
    """Binary variables of the MILP; 0 if it never ran."""
    decided_by: str
    """clean, bound (CROWN), search (PGD), milp (tightening or the MILP), bab (branch and
    bound: its bounds, or a counterexample found in a subdomain), timeout."""
    lower: float
    """Best proven lower bound on min_{j != y} z_y - z_j over the box, for the graph in exact
    arithmetic (-inf if none)."""
    tolerance: float = 0.0
    """The largest fp32 tolerance a target's margin had to exceed: SAFETY T of CROWN's
    bound (bounds.fp32_margins) where CROWN, the search or branch and bound decided,
    rounding.py's SAFETY (E_y + E_j) of the targets left to the MILP path where it ran;
    0 where no bound was computed."""


def _margin_row(n_vars: int, out: int, y: int, j: int) -> np.ndarray:
    c = np.zeros(n_vars)
    c[out + y], c[out + j] = 1.0, -1.0
    return c


def verify_one(
    g: Graph,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: int,
    eps: float,
    time_limit: float,
    index: int,
    cfg: SearchConfig = DEFAULT_SEARCH,
    bab: BaBConfig | None = DEFAULT_BAB,
) -> Verdict:
    """The verdict for one image x (C, H, W); see `verify_images`."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    xb = x[None].detach().float().cpu()

    tol = torch.zeros(g.num_classes, dtype=torch.float64)

    def verdict(status, by, lower, x_adv=None, unstable=0, binaries=0):
        return Verdict(status, x_adv, time.perf_counter() - t0, unstable, binaries, by, float(lower), float(tol.max()))

    if bool(misclassified(model, xb, y)[0]):
        return verdict("not_robust", "clean", -np.inf, x_adv=xb[0].clone())
    lo, hi = box(xb, eps)
    yt = torch.tensor([y])
    bounds = crown_bounds(g, lo, hi)  # on the fp32 values (and the exact ones)
    low, pert = fp32_margins(g, lo, hi, yt, bounds)
    low, tol = low[0], fp32_tolerance(pert)[0]
    if bool((low > tol).all()):
        return verdict("robust", "bound", low.min(), unstable=unstable_count(g, bounds))
    found = pgd_search(model, xb, y, eps, index, cfg)
    if found is not None:
        return verdict("not_robust", "search", low.min(), x_adv=found, unstable=unstable_count(g, bounds))
    chain = chain_of(g) if bab is not None else None
    if bab is not None and chain is not None and unstable_count(g, bounds) >= bab.min_unstable:
        radii = local_radii(g, lo, hi, bounds)
        scaled = ([SAFETY * radii[k] for k in chain.relus], SAFETY * radii[g.output][0])
        problem = Problem(chain, lo[0], hi[0], _layer_bounds(chain, bounds), model, y, box32(xb, eps), scaled)
        problem = problem.to(model_device(model))  # the bounds above are the CPU's; the search runs beside the model
        status, by, adv = _branch_and_bound(problem, low, tol, bab, deadline)
        return verdict(status, by, low.min(), x_adv=adv, unstable=unstable_count(g, bounds))
    # From here on the bounds are the exact graph's (an LP-tightened bound holds for the
    # exact values only), so the tolerance is rounding.py's E; the targets CROWN already
    # proved for the fp32 model stay proven.
    done = low > tol
    now = time.perf_counter()
    bounds = tighten(g, lo, hi, bounds, now + 0.5 * (deadline - now))
    low = torch.maximum(low, target_margins(g, lo, hi, yt, bounds)[0])
    tol = torch.where(done, 0.0, margin_tolerance(fp32_error(g, lo, hi, bounds), yt)[0])
    unstable = unstable_count(g, bounds)
    if bool((done | (low > tol)).all()):
        return verdict("robust", "milp", low.min(), unstable=unstable)
    full = finite_bounds(g, lo, hi, bounds)
    prog = build(g, to_numpy(lo[0]), to_numpy(hi[0]), numpy_bounds(full))
    scale = float(torch.maximum(full[g.output][0].abs(), full[g.output][1].abs()).max())
    status, by, adv = _solve_targets(
        prog, g, model, xb, y, eps, low, tol, MILP_PAD * (1 + scale), deadline, index, done
    )
    return verdict(status, by, low.min(), x_adv=adv, unstable=unstable, binaries=prog.binaries)


def _layer_bounds(chain: Chain, bounds: Bounds) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [bounds[k][0] for k in chain.relus], [bounds[k][1] for k in chain.relus]


def _branch_and_bound(
    p: Problem, low: torch.Tensor, tol: torch.Tensor, cfg: BaBConfig, deadline: float
) -> tuple[str, str, torch.Tensor | None]:
    """(status, decided_by, x_adv) from alpha-CROWN on every open target at once (those
    whose CROWN bound `low` is not beyond `tol`), then branch and bound on each target
    still open, the lowest bound first (a not robust image is most likely settled there,
    and one unknown target makes the image unknown anyway). With `p.radii` (the fp32
    model's perturbations, times SAFETY, inside every bound) a domain is done once its
    bound exceeds 0; without, once it exceeds tol_j. `low` is raised in place to each
    target's proven bound (a perturbed bound is one of the exact margin too)."""
    targets = [j for j in torch.argsort(low - tol).tolist() if low[j] <= tol[j]]
    need = torch.zeros_like(tol) if p.radii is not None else tol
    start = root_bounds(p, targets, cfg, deadline, need[targets])
    for r, j in enumerate(targets):
        low[j] = max(float(low[j]), float(start.result.bound[r]))
    for r in torch.argsort(start.result.bound.cpu() - need[targets]).tolist():
        j = targets[r]
        out = branch_and_bound(p, j, float(need[j]), start, r, cfg, deadline)
        low[j] = max(float(low[j]), out.lower)
        if out.status == "not_robust":
            return "not_robust", "bab", out.x_adv
        if out.status == "unknown":
            return "unknown", "timeout" if time.perf_counter() >= deadline else "bab", None
    return "robust", "bab", None


def _solve_targets(
    prog: Program,
    g: Graph,
    model,
    xb,
    y: int,
    eps: float,
    low: torch.Tensor,
    tol: torch.Tensor,
    pad: float,
    deadline: float,
    index: int,
    done: torch.Tensor | None = None,
) -> tuple[str, str, torch.Tensor | None]:
    """(status, decided_by, x_adv) from one MILP per target j that `low` (raised in
    place as targets are ruled out) leaves within its tolerance `tol`, except those
    `done` (proven already)."""
    lo32, hi32 = box32(xb, eps)
    out, d = prog.offsets[g.output], g.nodes[0].size
    tie = False
    for j in torch.argsort(low - tol).tolist():
        if low[j] > tol[j] or (done is not None and bool(done[j])):
            continue
        c = _margin_row(prog.n_vars, out, y, j)
        near = float(tol[j]) + TIE
        for cap in (float(tol[j]) + pad, -near):
            if deadline - time.perf_counter() < MIN_SOLVE:
                return "unknown", "timeout", None
            res = prog.solve(c, integer=True, time_limit=deadline - time.perf_counter(), extra=(c, -np.inf, cap))
            if res.status == 2:  # infeasible: no point of the box has margin_j <= cap (to HiGHS, hence the pad)
                low[j] = max(float(low[j]), cap - pad)
                tie = tie or cap < 0
                break
            if res.x is None:  # out of time (or HiGHS gave up) before anything was decided
                if res.mip_dual_bound is not None and np.isfinite(res.mip_dual_bound):
                    low[j] = max(float(low[j]), min(float(res.mip_dual_bound), cap) - pad)
                return "unknown", "timeout", None
            adv = reproduce(model, torch.from_numpy(res.x[:d]), y, lo32, hi32)
            if adv is not None:
                return "not_robust", "milp", adv
            if res.fun < -near or cap < 0:
                raise RuntimeError(
                    f"verify: image {index}: the MILP found margin {res.fun:.3g} against class {j} "
                    f"but the model classifies that point correctly; the encoding is wrong"
                )
    if tie:  # some margin is within TIE + tol of 0: too close to call for the model in fp32
        return "unknown", "milp", None
    return "robust", "milp", None


def exact_margins(
    g: Graph, x: torch.Tensor, y: int, eps: float, time_limit: float = 60.0
) -> tuple[torch.Tensor, list[np.ndarray | None]]:
    """min over the box of z_y - z_j for each j (+inf at y; nan where HiGHS did not reach
    optimality), by MILP without any cap, and the minimizing inputs: a check of the
    encoding against brute force on tiny networks."""
    lo, hi = box(x[None].float(), eps)
    bounds = crown_bounds(g, lo, hi, fp32=False)  # the exact graph's: the tightest that hold for it
    prog = build(g, to_numpy(lo[0]), to_numpy(hi[0]), numpy_bounds(bounds))
    values, points = torch.full((g.num_classes,), float("inf"), dtype=torch.float64), []
    for j in range(g.num_classes):
        if j == y:
            points.append(None)
            continue
        res = prog.solve(_margin_row(prog.n_vars, prog.offsets[g.output], y, j), integer=True, time_limit=time_limit)
        values[j] = res.fun if res.status == 0 else float("nan")
        points.append(res.x[: g.nodes[0].size] if res.x is not None else None)
    return values, points


def verify_images(
    g: Graph,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    time_limit: float = 10.0,
    on_image: Callable[[int], None] | None = None,
    search: SearchConfig = DEFAULT_SEARCH,
    bab: BaBConfig | None = DEFAULT_BAB,
) -> list[Verdict]:
    """Exact robustness of each image over [max(x - eps, 0), min(x + eps, 1)], for the model
    in fp32, within `time_limit` seconds per image: (0) the graph held to the model on
    points of the boxes (Unsupported if it differs); (1) the clean prediction; (2) CROWN;
    (3) a seeded PGD search on the model; (4) LP tightening of unstable ReLUs' bounds (at
    most half the time left); (5) one MILP per target class whose bound is not beyond its
    fp32 tolerance tol_j, asking for a point with margin <= tol_j + pad (MILP_PAD), most
    promising target first. A MILP point is clamped into the box and run through the
    model in fp32; if the model does not misclassify it, a margin below -(TIE + tol_j) is
    a bug (RuntimeError), and otherwise the target is solved again asking for margin <=
    -(TIE + tol_j): a point then must reproduce, and none leaves the image "unknown"
    (decided_by "milp"): its margin is too close to 0 to call in fp32. A target ruled out
    by infeasibility is proven to have margin > tol_j, which `lower` records.

    With `bab` (the default), a graph that is one chain input -> affine -> relu -> ...
    -> affine and has at least bab.min_unstable unstable ReLUs after CROWN takes branch
    and bound instead of (4) and (5): alpha-CROWN on every open target, then for each
    target still open, best-first splitting of unstable ReLUs (bab.py), each domain
    done once its bound exceeds tol_j (decided_by "bab"). `bab=None` keeps the MILP path
    for every graph. Either path stops at the time limit: each loop checks the deadline,
    each solver call gets only the time left."""
    out = []
    with frozen(model):
        check_box(g, model, x, eps)
        for i in range(len(x)):
            out.append(verify_one(g, model, x[i], int(y[i]), eps, time_limit, i, search, bab))
            if on_image is not None:
                on_image(i)
    return out
