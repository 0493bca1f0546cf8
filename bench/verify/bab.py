"""Branch and bound on unstable ReLUs for chains of affine ops and ReLUs (the BaB path of
the complete verifier, complete.py), after Bunel et al. (2020, "Branch and bound for
piecewise linear neural network verification") and beta-CROWN (Wang et al. 2021).

One target class j at a time, hardest first: the box is the root domain. A domain is
bounded by alpha-CROWN with beta multipliers for its splits (alpha.py); one whose bound
on z_y - z_j exceeds the target's fp32 tolerance tol_j is done (it is a subset of the
box, so the tolerance computed once over the box holds on it). complete.py runs it on the
fp32 model instead: the Problem carries the local rounding radii (times SAFETY), every
bound is then one on the perturbed family (alpha.py), and the tolerance is 0. The others are split, the
domain with the lowest bound first (best first: the global lower bound is the smallest
open domain's, and raising it is what proves the target), a batch of them at a time:
one unstable, unsplit ReLU of each becomes two children, z >= 0 (the ReLU is the
identity) and z <= 0 (it is 0). Children start from their parent's alpha and beta
(the new split's beta at 0) and take a few more Adam steps together, batched.

Which ReLU: filtered smart branching (De Palma et al. 2021). BaBSR's score (Bunel et
al. 2020) estimates, from the coefficients the domain's own bound already has, how much
splitting a ReLU removes from the bound: the chord's intercept (a negative coefficient
times -u l / (u - l)) plus the change of the bias term through its slope. It is cheap
but only an estimate; so the best few ReLUs by that score and by the intercept alone
are each tried with one bound pass of both children at the parent's alpha and beta, and
the ReLU whose worse child has the highest bound is split. Those extra passes cost a
fifth of a domain's optimization and pick better splits than either score alone.

Counterexamples: the box vertex that minimizes each child's final linear bound is
where the relaxation says the margin is lowest; each is run through the model in fp32,
then a few sign-gradient steps from the lowest ones, so that a not robust target is
usually settled long before its tree is. A counterexample must reproduce in the model
(search.py's `reproduce`) like any other.

The search runs where the Problem's tensors are (complete.py puts them on the model's
device, `Problem.to`): every tensor it makes is made there, and a round's domains are
bounded as one batch of matrix products.

A domain whose unstable ReLUs are all split is linear on its region; if its bound is still
not beyond tol_j (a margin within the fp32 tolerance, or beta not converged), it cannot
be split further and the target ends unknown unless a counterexample turns up. The
search stops at the deadline, and the target is then unknown, with the smallest open
domain's bound as its proven lower bound.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

import torch

from bench.verify.alpha import Chain, Linear, OptimizeConfig, Optimized, finish, optimize, relax
from bench.verify.search import reproduce

ROOT = OptimizeConfig(steps=60)
"""alpha-CROWN on the open targets at the box: a few rows, and every domain inherits it."""
CHILD = OptimizeConfig(steps=8)
"""Children start from their parent's alpha and beta, so a few steps move them far enough."""


@dataclass(frozen=True)
class BaBConfig:
    """The branch and bound's effort per round and its limits."""

    min_unstable: int = 64
    """Unstable ReLUs (after CROWN) from which complete.py takes this path rather than
    the MILP's (chains only). Measured (benchmarks/bab_mlp.py, 1 thread): on digits_mlp
    (at most 26 unstable) both decide every image, the MILP exactly (no domain left
    undecidable, ties settled); on 784-256x2 nets at eps 0.05 (about 100-200 unstable)
    the MILP itself decides none of the images the bounds leave open in 60 s, and branch
    and bound most of them in seconds."""
    batch: int = 64
    """Domains split per round (each gives two children, bounded together)."""
    root: OptimizeConfig = ROOT
    """alpha-CROWN at the box, all open targets at once."""
    child: OptimizeConfig = CHILD
    """Adam steps of each round's children, warm-started from their parents."""
    candidates: int = 3
    """ReLUs tried by filtered smart branching, per score (0: BaBSR's best alone)."""
    attack_steps: int = 8
    """Sign-gradient steps from the children's vertices each round (0: vertices only)."""
    attack_starts: int = 16
    """Children (lowest bound first) the attack starts from each round."""
    max_domains: int = 100_000
    """Open domains kept at most (memory); beyond it the target is left unknown."""


