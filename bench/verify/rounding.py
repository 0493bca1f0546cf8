"""A rigorous bound on how far the model's fp32 logits can be from the exact ones, over a
box: what a margin must exceed before the verifiers call an image robust or certified.

The bounds (bounds.py, milp.py) are about the Graph: the model's function in exact
arithmetic, on its fp32 weights. The model runs in fp32, and a margin smaller than its
rounding error proves nothing about it (two logits near 60 are each off by up to half an
ulp, 1.9e-6). So each verdict compares margins with `fp32_error`'s bound E (per image,
per logit, over the whole box), derived by standard forward error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3), u = 2^-24:

- A dot product with bias, fl(w . x + b) with n products (a Linear, or one output of a
  convolution, n = fan-in + 1): summed in any order, with or without fused multiply-add,
  |fl(w . x + b) - (w . x + b)| <= gamma_n (|w| . |x| + |b|), gamma_n = n u / (1 - n u).
  Convolutions are assumed computed as sums of products (direct, im2col + GEMM, implicit
  GEMM: oneDNN's fp32 and cuDNN's usual algorithms); Winograd and FFT ones obey weaker,
  normwise bounds and are not covered. TF32 is off wherever the model is judged
  (bench.engine.device.full_fp32).
- An elementwise op, Normalize ((x - m) / s) or eval-mode BatchNorm (x alpha + beta, or
  (x - m) invstd w + b, per implementation): at most ELEMENTWISE_ROUNDINGS = 8 roundings
  reach one output, so |error| <= gamma_8 (|scale| |x| + |m scale| + |b|).
- Underflow adds at most 2^-150 per product (additions of subnormals are exact), so
  each step also adds n * 2^-149.
- The inputs carry no error: the box's fp32 points are the model's inputs exactly.

An op's input is off already, by e (|x_hat - x| <= e): a step y = W x + b then gives
|y_hat - y| <= |W| e + gamma_n (|W| (|x| + e) + |b|), with |x| bounded by the box's
bounds on the node (CROWN's where they were computed, intervals otherwise). ReLU and
max pooling are 1-Lipschitz and exact in fp32, so e passes through them (a pool's is its
window's largest); an add rounds once: e_a + e_b + u (|a + b| + e_a + e_b). A folded
affine node applies its steps one after the other, as the model does. Overflow makes
the bound infinite: a step whose partial sums may pass 2^127 gets E = inf.

A margin: the fp32 model classifies the image y (argmax, ties to the lower index, so the
inequality is strict) when z_y - z_j > E_y + E_j for every j != y. The verifiers' own
float64 arithmetic (folding, back-substitution, the LP's dual bound) errs in the same
sums, with u = 2^-53: under 2^-29 of E times the depth. `margin_tolerance` covers it by
doubling: tol_j = SAFETY (E_y + E_j), SAFETY = 2. Robust and certified need every
proven lower bound on z_y - z_j to exceed its tol_j, so the bound is chosen per image
and per pair, sized by the box, rather than one fixed number: a fixed tolerance is
either unsound for logits near 60 or throws away margins of 1e-4 on logits near 1.

E carries each op's input error through |W|, so on wide, deep nets it grows with the
products of |W| (some 13x per 256-wide layer of a 784-256xk MLP: tol ~0.4 at k = 2, ~40 at
k = 4, ~4000 at k = 6, where margins are O(1-10)). CROWN and branch and bound therefore
use `local_radii` instead (DeepPoly's floating-point handling, Singh et al. 2019): each
affine and add op's LOCAL rounding r_k only, the same bound as above with no input error
(e = 0) and |x| bounded by bounds on the fp32 values themselves. The fp32 model is then,
at every fp32 point of the box, the graph with a perturbation delta_k in [-r_k, r_k] at
the output of each such op, and bounds.py bounds that family's margin directly: B0 - T,
T = sum_k |Lambda_k| r_k, with the signs of the margin's own coefficients; a pair is
proven where B0 > SAFETY T (SAFETY covering the verifier's float64 the same way, its
error being the same sums at u = 2^-53). E (`fp32_error`, `margin_tolerance`) stays for
what works on the exact graph only: the LP-tightened bounds and the MILP (complete.py),
intervals (`certify(method="ibp")`), and the graph's fidelity check (faithful.py).
"""

from __future__ import annotations

import torch

from bench.verify.graph import Graph

U32 = 2.0**-24
"""Unit roundoff of fp32 (round to nearest)."""
ETA32 = 2.0**-149
"""Twice the largest error an underflowing fp32 product makes (half the least subnormal)."""
ELEMENTWISE_ROUNDINGS = 8
"""Roundings on the way to one output of Normalize or BatchNorm: var + eps, sqrt, 1 / .,
* weight, mean * alpha, bias - ., x * alpha, + beta (cuDNN's order takes fewer)."""
SAFETY = 2.0
"""Covers the verifiers' own float64 arithmetic, whose error is the same sums at 2^-29 of E."""
OVERFLOW = 2.0**127
"""Partial sums past this may overflow fp32 (max 2^128)."""


