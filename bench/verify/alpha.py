"""Optimized linear bounds on a chain of affine ops and ReLUs (alpha-CROWN, Xu et al. 2021;
with the split multipliers of beta-CROWN, Wang et al. 2021): the bound branch and bound
(bab.py) computes for each subdomain.

A chain is x -> z_1 = W_1 x + b_1 -> h_1 = relu(z_1) -> ... -> z_L = W_L h_{L-1} + b_L,
over an L-inf box. For a margin row c (e_y - e_j, folded into the last op), CROWN's lower
bound on c z_L is a back-substitution: a coefficient vector a on h_k is pushed through
the ReLU by a linear relaxation, then exactly through the affine op below. Each ReLU
whose bounds l < 0 < u straddle 0 is relaxed by the chord h <= u (z - l) / (u - l) where
its coefficient is negative, and by a line h >= alpha z where it is positive; any alpha
in [0, 1] is sound (relu(z) >= alpha z on all of R for those alpha), so alpha is free,
and a few Adam steps on alpha raise the bound (alpha-CROWN). Plain CROWN fixes alpha
at 1 where u >= -l and 0 elsewhere, which is the optimizer's start.

A subdomain of branch and bound adds split constraints s_i z_i >= 0 on chosen ReLUs (s = +1:
active, the ReLU is the identity there; s = -1: inactive, it is 0). Both enter the
relaxation: the split ReLU's bounds become [max(l, 0), u] or [l, min(u, 0)], so it is
stable, and its constraint enters by Lagrange multipliers beta >= 0: the objective
c z_L - sum_i beta_i s_i z_i is no larger than c z_L wherever the constraints hold, so any
lower bound of its minimum over the relaxation bounds the subdomain's minimum from
below (beta-CROWN: with optimal alpha and beta, the bound equals the LP relaxation's
with the split constraints, given the same intermediate bounds). The intermediate
bounds (l, u) of a subdomain are its root's, with its own splits applied: a split does
not tighten the bounds of the layers after it here, it tightens the final bound through
beta, which keeps a subdomain's cost one back-substitution of one row. (Optimizing the root's
intermediate bounds with alpha of their own, layer by layer, was measured on 784-256x2
MNIST nets at eps 0.05: it made 1 of about 120 unstable ReLUs stable, for 0.3-2.8 s; on
784-256x4 and x6 nets it halved the deepest layers' widths but decided no more of their
open images at 0.05 in 10 s; so the intermediate bounds are CROWN's.)

Floating point (bounds.py's module docstring): with `radii`, r_k (1 or n, width) per
ReLU layer, the pre-activation z_k the model computes in fp32 is W_k h_{k-1} + b_k +
delta_k with |delta_k| <= r_k (its local rounding), and the coefficient on z_k lowers the
bound by |coef| . r_k; the last op's perturbation is a constant the caller folds into
spec_b (bab.Problem.spec). The root bounds must then be bounds of the fp32 values
(bounds.crown_bounds'), and the bound is one on the fp32 model's margin.

Every tensor is made on the device of the box and the chain (bab.Problem.to puts them on
the model's), so the whole search runs there: a batch of domains is a batch of matrix
products, which is what a GPU is for.

Soundness does not rest on the optimizer: the loop may run in float32 (it is only a
search for good alpha and beta), and the bound a verdict reads is computed once more in
float64 (the repo's convention for bounds) with the tuned alpha clamped to [0, 1] and
beta to >= 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.verify.graph import Graph


@dataclass(frozen=True)
class Chain:
    """A graph that is one chain input -> affine -> relu -> ... -> affine, as matrices."""

    weights: tuple[torch.Tensor, ...]
    """float64 (out, in) of each affine op, first to last (one more than `relus`)."""
    biases: tuple[torch.Tensor, ...]
    """float64 (out,) of each affine op."""
    relus: tuple[int, ...]
    """The graph node each ReLU reads (its pre-activation), first to last: the keys of
    its bounds in bench.verify.bounds' `Bounds`."""

    @property
    def widths(self) -> list[int]:
        """Neurons of each ReLU layer."""
        return [len(b) for b in self.biases[:-1]]

    def to(self, device: torch.device) -> Chain:
        """The same chain with its matrices on `device`."""
        return Chain(tuple(w.to(device) for w in self.weights), tuple(b.to(device) for b in self.biases), self.relus)