@dataclass(frozen=True)
class Outcome:
    """One target's branch and bound."""

    status: str
    """robust (every domain's bound beyond tol), not_robust (a counterexample) or unknown."""
    lower: float
    """A proven lower bound on z_y - z_j over the box (exact arithmetic)."""
    x_adv: torch.Tensor | None
    """For not_robust: an input of the box the model misclassifies in fp32, on the CPU."""
    domains: int
    """Domains bounded (the root included)."""


@dataclass(frozen=True)
class Problem:
    """One image's box and chain, what every target's search shares."""

    chain: Chain
    lo: torch.Tensor
    """(d,) float64 box."""
    hi: torch.Tensor
    root: tuple[list[torch.Tensor], list[torch.Tensor]]
    """Pre-activation (lower, upper) bounds of each ReLU layer over the box, (1, width)."""
    model: torch.nn.Module
    y: int
    box32: tuple[torch.Tensor, torch.Tensor]
    """The fp32 box (1, *input shape), rounded inward (search.box32)."""
    radii: tuple[list[torch.Tensor], torch.Tensor] | None = None
    """For bounds on the fp32 model (complete.py): the local rounding radii
    (rounding.local_radii) of each ReLU layer's pre-activation, (1, width), and of the
    logits, (classes,), each already multiplied by rounding.SAFETY, so that a bound > 0
    proves the model's margin (`root` then bounds the fp32 values). None: the bounds
    are the graph's in exact arithmetic."""

    def spec(self, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b): the margins z_y - z_j of `targets` folded into the last op (less the
        logits' perturbation r_y + r_j, with `radii`)."""
        w, b = self.chain.weights[-1], self.chain.biases[-1]
        t = torch.tensor(targets, device=self.device)
        const = b[self.y] - b[t]
        if self.radii is not None:
            last = self.radii[1]
            const = const - (last[self.y] + last[t])
        return w[self.y][None] - w[t], const

    @property
    def layer_radii(self) -> list[torch.Tensor] | None:
        return None if self.radii is None else self.radii[0]

    @property
    def device(self) -> torch.device:
        """Where the search runs: every tensor it makes is made here."""
        return self.lo.device

    def to(self, device: torch.device) -> Problem:
        """The problem with every tensor the search reads on `device`."""

        def move(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in ts]

        radii = None if self.radii is None else (move(self.radii[0]), self.radii[1].to(device))
        return replace(
            self,
            chain=self.chain.to(device),
            lo=self.lo.to(device),
            hi=self.hi.to(device),
            root=(move(self.root[0]), move(self.root[1])),
            box32=(self.box32[0].to(device), self.box32[1].to(device)),
            radii=radii,
        )

    def no_split(self, n: int) -> list[torch.Tensor]:
        return [torch.zeros(n, m, dtype=torch.int8, device=self.device) for m in self.chain.widths]

    def zeros(self, n: int, dtype) -> list[torch.Tensor]:
        return [torch.zeros(n, m, dtype=dtype, device=self.device) for m in self.chain.widths]


def root_bounds(p: Problem, targets: list[int], cfg: BaBConfig, deadline: float, enough: torch.Tensor) -> Optimized:
    """alpha-CROWN on the whole box for each target (one row each)."""
    n = len(targets)
    split = p.no_split(n)
    r = relax(*p.root, split, torch.float64)
    alpha = [(u >= -low).double().expand(n, -1) for low, u in zip(r.lower, r.upper, strict=True)]
    w, b = p.spec(targets)
    return optimize(
        p.chain,
        p.lo,
        p.hi,
        w,
        b,
        p.root,
        split,
        alpha,
        p.zeros(n, torch.float64),
        cfg.root,
        deadline,
        enough,
        p.layer_radii,
    )


@dataclass
class _Pool:
    """Open domains, kept as the batches they were made in (no copy of the whole pool per
    round); `pop` takes the lowest bounds across them."""

    chunks: list[dict] = field(default_factory=list)

    def push(self, split, alpha, beta, bound, branch) -> None:
        if len(bound):
            self.chunks.append(
                {
                    "split": split,
                    "alpha": alpha,
                    "beta": beta,
                    "bound": bound.clone(),
                    "branch": branch,
                    "open": len(bound),
                }
            )

    def __len__(self) -> int:
        return sum(c["open"] for c in self.chunks)

    def lowest(self) -> float:
        return min((float(c["bound"].min()) for c in self.chunks), default=float("inf"))

    def pop(self, k: int) -> dict:
        """The k domains with the lowest bounds, as one batch, removed from the pool."""
        sizes = [len(c["bound"]) for c in self.chunks]
        allb = torch.cat([c["bound"] for c in self.chunks])
        take = torch.topk(allb, min(k, len(self)), largest=False).indices
        take = take[torch.isfinite(allb[take])]
        start = [0, *itertools.accumulate(sizes)]
        out: dict = {key: [] for key in ("split", "alpha", "beta", "bound", "branch")}
        for ci, c in enumerate(self.chunks):
            rows = take[(take >= start[ci]) & (take < start[ci + 1])] - start[ci]
            if not len(rows):
                continue
            for key in ("split", "alpha", "beta"):
                out[key].append([t[rows] for t in c[key]])
            out["bound"].append(c["bound"][rows])
            out["branch"].append(c["branch"][rows])
            c["bound"][rows] = float("inf")  # taken: never the lowest again
            c["open"] -= len(rows)
        self.chunks = [c for c in self.chunks if c["open"] > 0]
        batch: dict = {
            key: [torch.cat(parts) for parts in zip(*out[key], strict=True)] for key in ("split", "alpha", "beta")
        }
        batch["bound"], batch["branch"] = torch.cat(out["bound"]), torch.cat(out["branch"])
        return batch


def _unsplit_unstable(p: Problem, split: list[torch.Tensor]) -> list[torch.Tensor]:
    low, up = p.root
    return [(s == 0) & (lw < 0) & (u > 0) for lw, u, s in zip(low, up, split, strict=True)]


def _scores(p: Problem, res: Linear, split: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(BaBSR's score, the intercept's) (n, all neurons), -inf where no split is possible."""
    babsr, icpt = [], []
    for k, (mask, a) in enumerate(zip(_unsplit_unstable(p, split), res.coefs, strict=True)):
        low, up = p.root[0][k], p.root[1][k]
        width = (up - low).clamp(min=1e-300)
        intercept = a.clamp(max=0) * (-low * up / width)  # <= 0: what the chord costs the bound
        bias = a * p.chain.biases[k]
        ratio = up / width
        score = (torch.minimum(bias * (ratio - 1), bias * ratio) + intercept).abs()
        babsr.append(torch.where(mask, score, -torch.inf))
        icpt.append(torch.where(mask, -intercept, -torch.inf))
    return torch.cat(babsr, 1), torch.cat(icpt, 1)


def _set(split: list[torch.Tensor], flat: torch.Tensor, sign: int, widths: list[int]) -> list[torch.Tensor]:
    """Copies of `split` with neuron flat[i] (an index over all layers) of row i set to sign."""
    out, start = [], 0
    rows = torch.arange(len(flat), device=flat.device)
    for s, m in zip(split, widths, strict=True):
        s = s.clone()
        inside = (flat >= start) & (flat < start + m)
        s[rows[inside], flat[inside] - start] = sign
        out.append(s)
        start += m
    return out


def _branch(
    p: Problem, spec: tuple[torch.Tensor, torch.Tensor], opt: Optimized, split: list[torch.Tensor], cfg: BaBConfig
) -> torch.Tensor:
    """Per domain, the ReLU (flat index over all layers) to split next; -1 where none is left."""
    babsr, icpt = _scores(p, opt.result, split)
    n, widths = len(babsr), p.chain.widths
    best = babsr.argmax(1)
    possible = torch.isfinite(babsr.amax(1))
    if cfg.candidates > 0 and n:
        k = min(cfg.candidates, babsr.shape[1])
        cand = torch.cat([babsr.topk(k, 1).indices, icpt.topk(k, 1).indices], 1)  # (n, 2k)
        c = cand.shape[1]
        rows = torch.arange(n, device=babsr.device).repeat_interleave(c)
        flat = cand.flatten()
        alpha = [t.double()[rows] for t in opt.alpha]
        beta = [t.double()[rows] for t in opt.beta]
        sw, sb = spec[0][rows], spec[1][rows]
        worst = None
        for sign in (1, -1):
            s = _set([t[rows] for t in split], flat, sign, widths)
            res = finish(p.chain, p.lo, p.hi, sw, sb, p.root, s, alpha, beta, p.layer_radii).result.bound
            worst = res if worst is None else torch.minimum(worst, res)
        assert worst is not None
        valid = torch.isfinite(torch.cat([babsr.gather(1, cand[:, :k]), icpt.gather(1, cand[:, k:])], 1))
        worst = torch.where(valid.flatten(), worst, -torch.inf).view(n, c)
        best = torch.where(torch.isfinite(worst.amax(1)), cand.gather(1, worst.argmax(1, keepdim=True))[:, 0], best)
    return torch.where(possible, best, -1)


def _attack(p: Problem, points: torch.Tensor, steps: int) -> torch.Tensor | None:
    """A counterexample among the vertices `points` (n, d) or a few sign steps from them."""
    lo32, hi32 = p.box32
    lo, hi = lo32.flatten(1), hi32.flatten(1)
    xs = torch.maximum(torch.minimum(points.float(), hi), lo)
    step = 2.5 * float((hi - lo).max()) / 2 / max(steps, 1)
    for i in range(steps + 1):
        xs = xs.detach().requires_grad_(i < steps)
        with torch.enable_grad():
            z = p.model(xs.view(-1, *lo32.shape[1:]))
            others = z.detach().clone()
            others[:, p.y] = -torch.inf
            margin = z[:, p.y] - z.gather(1, others.argmax(1, keepdim=True))[:, 0]
        for h in torch.nonzero(margin.detach() < 0).flatten().tolist():
            found = reproduce(p.model, xs[h].detach(), p.y, lo32, hi32)
            if found is not None:
                return found
        if i == steps:
            break
        (grad,) = torch.autograd.grad(margin.sum(), xs)
        xs = torch.maximum(torch.minimum(xs.detach() - step * grad.sign(), hi), lo)
    return None


def branch_and_bound(
    p: Problem, target: int, tol: float, start: Optimized, row: int, cfg: BaBConfig, deadline: float
) -> Outcome:
    """Branch and bound on target j = `target` from its root bound (row `row` of `start`,
    root_bounds' result), until every domain's bound exceeds `tol`, a counterexample
    turns up, or `deadline` (time.perf_counter()) passes."""
    spec1 = p.spec([target])
    alpha = [t[row : row + 1] for t in start.alpha]
    beta = [t[row : row + 1] for t in start.beta]
    bound = start.result.bound[row : row + 1]
    if float(bound[0]) > tol:
        return Outcome("robust", float(bound[0]), None, 1)
    split = p.no_split(1)
    one = Optimized(
        alpha, beta, Linear(bound, start.result.point[row : row + 1], [c[row : row + 1] for c in start.result.coefs])
    )
    pool = _Pool()
    pool.push(split, alpha, beta, bound, _branch(p, spec1, one, split, cfg))
    proven, domains, stuck = float("inf"), 1, float("inf")
    widths = p.chain.widths
    while len(pool):
        if time.perf_counter() >= deadline or len(pool) > cfg.max_domains:
            return Outcome("unknown", min(proven, pool.lowest(), stuck), None, domains)
        parents = pool.pop(cfg.batch)
        n = len(parents["bound"])
        active = _set(parents["split"], parents["branch"], 1, widths)
        inactive = _set(parents["split"], parents["branch"], -1, widths)
        split = [torch.cat(pair) for pair in zip(active, inactive, strict=True)]
        spec = (spec1[0].expand(2 * n, -1), spec1[1].expand(2 * n))
        alpha = [t.repeat(2, 1) for t in parents["alpha"]]
        beta = [t.repeat(2, 1) for t in parents["beta"]]
        enough = torch.full((2 * n,), tol, dtype=torch.float64, device=p.device)
        opt = optimize(
            p.chain, p.lo, p.hi, *spec, p.root, split, alpha, beta, cfg.child, deadline, enough, p.layer_radii
        )
        domains += 2 * n
        bound = torch.maximum(opt.result.bound, parents["bound"].repeat(2))  # a child is a subset of its parent
        order = torch.argsort(bound)[: cfg.attack_starts]
        found = _attack(p, opt.result.point[order], cfg.attack_steps)
        if found is not None:
            lower = min(proven, pool.lowest(), float(bound.min()), stuck)
            return Outcome("not_robust", lower, found.cpu(), domains)
        done = bound > tol
        if bool(done.any()):
            proven = min(proven, float(bound[done].min()))
        keep = ~done
        branch = _branch(p, spec, opt, split, cfg)
        dead_end = keep & (branch < 0)
        if bool(dead_end.any()):
            stuck = min(stuck, float(bound[dead_end].min()))
        keep &= branch >= 0
        pool.push(
            [s[keep] for s in split],
            [t[keep] for t in opt.alpha],
            [t[keep] for t in opt.beta],
            bound[keep],
            branch[keep],
        )
    if stuck < float("inf"):
        return Outcome("unknown", min(proven, stuck), None, domains)
    return Outcome("robust", proven, None, domains)