def gamma(k: int, u: float = U32) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error of k roundings in a row."""
    return k * u / (1 - k * u)


def _magnitude(lu: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.maximum(lu[0].abs(), lu[1].abs())


def _through_steps(node, low: torch.Tensor, high: torch.Tensor, e: torch.Tensor, over: torch.Tensor):
    """An affine node's steps one after the other, as the model runs them: the interval
    (low, high) of its exact values, and the error bound e grown by each step's rounding of
    an input already off by e. `over` (n,) is set, in place, where a partial sum may overflow."""
    for step in node.steps:
        sums = step.apply(_magnitude((low, high)) + e, absolute=True) + step.const
        over |= (sums >= OVERFLOW).any(1)
        e = step.apply(e, absolute=True) + gamma(step.roundings) * sums + step.roundings * ETA32
        c, r = step.apply((low + high) / 2), step.apply((high - low) / 2, absolute=True)
        low, high = c - r, c + r
    return low, high, e


def fp32_error(
    g: Graph, lo: torch.Tensor, hi: torch.Tensor, bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> torch.Tensor:
    """E (n, classes) float64: |the model's fp32 logits - the graph's exact ones| <= E at every
    fp32 point of each box [lo, hi] (n, d), by the analysis above. `bounds` (node -> (l, u),
    CROWN's) tighten the interval bounds on the values the rounding is relative to."""
    lu: list[tuple[torch.Tensor, torch.Tensor]] = []
    err: list[torch.Tensor] = []
    over = torch.zeros(len(lo), dtype=torch.bool)
    for k, node in enumerate(g.nodes):
        if node.op == "input":
            low, high, e = lo.double(), hi.double(), torch.zeros_like(lo, dtype=torch.float64)
        elif node.op == "affine":
            (low, high), e = lu[node.inputs[0]], err[node.inputs[0]]
            low, high, e = _through_steps(node, low, high, e, over)
        elif node.op == "relu":
            (low, high), e = (t.clamp(min=0) for t in lu[node.inputs[0]]), err[node.inputs[0]]
        elif node.op == "maxpool":
            (low, high) = (t[:, node.windows].amax(-1) for t in lu[node.inputs[0]])
            e = err[node.inputs[0]][:, node.windows].amax(-1)
        else:
            (la, ua), (lb, ub) = lu[node.inputs[0]], lu[node.inputs[1]]
            ea, eb = err[node.inputs[0]], err[node.inputs[1]]
            low, high = la + lb, ua + ub
            e = ea + eb + U32 * (_magnitude((low, high)) + ea + eb)
        if bounds is not None and k in bounds:
            low, high = torch.maximum(low, bounds[k][0]), torch.minimum(high, bounds[k][1])
        over |= (_magnitude((low, high)) + e >= OVERFLOW).any(1)
        lu.append((low, high))
        err.append(e)
    return torch.where(over[:, None], torch.full_like(err[-1], float("inf")), err[-1])


def local_radii(
    g: Graph,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    upto: int | None = None,
) -> dict[int, torch.Tensor]:
    """r_k (n, size) float64 for each affine and add node k <= `upto` (all by default): the
    LOCAL rounding of that op, |fl(op(x_hat)) - op(x_hat)| <= r_k, for the fp32 values
    x_hat of its inputs (DeepPoly's floating-point handling, Singh et al. 2019). So the
    model in fp32 is, at every fp32 point of the box, the graph with a perturbation
    delta_k in [-r_k, r_k] added at the output of each affine and add node
    (bounds.py bounds that family). Unlike `fp32_error`, no error is carried from one
    node to the next: |x_hat| is bounded by the bounds of the fp32 values themselves,
    intervals widened by the radii before them, intersected with `bounds` (node -> (l, u),
    bounds on the fp32 values: perturbed CROWN's) where given. Inside one folded affine
    node the model's steps still run one after the other, so a step's error passes
    through the node's later steps as in `fp32_error` (a Normalize or BatchNorm folded
    next to a Linear or convolution: one |W| at most, never the network's depth).
    An identity node the model never computes (no steps) has r = 0. Where some partial
    sum may overflow fp32, every radius of that image is OVERFLOW (finite, so the
    bounds built on it stay numbers; no margin survives a perturbation that large)."""
    upto = g.output if upto is None else upto
    lu: list[tuple[torch.Tensor, torch.Tensor]] = []
    radii: dict[int, torch.Tensor] = {}
    over = torch.zeros(len(lo), dtype=torch.bool)
    for k, node in enumerate(g.nodes[: upto + 1]):
        if node.op == "input":
            low, high = lo.double(), hi.double()
        elif node.op == "affine":
            low, high = lu[node.inputs[0]]
            e = torch.zeros_like(low)
            low, high, e = _through_steps(node, low, high, e, over)
            if not node.steps:
                e = torch.zeros(len(lo), node.size, dtype=torch.float64)
            radii[k] = e
            low, high = low - e, high + e
        elif node.op == "relu":
            low, high = (t.clamp(min=0) for t in lu[node.inputs[0]])
        elif node.op == "maxpool":
            low, high = (t[:, node.windows].amax(-1) for t in lu[node.inputs[0]])
        else:
            (la, ua), (lb, ub) = lu[node.inputs[0]], lu[node.inputs[1]]
            low, high = la + lb, ua + ub
            e = U32 * _magnitude((low, high))
            radii[k] = e
            low, high = low - e, high + e
        if bounds is not None and k in bounds:
            low, high = torch.maximum(low, bounds[k][0]), torch.minimum(high, bounds[k][1])
        over |= (_magnitude((low, high)) >= OVERFLOW).any(1)
        lu.append((low, high))
    if bool(over.any()):
        radii = {k: torch.where(over[:, None], torch.full_like(r, OVERFLOW), r) for k, r in radii.items()}
    return radii


def margin_tolerance(err: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tol (n, classes): SAFETY (E_y + E_j), what a proven lower bound on z_y - z_j must
    exceed for the fp32 model to rank y above j everywhere in the box (0 at j = y)."""
    y = y.detach().cpu().long()
    tol = SAFETY * (err + err.gather(1, y[:, None]))
    return tol.scatter(1, y[:, None], 0.0)


def robust_beyond(low: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """(n,) bool: every target's proven lower bound `low` (n, classes; +inf at y) exceeds
    its tolerance."""
    return (low > tol).all(1)