def chain_of(g: Graph) -> Chain | None:
    """The graph as a Chain, or None where it is anything else (a max pool, an add, two
    affine ops in a row): those keep the MILP path."""
    nodes = g.nodes
    if len(nodes) < 2 or nodes[0].op != "input":
        return None
    expect = "affine"
    for k, node in enumerate(nodes[1:], start=1):
        if node.op != expect or node.inputs != (k - 1,):
            return None
        expect = "relu" if expect == "affine" else "affine"
    if nodes[-1].op != "affine":
        return None
    affine = [(n.weight, n.bias) for n in nodes if n.op == "affine"]
    if any(w is None or b is None for w, b in affine):
        return None
    return Chain(
        tuple(w for w, _ in affine if w is not None),
        tuple(b for _, b in affine if b is not None),
        tuple(n.inputs[0] for n in nodes if n.op == "relu"),
    )


@dataclass(frozen=True)
class Relaxed:
    """A batch of n subdomains of one box, as the bound reads them: each layer's
    pre-activation bounds with the domain's splits applied, and its split signs."""

    lower: list[torch.Tensor]
    """(n, width) per ReLU layer."""
    upper: list[torch.Tensor]
    split: list[torch.Tensor]
    """(n, width) per ReLU layer: +1 split active, -1 split inactive, 0 not split."""


def relax(lower: list[torch.Tensor], upper: list[torch.Tensor], split: list[torch.Tensor], dtype) -> Relaxed:
    """Root bounds (1 or n rows) with each domain's splits applied, in `dtype`."""
    lows, ups, signs = [], [], []
    for low, up, s in zip(lower, upper, split, strict=True):
        low, up, s = low.to(dtype), up.to(dtype), s.to(dtype)
        lows.append(torch.where(s > 0, low.clamp(min=0), low).expand_as(s))
        ups.append(torch.where(s < 0, up.clamp(max=0), up).expand_as(s))
        signs.append(s)
    return Relaxed(lows, ups, signs)


def initial_alpha(r: Relaxed) -> list[torch.Tensor]:
    """CROWN's own choice of lower line (slope 1 where u >= -l, else 0): the start."""
    return [(up >= -low).to(low.dtype) for low, up in zip(r.lower, r.upper, strict=True)]


@dataclass(frozen=True)
class Linear:
    """A lower bound as the back-substitution leaves it, per domain."""

    bound: torch.Tensor
    """(n,) the lower bound of the domain's objective."""
    point: torch.Tensor
    """(n, d) the box vertex minimizing the final linear function: where a counterexample
    is most likely, if the bound is near the truth."""
    coefs: list[torch.Tensor]
    """(n, width) the coefficient on each ReLU layer's output h_k (what the branching
    score reads)."""


def linear_bound(
    chain: Chain,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec_w: torch.Tensor,
    spec_b: torch.Tensor,
    r: Relaxed,
    alpha: list[torch.Tensor],
    beta: list[torch.Tensor],
    radii: list[torch.Tensor] | None = None,
) -> Linear:
    """Lower bounds (n,) of spec_w . h_{L-1} + spec_b (the margin row, folded into the last
    op) over each domain, by back-substitution through the relaxation `r` with lower
    slopes `alpha` and split multipliers `beta` (module docstring), each pre-activation
    perturbed by up to `radii` (per layer, none: exact arithmetic). Differentiable in
    alpha and beta; every tensor in one dtype, the box lo, hi (d,)."""
    dtype = spec_w.dtype
    a, const = spec_w, spec_b
    coefs: list[torch.Tensor] = []
    for k in range(len(r.lower) - 1, -1, -1):
        low, up = r.lower[k], r.upper[k]
        coefs.append(a)
        on, mid = low >= 0, (low < 0) & (up > 0)
        chord = torch.where(mid, up / (up - low).clamp(min=torch.finfo(dtype).tiny), on.to(dtype))
        below = torch.where(mid, alpha[k], on.to(dtype))
        neg = a.clamp(max=0)
        const = const + (neg * torch.where(mid, -chord * low, torch.zeros_like(low))).sum(-1)
        coef = torch.where(a >= 0, a * below, a * chord) - beta[k] * r.split[k]
        if radii is not None:
            const = const - (coef.abs() * radii[k].to(dtype)).sum(-1)
        w, b = chain.weights[k].to(dtype), chain.biases[k].to(dtype)
        const = const + coef @ b
        a = coef @ w
    const = const + a.clamp(min=0) @ lo + a.clamp(max=0) @ hi
    point = torch.where(a >= 0, lo, hi)
    return Linear(const, point, coefs[::-1])


