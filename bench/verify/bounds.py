"""Sound bounds over an L-inf box: CROWN-style linear back-substitution on a Graph (the
certified floor, and the pre-activation bounds the MILP starts from), plain interval
bounds on a Graph for comparison (IBP training's differentiable bounds are in interval.py).

CROWN (Zhang et al. 2018; DeepPoly, Singh et al. 2019, is the same bound): a linear
function A @ v_k of a node's value is pushed back through the graph to the input box.
Affine ops are exact; each ReLU whose input bounds (l, u) straddle 0 is replaced, for
positive coefficients, by the lower line y >= a z (a = 1 when u >= -l, else 0) and, for
negative ones, by the upper chord y <= u (z - l) / (u - l); a max-pool output by the input
with the largest lower bound from below, and from above by that input when it dominates
its window, else by the window's largest upper bound. Every intermediate node a ReLU or a
pool reads gets its bounds the same way (a = [I; -I] at that node), layer by layer, so the
bounds are CROWN's throughout, not interval ones. The final specification is the margin
matrix (e_y - e_j for each j), so the bound is on z_y - z_j directly.

Floating point (DeepPoly's sound handling, Singh et al. 2019): the model runs in fp32,
and is, at every fp32 point of the box, the graph with a perturbation delta_k in
[-r_k, r_k] added at the output of each affine and add node, r_k that op's LOCAL rounding
bound (rounding.local_radii: relative to the fp32 values of its inputs, with no error
carried from earlier nodes). Every bound here is over that family (which holds the exact
graph too, delta = 0): at an affine or add node a coefficient matrix Lambda meets
delta_k, which lowers the bound by at most |Lambda| r_k. So the intermediate bounds
(`crown_bounds`) bound the fp32 values, which keeps the ReLU relaxations valid for them,
and a margin's bound splits into B0 - T: B0 what the relaxation proves with the
perturbations left out (a lower bound of the graph's exact margin), T = sum_k |Lambda_k|
r_k the perturbations' worst case on that margin (`fp32_margins`), so B0 - T bounds the
fp32 model's margin from below. An image is certified where B0 > SAFETY T for every j
(rounding.SAFETY = 2: the second T covers this module's own float64 arithmetic, whose
error is the same sums at u = 2^-53, some 2^-29 of T times the depth). T grows with the
width and depth of the net only as the margin's own coefficients do, where
`fp32_error`'s E (products of |W|, signs ignored) grew some 13x per 256-wide layer.

All arithmetic is float64 on the CPU, batched over images; memory is kept near
CHUNK_BYTES by working through the images in chunks.
"""

from __future__ import annotations

import torch

from bench.verify.faithful import check_box
from bench.verify.graph import Graph
from bench.verify.rounding import SAFETY, fp32_error, local_radii, margin_tolerance, robust_beyond

CHUNK_BYTES = 256 * 2**20
"""Peak size of one back-substitution's coefficient tensor (images x rows x values)."""

Bounds = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""Node index -> (lower, upper), each (n, node size) float64."""


def box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat float64 box [max(x - eps, 0), min(x + eps, 1)] of images x (n, ...)."""
    flat = x.detach().to(torch.float64).reshape(len(x), -1)
    return (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)


def relu_relaxation(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept) of each ReLU, given its input bounds."""
    unstable = (low < 0) & (high > 0)
    chord = torch.where(unstable, high / (high - low).clamp(min=1e-300), (low >= 0).double())
    lower = torch.where(unstable, (high >= -low).double(), (low >= 0).double())
    return lower, chord, torch.where(unstable, -chord * low, torch.zeros_like(low))


class _Coef:
    """Coefficients on one node's values: dense (n, s, m), or `gathered`: (n, s, r) on the
    entries idx (n, r) of each image (what a max pool leaves: one input per window), which
    keeps the work through the ReLU and the affine op before a pool at a 1/k^2 share."""

    def __init__(self, coef: torch.Tensor, idx: torch.Tensor | None = None):
        self.coef, self.idx = coef, idx

    def dense(self, size: int) -> torch.Tensor:
        if self.idx is None:
            return self.coef
        n, s, _ = self.coef.shape
        out = torch.zeros(n, s, size, dtype=self.coef.dtype)
        return out.scatter_add_(2, self.idx[:, None, :].expand(n, s, -1), self.coef)

    def take(self, v: torch.Tensor) -> torch.Tensor:
        """Per-image values v (n, m) at this term's entries (n, r)."""
        return v if self.idx is None else v.gather(1, self.idx)


