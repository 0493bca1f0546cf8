"""The complete verifier's programs: Tjeng, Xiao & Tedrake (2019)'s mixed-integer encoding
of a Graph over an input box, its LP relaxation for tightening pre-activation bounds, and
the per-target MILP solved by HiGHS through scipy.optimize.milp.

The encoding, per node (z the input, l <= z <= u its bounds):
- affine: an equality row per output; add: v = a + b;
- ReLU: y = z when l >= 0, y = 0 when u <= 0 (no binary; this is why tight bounds
  matter), otherwise one binary a: y >= 0, y >= z, y <= u a, y <= z - l (1 - a);
- max pool: inputs whose upper bound is below the window's largest lower bound can never
  be the max and are dropped; one left means o = z_i, else one binary per candidate:
  o >= z_i, o <= z_i + (u_max - l_i)(1 - a_i), sum a_i = 1.
With the binaries relaxed to [0, 1] the same rows are the LP relaxation (the triangle for
a ReLU), which `tighten` minimizes and maximizes neuron by neuron, layer by layer.

A bound from an LP must hold exactly, not to HiGHS's tolerances (1e-7: its optimum may sit
a hair outside the feasible set, and a bound a hair too tight cuts real points). So
`Program.lp_bound` takes HiGHS's dual solution (scipy.optimize.linprog's marginals) and
turns it into a rigorous bound by weak duality, as Neumaier & Shcherbina (2004, "Safe
bounds in linear and mixed-integer linear programming") do: for ANY row multipliers y,
    min c.x  >=  sum_i min(y_i row_lb_i, y_i row_ub_i) + sum_j min_{lb_j <= x_j <= ub_j} r_j x_j,
r = c - A^T y, which needs no optimality and no feasibility of anything HiGHS returned.
Every variable gets finite bounds (interval bounds where CROWN gave none), so the second
sum is finite; r is computed in float64 and widened by its rounding error
(gamma_k (|c| + |A|^T |y|), k the longest column), and the sum is lowered by its own
(gamma_N of the sum of magnitudes), so the float64 result is a lower bound too.

The MILP's answers are HiGHS's (its infeasibility is not an exact certificate), so the
complete verifier asks them with room to spare: a target is ruled out when no point has
margin <= tol + MILP_PAD * (1 + the logits' size), tol the fp32 tolerance (rounding.py);
MILP_PAD is ten times HiGHS's MIP feasibility tolerance (1e-6).

No maintained verifier installs beside torch 2.14 (auto_LiRPA on PyPI pins torch < 1.13),
so the encoding is written here, on scipy's HiGHS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import scipy.sparse as sp

# scipy.optimize and scipy.sparse are imported where a program is solved: bench.plugin
# exports the verifier, and their import (a quarter of a second) would otherwise be paid
# by every command, a rerun that computes nothing among them.

from bench.verify.bounds import Bounds, crown_bounds, interval_bounds
from bench.verify.graph import Graph
from bench.verify.rounding import gamma

U64 = 2.0**-53
"""Unit roundoff of float64."""
MILP_PAD = 1e-5
"""Room a MILP's "no point has margin <= cap" needs beyond the cap, relative to 1 + the
logits' size: ten times HiGHS's MIP feasibility tolerance."""
MIN_SOLVE = 0.02
"""Seconds below which a solve is not started."""
PRESOLVE_NNZ = 100_000
"""Nonzeros up to which a MILP is presolved. HiGHS's MIP presolve reads the clock only
between its passes, and one pass over a large program takes seconds: on a 784-256x6
net's program (538k nonzeros) it ran 6.3 s against a 3 s limit, on a 784-256x2 net's
(271k) 3.3 s against 2 s. Without it those solves stopped 0.1 to 0.5 s past the limit
(HiGHS's own setup). The digits MLP's programs (about 4k) keep it: without it the
verifier's tests saw a 30 s solve end with no point at all. On the 784-256x4 and x6
nets the MILP path's verdicts were the same without it (docs/truth.md)."""


@dataclass
class Program:
    """Variables, bounds and rows of one image's encoding, up to some node."""

    offsets: list[int] = field(default_factory=list)
    lb: list[np.ndarray] = field(default_factory=list)
    ub: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    row_lb: list[np.ndarray] = field(default_factory=list)
    row_ub: list[np.ndarray] = field(default_factory=list)
    n_vars: int = 0
    n_rows: int = 0
    cache: tuple | None = None
    """(matrix, row lb, row ub, variable lb, ub, integrality), built at the first solve:
    tightening solves one program hundreds of times with different objectives."""
    lp_cache: tuple | None = None
    """The same rows as linprog takes them (A_ub, b_ub, A_eq, b_eq, and which rows), for `lp_bound`."""

    def new_vars(self, lb, ub, integer: bool = False) -> int:
        lb, ub = np.asarray(lb, dtype=np.float64), np.asarray(ub, dtype=np.float64)
        start = self.n_vars
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(np.full(len(lb), 1 if integer else 0, dtype=np.uint8))
        self.n_vars += len(lb)
        return start

    def rows(self, r, c, v, lb, ub) -> None:
        """Rows lb <= sum_j v x_c <= ub, entries (r, c, v) with r local (0 .. len(lb) - 1)."""
        lb = np.broadcast_to(np.asarray(lb, dtype=np.float64), (int(np.max(r)) + 1 if len(r) else 0,)).copy()
        self.entries.append((np.asarray(r) + self.n_rows, np.asarray(c), np.asarray(v, dtype=np.float64)))
        self.row_lb.append(lb)
        self.row_ub.append(np.broadcast_to(np.asarray(ub, dtype=np.float64), lb.shape).copy())
        self.n_rows += len(lb)
        self.cache = self.lp_cache = None

    @property
    def binaries(self) -> int:
        return int(sum(i.sum() for i in self.integer))

    def _rows(self) -> tuple:
        # scipy where a program is solved (the module's note on its imports)
        import scipy.sparse as sp
        from scipy.optimize import Bounds as VarBounds

        if self.cache is None or self.cache[0].shape[1] != self.n_vars:
            r, cc, v = (np.concatenate(t) for t in zip(*self.entries, strict=True)) if self.entries else ([], [], [])
            self.cache = (
                sp.csr_matrix((v, (r, cc)), shape=(self.n_rows, self.n_vars)),
                np.concatenate(self.row_lb or [np.zeros(0)]),
                np.concatenate(self.row_ub or [np.zeros(0)]),
                VarBounds(np.concatenate(self.lb), np.concatenate(self.ub)),
                np.concatenate(self.integer),
            )
        return self.cache

    def solve(self, c: np.ndarray, *, integer: bool, time_limit: float, extra=None):
        """scipy.optimize.milp on this program with objective c (and one extra row
        (coefficients, lb, ub) if given)."""
        import scipy.sparse as sp
        from scipy.optimize import LinearConstraint, milp

        a, row_lb, row_ub, var_bounds, ints = self._rows()
        if extra is not None:
            a = sp.vstack([a, sp.csr_matrix(extra[0][None, :])], format="csr")
            row_lb, row_ub = np.append(row_lb, extra[1]), np.append(row_ub, extra[2])
        ints = ints if integer else np.zeros(self.n_vars, dtype=np.uint8)
        return milp(
            c,
            integrality=ints,
            bounds=var_bounds,
            constraints=LinearConstraint(a, row_lb, row_ub),
            options={"time_limit": max(time_limit, MIN_SOLVE), "presolve": a.nnz <= PRESOLVE_NNZ},
        )

    def lp_bound(self, c: np.ndarray, time_limit: float) -> float | None:
        """A rigorous lower bound on min c.x over the LP relaxation (binaries in [0, 1]),
        from HiGHS's dual solution by weak duality (module docstring); None when HiGHS
        returned no dual (out of time, or it failed)."""
        import scipy.sparse as sp
        from scipy.optimize import linprog

        a, row_lb, row_ub, var_bounds, _ = self._rows()
        if self.lp_cache is None:
            eq = np.flatnonzero(row_lb == row_ub)
            up = np.flatnonzero((row_lb != row_ub) & np.isfinite(row_ub))
            down = np.flatnonzero((row_lb != row_ub) & np.isfinite(row_lb))
            self.lp_cache = (
                sp.vstack([a[up], -a[down]], format="csr"),
                np.concatenate([row_ub[up], -row_lb[down]]),
                a[eq],
                row_lb[eq],
                eq,
                up,
                down,
            )
        a_ub, b_ub, a_eq, b_eq, eq, up, down = self.lp_cache
        res = linprog(
            c,
            A_ub=a_ub if len(b_ub) else None,
            b_ub=b_ub if len(b_ub) else None,
            A_eq=a_eq if len(b_eq) else None,
            b_eq=b_eq if len(b_eq) else None,
            bounds=np.stack([var_bounds.lb, var_bounds.ub], 1),
            method="highs",
            options={"time_limit": max(time_limit, MIN_SOLVE), "presolve": True},
        )
        y = np.zeros(self.n_rows)
        try:
            if len(b_eq):
                y[eq] = res.eqlin.marginals
            if len(b_ub):
                lam = np.minimum(res.ineqlin.marginals, 0.0)  # <= 0 in exact arithmetic; any y is valid
                np.add.at(y, up, lam[: len(up)])
                np.add.at(y, down, -lam[len(up) :])
        except (AttributeError, TypeError, ValueError):  # no dual came back (time limit, failure)
            return None
        if not np.all(np.isfinite(y)):
            return None
        return dual_bound(c, a, row_lb, row_ub, var_bounds.lb, var_bounds.ub, y)


def dual_bound(
    c: np.ndarray,
    a: sp.csr_matrix,
    row_lb: np.ndarray,
    row_ub: np.ndarray,
    lb: np.ndarray,
    ub: np.ndarray,
    y: np.ndarray,
) -> float:
    """Weak duality for min c.x s.t. row_lb <= A x <= row_ub, lb <= x <= ub, with any row
    multipliers y, evaluated in float64 so that the result stays a lower bound (module
    docstring). -inf where an infinite bound meets a nonzero multiplier or reduced cost."""
    r = c - a.T @ y
    longest = int(np.diff(a.tocsc().indptr).max(initial=0))
    slack = gamma(longest + 3, U64) * (np.abs(c) + abs(a).T @ np.abs(y))
    with np.errstate(invalid="ignore", over="ignore"):
        rows = np.where(y > 0, y * row_lb, np.where(y < 0, y * row_ub, 0.0))
        lo_r, hi_r = r - slack, r + slack
        cols = np.minimum(np.minimum(lo_r * lb, lo_r * ub), np.minimum(hi_r * lb, hi_r * ub))
    cols = np.where(np.isnan(cols), 0.0, cols)  # 0 * inf: a zero coefficient on an unbounded side
    terms = np.concatenate([rows, cols])
    total = float(terms.sum())
    if not np.isfinite(total):
        return -np.inf
    return total - gamma(len(terms) + 2, U64) * float(np.abs(terms).sum())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def build(
    g: Graph, lo: np.ndarray, hi: np.ndarray, bounds: dict[int, tuple[np.ndarray, np.ndarray]], upto: int | None = None
) -> Program:
    """The encoding of nodes 0..upto (all by default) for one image's box [lo, hi];
    `bounds` are numpy bounds of the nodes a ReLU or pool reads (others are free)."""
    p = Program()
    upto = g.output if upto is None else upto
    for k, node in enumerate(g.nodes[: upto + 1]):
        free = (np.full(node.size, -np.inf), np.full(node.size, np.inf))
        if node.op == "input":
            p.offsets.append(p.new_vars(lo, hi))
            continue
        src = p.offsets[node.inputs[0]]
        if node.op in ("affine", "add"):
            z = p.new_vars(*bounds.get(k, free))
            if node.op == "affine":
                w, i = node.weight.numpy(), np.arange(node.size)
                r, c = np.nonzero(w)  # z - W x = b
                p.rows(
                    np.concatenate([i, r]),
                    np.concatenate([z + i, src + c]),
                    np.concatenate([np.ones(node.size), -w[r, c]]),
                    node.bias.numpy(),
                    node.bias.numpy(),
                )
            else:
                other = p.offsets[node.inputs[1]]
                i = np.arange(node.size)
                p.rows(
                    np.tile(i, 3),
                    np.concatenate([z + i, src + i, other + i]),
                    np.repeat([1.0, -1.0, -1.0], node.size),
                    0.0,
                    0.0,
                )
            p.offsets.append(z)
        elif node.op == "relu":
            low, high = bounds[node.inputs[0]]
            y = p.new_vars(np.maximum(low, 0), np.maximum(high, 0))
            on = np.flatnonzero(low >= 0)
            if len(on):
                i = np.arange(len(on))
                p.rows(np.tile(i, 2), np.concatenate([y + on, src + on]), np.repeat([1.0, -1.0], len(on)), 0.0, 0.0)
            mid = np.flatnonzero((low < 0) & (high > 0))
            if len(mid):
                a = p.new_vars(np.zeros(len(mid)), np.ones(len(mid)), integer=True)
                i, m, ai = np.arange(len(mid)), len(mid), a + np.arange(len(mid))
                # y - z >= 0;  y - u a <= 0;  y - z - l a <= -l
                p.rows(np.tile(i, 2), np.concatenate([y + mid, src + mid]), np.repeat([1.0, -1.0], m), 0.0, np.inf)
                p.rows(
                    np.tile(i, 2), np.concatenate([y + mid, ai]), np.concatenate([np.ones(m), -high[mid]]), -np.inf, 0.0
                )
                p.rows(
                    np.tile(i, 3),
                    np.concatenate([y + mid, src + mid, ai]),
                    np.concatenate([np.ones(m), -np.ones(m), -low[mid]]),
                    -np.inf,
                    -low[mid],
                )
            p.offsets.append(y)
        else:
            p.offsets.append(_maxpool(p, node.windows.numpy(), src, *bounds[node.inputs[0]]))
    return p


def _maxpool(p: Program, win: np.ndarray, src: int, low: np.ndarray, high: np.ndarray) -> int:
    lw, uw = low[win], high[win]
    cand = uw >= lw.max(1, keepdims=True)
    o = p.new_vars(lw.max(1), uw.max(1))
    count = cand.sum(1)
    one = np.flatnonzero(count == 1)
    if len(one):
        z = win[one, cand[one].argmax(1)]
        i = np.arange(len(one))
        p.rows(np.tile(i, 2), np.concatenate([o + one, src + z]), np.repeat([1.0, -1.0], len(one)), 0.0, 0.0)
    wi, ki = np.nonzero(cand & (count > 1)[:, None])
    if len(wi):
        z, m, i = win[wi, ki], len(wi), np.arange(len(wi))
        a = p.new_vars(np.zeros(m), np.ones(m), integer=True) + i
        big = uw.max(1)[wi] - low[z]
        p.rows(np.tile(i, 2), np.concatenate([o + wi, src + z]), np.repeat([1.0, -1.0], m), 0.0, np.inf)
        p.rows(
            np.tile(i, 3),
            np.concatenate([o + wi, src + z, a]),
            np.concatenate([np.ones(m), -np.ones(m), big]),
            -np.inf,
            big,
        )
        multi = np.unique(wi)
        row = np.searchsorted(multi, wi)
        p.rows(row, a, np.ones(m), 1.0, 1.0)
    return o


def numpy_bounds(bounds: Bounds, i: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {k: (to_numpy(low[i]), to_numpy(high[i])) for k, (low, high) in bounds.items()}


def finite_bounds(g: Graph, lo: torch.Tensor, hi: torch.Tensor, bounds: Bounds) -> Bounds:
    """Bounds of every node (interval ones, intersected with `bounds` where given), so that
    no variable of an encoding is free and every dual bound is finite."""
    return dict(enumerate(interval_bounds(g, lo, hi, known=bounds)))


def unstable_count(g: Graph, bounds: Bounds) -> int:
    """ReLUs (of image 0) whose input bounds straddle 0."""
    return int(sum(((bounds[k][0][0] < 0) & (bounds[k][1][0] > 0)).sum() for k in g.relu_inputs()))


def tighten(g: Graph, lo: torch.Tensor, hi: torch.Tensor, bounds: Bounds, deadline: float) -> Bounds:
    """Bounds of one image (lo, hi (1, d)) with each unstable ReLU input minimized and
    maximized over the LP relaxation of everything before it, node by node; after each
    node the later ones get CROWN bounds again from the tighter ones. Stops at `deadline`
    (time.perf_counter()), keeping what it has: every bound stays sound, each LP's being a
    rigorous dual bound (`Program.lp_bound`), not its primal optimum. The LPs encode the
    graph in exact arithmetic, so the bounds returned hold for its exact values, not for
    the model's fp32 ones (bounds.py): they serve the exact analysis (the MILP, with
    rounding.py's tolerance E), never the perturbed one."""
    bounds = dict(bounds)
    lo_np, hi_np = to_numpy(lo[0]), to_numpy(hi[0])
    relu_in = set(g.relu_inputs())
    for k in g.bound_nodes():
        node = g.nodes[k]
        if k not in relu_in or node.op not in ("affine", "add") or (node.op == "affine" and node.inputs[0] == 0):
            continue  # outputs of the first affine op already have exact bounds
        low, high = (t.clone() for t in bounds[k])
        mid = torch.nonzero((low[0] < 0) & (high[0] > 0)).flatten().tolist()
        if not mid:
            continue
        prog = build(g, lo_np, hi_np, numpy_bounds(finite_bounds(g, lo, hi, bounds)), upto=k)
        c = np.zeros(prog.n_vars)
        for i in mid:
            for sign in (1.0, -1.0):
                if time.perf_counter() >= deadline:
                    bounds[k] = (low, high)
                    return crown_bounds(g, lo, hi, bounds, after=k, fp32=False)
                if sign < 0 and low[0, i] >= 0:
                    continue  # stable now: its upper bound needs no LP
                c[:] = 0
                c[prog.offsets[k] + i] = sign
                dual = prog.lp_bound(c, deadline - time.perf_counter())
                if dual is None or not np.isfinite(dual):
                    continue
                if sign > 0:  # min v_i >= dual
                    low[0, i] = max(float(low[0, i]), dual)
                else:  # min -v_i >= dual: v_i <= -dual
                    high[0, i] = min(float(high[0, i]), -dual)
        bounds[k] = (low, high)
        bounds = crown_bounds(g, lo, hi, bounds, after=k, fp32=False)
    return bounds