@dataclass(frozen=True)
class OptimizeConfig:
    """How hard the bound of a batch of domains is optimized."""

    steps: int = 20
    """Adam steps on alpha and beta."""
    lr_alpha: float = 0.1
    """Adam's step on alpha (alpha-CROWN's default)."""
    lr_beta: float = 0.05
    """Adam's step on beta (beta-CROWN's default)."""
    float32: bool = True
    """Search in float32 (about twice as fast on a CPU); the bound is recomputed in float64."""


@dataclass(frozen=True)
class Optimized:
    """A batch of domains' best slopes and multipliers, and their sound bound."""

    alpha: list[torch.Tensor]
    """(n, width) per layer, in [0, 1], float32 or float64 as optimized."""
    beta: list[torch.Tensor]
    """(n, width) per layer, >= 0."""
    result: Linear
    """The float64 bound with these alpha and beta: the one to trust."""


def optimize(
    chain: Chain,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec_w: torch.Tensor,
    spec_b: torch.Tensor,
    root: tuple[list[torch.Tensor], list[torch.Tensor]],
    split: list[torch.Tensor],
    alpha: list[torch.Tensor],
    beta: list[torch.Tensor],
    cfg: OptimizeConfig,
    deadline: float,
    enough: torch.Tensor | None = None,
    radii: list[torch.Tensor] | None = None,
) -> Optimized:
    """Adam on alpha and beta from the given start (n domains: float64 spec rows spec_w
    (n, width), spec_b (n,), root bounds (1, width) per layer, split signs (n, width)),
    keeping each domain's best, stopping early at `deadline` (time.perf_counter()) or
    once every domain's bound exceeds `enough` (n,); then the sound float64 bound with
    the best alpha and beta."""
    dtype = torch.float32 if cfg.float32 else torch.float64
    r = relax(root[0], root[1], split, dtype)
    box = lo.to(dtype), hi.to(dtype)
    sw, sb = spec_w.to(dtype), spec_b.to(dtype)
    best_a = [t.detach().to(dtype).clone() for t in alpha]
    best_b = [t.detach().to(dtype).clone() for t in beta]
    best = torch.full((len(spec_w),), -torch.inf, dtype=dtype, device=spec_w.device)
    params = [t.clone().requires_grad_(True) for t in best_a + best_b]
    n_alpha = len(best_a)
    opt = torch.optim.Adam(
        [{"params": params[:n_alpha], "lr": cfg.lr_alpha}, {"params": params[n_alpha:], "lr": cfg.lr_beta}]
    )
    with torch.enable_grad():
        for step in range(cfg.steps + 1):
            res = linear_bound(chain, *box, sw, sb, r, params[:n_alpha], params[n_alpha:], radii)
            bound = res.bound.detach()
            better = bound > best
            best = torch.where(better, bound, best)
            for dst, src in zip(best_a + best_b, params, strict=True):
                dst[better] = src.detach()[better]
            if step == cfg.steps or time.perf_counter() >= deadline:
                break
            if enough is not None and bool((best > enough.to(best.device, dtype)).all()):
                break
            opt.zero_grad(set_to_none=True)
            (-res.bound.sum()).backward()
            opt.step()
            with torch.no_grad():
                for p in params[:n_alpha]:
                    p.clamp_(0, 1)
                for p in params[n_alpha:]:
                    p.clamp_(min=0)
    return finish(chain, lo, hi, spec_w, spec_b, root, split, best_a, best_b, radii)


def finish(
    chain: Chain,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec_w: torch.Tensor,
    spec_b: torch.Tensor,
    root: tuple[list[torch.Tensor], list[torch.Tensor]],
    split: list[torch.Tensor],
    alpha: list[torch.Tensor],
    beta: list[torch.Tensor],
    radii: list[torch.Tensor] | None = None,
) -> Optimized:
    """The sound float64 bound with alpha clamped to [0, 1] and beta to >= 0."""
    r = relax(root[0], root[1], split, torch.float64)
    a64 = [t.detach().double().clamp(0, 1) for t in alpha]
    b64 = [t.detach().double().clamp(min=0) for t in beta]
    with torch.no_grad():
        res = linear_bound(chain, lo.double(), hi.double(), spec_w, spec_b, r, a64, b64, radii)
    return Optimized([t.detach() for t in alpha], [t.detach() for t in beta], res)