def _add(acc: dict, k: int, term: _Coef, size: int) -> None:
    if k not in acc:
        acc[k] = term
    elif acc[k].idx is None and term.idx is None:
        acc[k] = _Coef(acc[k].coef + term.coef)
    else:
        acc[k] = _Coef(acc[k].dense(size) + term.dense(size))


def _times(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(n, s, m) @ (n, m) -> (n, s)."""
    return (a @ v[:, :, None]).squeeze(-1)


def _pool(t: _Coef, windows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[_Coef, torch.Tensor]:
    """(coefficients on the pool's input, constant) of a lower bound of t @ maxpool(z)."""
    a = t.coef
    n = a.shape[0]
    win = windows.expand(n, -1, -1) if t.idx is None else windows[t.idx]  # (n, r, k)
    lw, uw = low.gather(1, win.flatten(1)).view(win.shape), high.gather(1, win.flatten(1)).view(win.shape)
    best = lw.argmax(-1, keepdim=True)
    low = lw.gather(-1, best).squeeze(-1)
    others = uw.scatter(-1, best, float("-inf")).amax(-1)
    dominant = low >= others
    top = torch.where(dominant, torch.zeros_like(low), uw.amax(-1))
    neg = a.clamp(max=0)
    coef = torch.where(dominant[:, None, :], a, a - neg)
    return _Coef(coef, win.gather(-1, best).squeeze(-1)), _times(top, neg)


def back_substitute(
    g: Graph,
    start: int,
    a: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bounds: Bounds,
    const: torch.Tensor | None = None,
    radii: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A sound lower bound (n, s) of a @ v_start (+ const) over the box, a (n, s, size of start);
    with `radii` (rounding.local_radii), over the perturbed family (module docstring)."""
    low, pert = _back_substitute(g, start, a, lo, hi, bounds, const, radii)
    return low - pert


def _back_substitute(
    g: Graph,
    start: int,
    a: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bounds: Bounds,
    const: torch.Tensor | None = None,
    radii: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, T) (n, s) each: B0 the lower bound of a @ v_start (+ const) with the
    perturbations left out, T = sum_k |Lambda_k| r_k over the affine and add nodes in
    `radii` (none: T = 0)."""
    acc = {start: _Coef(a)}
    const = torch.zeros(a.shape[:2], dtype=torch.float64) if const is None else const
    pert = torch.zeros(a.shape[:2], dtype=torch.float64)
    for k in range(start, -1, -1):
        term = acc.pop(k, None)
        if term is None:
            continue
        node, ak = g.nodes[k], term.coef
        if radii is not None and k in radii:
            pert = pert + _times(term.take(radii[k]), ak.abs())
        if node.op == "input":
            const = const + _times(term.take(lo), ak.clamp(min=0)) + _times(term.take(hi), ak.clamp(max=0))
        elif node.op == "affine":
            src = node.inputs[0]
            const = const + _times(term.take(node.bias.expand(len(ak), -1)), ak)
            w = node.weight if term.idx is None else node.weight[term.idx]
            _add(acc, src, _Coef(ak @ w), g.nodes[src].size)
        elif node.op == "relu":
            src = node.inputs[0]
            lower, chord, icpt = (term.take(v) for v in relu_relaxation(*bounds[src]))
            const = const + _times(icpt, ak.clamp(max=0))
            slope = torch.where(ak >= 0, lower[:, None, :], chord[:, None, :])
            _add(acc, src, _Coef(ak * slope, term.idx), g.nodes[src].size)
        elif node.op == "maxpool":
            src = node.inputs[0]
            coef, c = _pool(term, node.windows, *bounds[src])
            const = const + c
            _add(acc, src, coef, g.nodes[src].size)
        else:
            for i in node.inputs:
                _add(acc, i, term, g.nodes[i].size)
    return const, pert


def node_bounds(
    g: Graph, k: int, lo: torch.Tensor, hi: torch.Tensor, bounds: Bounds, radii: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds (n, m) of node k's values (with `radii`, of the perturbed family's:
    the fp32 values). An affine node starts from [W; -W] on its input (the identity never
    multiplies anything), and its own perturbation widens the result by r_k; a ReLU or
    pool output takes its input's bounds through the op, which is what
    back-substitution would give."""
    n, node = len(lo), g.nodes[k]
    m = node.size
    if k == 0:
        return lo.clone(), hi.clone()
    if node.op in ("relu", "maxpool"):  # monotone in an input whose bounds are known: exact from them
        low, high = bounds[node.inputs[0]]
        if node.op == "relu":
            return low.clamp(min=0), high.clamp(min=0)
        return low[:, node.windows].amax(-1), high[:, node.windows].amax(-1)
    if node.op == "affine":
        a = torch.cat([node.weight, -node.weight]).expand(n, -1, -1)
        const = torch.cat([node.bias, -node.bias]).expand(n, -1)
        res = back_substitute(g, node.inputs[0], a, lo, hi, bounds, const, radii)
        if radii is not None and k in radii:
            return res[:, :m] - radii[k], -res[:, m:] + radii[k]
    else:
        eye = torch.eye(m, dtype=torch.float64)
        res = back_substitute(g, k, torch.cat([eye, -eye]).expand(n, -1, -1), lo, hi, bounds, radii=radii)
    return res[:, :m], -res[:, m:]


def crown_bounds(
    g: Graph, lo: torch.Tensor, hi: torch.Tensor, bounds: Bounds | None = None, after: int = -1, fp32: bool = True
) -> Bounds:
    """Bounds of every node a ReLU or a pool reads, computed layer by layer; those in
    `bounds` are kept where tighter (only nodes past `after` are recomputed). With `fp32`
    (the default) they bound the perturbed family (module docstring): the model's fp32
    values, and the exact ones too; `bounds` given must hold for the values the caller
    needs (LP-tightened ones, milp.tighten's, hold for the exact values only)."""
    out = dict(bounds or {})
    for k in g.bound_nodes():
        if k <= after and k in out:
            continue
        radii = local_radii(g, lo, hi, out, upto=k) if fp32 else None
        low, high = node_bounds(g, k, lo, hi, out, radii)
        if k in out:
            low, high = torch.maximum(low, out[k][0]), torch.minimum(high, out[k][1])
        out[k] = (low, high)
    return out


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n, K, K): row j is e_y - e_j (the row j = y is zero)."""
    eye = torch.eye(num_classes, dtype=torch.float64)
    return eye[y][:, None, :] - eye[None, :, :]


def target_margins(g: Graph, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """(n, K) lower bounds of z_y - z_j over the box for the graph in exact arithmetic
    (B0, given bounds that hold for its values); +inf at j = y."""
    low = back_substitute(g, g.output, margin_spec(y, g.num_classes), lo, hi, bounds)
    return low.scatter(1, y[:, None], float("inf"))


def fp32_margins(
    g: Graph, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, bounds: Bounds
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, T) (n, K) each, from one back-substitution of the margins with `bounds` on
    the fp32 values (crown_bounds'): B0 is `target_margins`' bound of the exact margin
    z_y - z_j (+inf at j = y), T the perturbations' worst case on it (0 at j = y), so
    B0 - T is a lower bound of the fp32 model's margin over the box, and the pair is
    proven for the model where B0 > SAFETY T (`fp32_tolerance`)."""
    radii = local_radii(g, lo, hi, bounds)
    low, pert = _back_substitute(g, g.output, margin_spec(y, g.num_classes), lo, hi, bounds, radii=radii)
    return low.scatter(1, y[:, None], float("inf")), pert.scatter(1, y[:, None], 0.0)


def fp32_tolerance(pert: torch.Tensor) -> torch.Tensor:
    """What B0 must exceed: SAFETY T (rounding.SAFETY covers the verifier's own float64)."""
    return SAFETY * pert


def _chunk(g: Graph) -> int:
    widest = max(nd.size for nd in g.nodes)
    rows = max([2 * g.nodes[k].size for k in g.bound_nodes()] + [g.num_classes])
    return max(1, CHUNK_BYTES // (8 * widest * rows))


def certify(
    g: Graph,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    model: torch.nn.Module | None = None,
    method: str = "crown",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified, margin): margin (n,) float64 is the lower bound of min_{j != y} z_y - z_j
    over the box for the graph in exact arithmetic, CROWN's (or plain intervals', `method`
    "ibp"); an image is certified when, for every j, the bound on z_y - z_j exceeds the
    pair's fp32 tolerance, and the clean image is classified correctly. CROWN's tolerance
    is SAFETY T, T the worst case of the model's local roundings on that margin
    (`fp32_margins`); intervals' is rounding.py's SAFETY (E_y + E_j).
    With `model`, the graph is first held to it on points of the boxes (faithful.py)."""
    if model is not None:
        check_box(g, model, x, eps)
    y = y.detach().cpu().long()
    margins, bits = [], []
    step = _chunk(g)
    for i in range(0, len(x), step):
        lo, hi = box(x[i : i + step].cpu(), eps)
        yi = y[i : i + step]
        if method == "crown":
            bounds = crown_bounds(g, lo, hi)
            low, pert = fp32_margins(g, lo, hi, yi, bounds)
            tol = fp32_tolerance(pert)
        else:
            low = interval_margins(g, lo, hi, yi)
            tol = margin_tolerance(fp32_error(g, lo, hi, None), yi)
        margins.append(low.amin(1))
        bits.append(robust_beyond(low, tol))
    if not margins:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    clean = g.forward(x.cpu()).argmax(1) == y
    return torch.cat(bits) & clean, torch.cat(margins)


def interval_bounds(
    g: Graph, lo: torch.Tensor, hi: torch.Tensor, known: Bounds | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Plain interval bounds (IBP) of every node of the graph; with `known` (CROWN's, say),
    each node's are intersected with those given for it before they propagate."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, node in enumerate(g.nodes):
        if node.op == "input":
            low, high = lo, hi
        elif node.op == "affine":
            c, r = (
                (out[node.inputs[0]][0] + out[node.inputs[0]][1]) / 2,
                (out[node.inputs[0]][1] - out[node.inputs[0]][0]) / 2,
            )
            c, r = c @ node.weight.T + node.bias, r @ node.weight.abs().T
            low, high = c - r, c + r
        elif node.op == "relu":
            low, high = (t.clamp(min=0) for t in out[node.inputs[0]])
        elif node.op == "maxpool":
            low, high = (t[:, node.windows].amax(-1) for t in out[node.inputs[0]])
        else:
            (la, ua), (lb, ub) = out[node.inputs[0]], out[node.inputs[1]]
            low, high = la + lb, ua + ub
        if known is not None and k in known:
            low, high = torch.maximum(low, known[k][0]), torch.minimum(high, known[k][1])
        out.append((low, high))
    return out


def interval_margin(g: Graph, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """IBP's lower bound (n,) of min_{j != y} z_y - z_j, with the margin folded into the
    last affine op (Gowal et al.'s elision), for comparison with `certify`."""
    lo, hi = box(x.cpu(), eps)
    return interval_margins(g, lo, hi, y.detach().cpu().long()).amin(1)


def interval_margins(g: Graph, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, K) IBP lower bounds of z_y - z_j over the boxes [lo, hi]; +inf at j = y."""
    last = g.nodes[-1]
    low, high = interval_bounds(g, lo, hi)[last.inputs[0]]
    spec = margin_spec(y, g.num_classes)
    w, b = spec @ last.weight, spec @ last.bias
    margins = (w.clamp(min=0) @ low[:, :, None] + w.clamp(max=0) @ high[:, :, None]).squeeze(-1) + b
    return margins.scatter(1, y[:, None], float("inf"))
