"""Adaptive attacks: what a model's admission checks call for.

- `BPDA`: for a model author. Wrap a non-differentiable step (quantization, JPEG, a
  denoiser that is not differentiable) so that its forward pass is exact and its
  backward pass is the identity or a differentiable approximation the author gives
  (Athalye et al. 2018, Backward Pass Differentiable Approximation). Every gradient
  attack of the matrix then follows the approximation, with no change to the attack.
- `EOT`: the view of a randomized model that gradient attacks see: the mean logits of
  `passes` forward passes, so the attack's gradient is averaged over the model's
  randomness (Expectation over Transformation, as AutoAttack's `rand` version averages
  its gradients).
- `adapt_cells`: a model whose forward pass varies gets its gradient cells crafted
  through EOT (AutoAttack runs its own `rand` version, which averages over 20 passes;
  Square and SPSA, which read only outputs, run as they are), and every cell judged by a
  majority of passes, all recorded in the cell key (`...,eot=8,rounds=3,votes=21`). A
  sample counts as correct when more than half of `votes` passes classify it correctly
  (the same seeded passes for every verdict), and as robust when it stays correct
  through `rounds` attacks, each on what the verdict left standing (an attack stops at
  the first iterate its noisy view misclassifies, where the verdict is a coin flip). One
  noisy pass can neither save a sample (the model does not look robust because of its
  noise) nor remove one (the per-sample AND over many cells does not pile up each cell's
  unlucky draws).
- a model whose gradients say nothing (zero on some sample, or disagreeing with finite
  differences of its forward pass) also gets the witness cells, `WITNESS`: attacks that
  need no gradient from it (attacks.distill, a surrogate distilled from its answers).
- a model whose gradient disagrees with its forward pass and whose forward applies custom
  autograd.Functions also gets every gradient cell of its threat model again, crafted
  through `FORWARD_VIEW` (bench.engine.mirror.ThroughForward: each Function
  differentiated through its own forward, BPDA's mirror, where the forward is the truth
  and the backward is not trusted), the view's tag in the key (`...,grad=forward`).
  A surrogate distilled from a robust model's answers falls short of the model's own
  gradient; the forward's gradient is that gradient wherever the forward is
  differentiable. Like every cell, these are judged on the model itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from bench.core import contract
from bench.core.cells import Cell, cell_key, make_cell
from bench.engine.mirror import ThroughForward
from bench.science.admitted import forward_differentiable, gradients_say_nothing, is_randomized

EOT_PASSES = 8
"""Forward passes averaged per gradient step on a randomized model."""
ROUNDS = 3
"""Attack rounds on a randomized model: each attacks what the verdict left standing."""
VOTES = 21
"""Independent passes that judge a randomized model's prediction; odd, so a majority exists.
A sample the model gets right with probability 0.9 a pass is misjudged when at most 10 of
the 21 are right: P(Binomial(21, 0.9) <= 10) = 1.35e-6 (0.8: 9.7e-4; 0.7: 2.6e-2).
Thirty cells judged by independent passes would remove it with probability 4.1e-5; every
verdict uses the same seeded passes instead (bench.engine.verdicts.majority_correct)."""


class _StraightThrough(torch.autograd.Function):
    """Forward: `exact`; backward: the incoming gradient to `approx`, unchanged."""

    @staticmethod
    def forward(ctx, approx, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class BPDA(torch.nn.Module):
    """A non-differentiable step made attackable: exact forward, approximate backward.

    `forward_fn(x)` is the exact step. `backward_fn(x)` is a differentiable function
    whose gradient stands in for the step's; None means the identity (the straight-
    through estimator, right for steps that return something close to their input, such
    as quantization). The output equals `forward_fn(x)` exactly; its gradient with
    respect to x is that of `backward_fn(x)`.

        class Quantized(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net, self.round = net, BPDA(lambda x: torch.round(x * 3) / 3)
            def forward(self, x):
                return self.net(self.round(x))
    """

    def __init__(
        self,
        forward_fn: Callable[[torch.Tensor], torch.Tensor],
        backward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.forward_fn = forward_fn
        self.backward_fn = backward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            exact = self.forward_fn(x)
        if not x.requires_grad:
            return exact
        # The exact values go forward (bit for bit: no `approx + (exact - approx)` rounding);
        # the gradient goes back through the approximation's graph, or straight to x.
        approx = x if self.backward_fn is None else self.backward_fn(x)
        return _StraightThrough.apply(approx, exact)


def adaptive_key(key: str, eot: int, votes: int, rounds: int = 1) -> str:
    return key + (f",eot={eot}" if eot > 1 else "") + (f",rounds={rounds}" if rounds > 1 else "") + f",votes={votes}"


WITNESS = ("distill",)
"""The attacks added, with their defaults, for a model whose gradients say nothing
(`gradients_say_nothing`)."""


FORWARD_VIEW = ThroughForward
"""The view gradient cells are crafted through again for a model whose custom backward
disagrees with its forward (`forward_differentiable`); `TAG` names it in the cell key."""


def through(cell: Cell, view=FORWARD_VIEW) -> Cell:
    """The cell crafted through `view` of the model (its TAG added to the key)."""
    return dataclasses.replace(cell, key=f"{cell.key},{view.TAG}", view=view)


def _follows_gradients(c: Cell, radii: list | None) -> bool:
    """A cell that follows the model's gradients (no `queries_only`, no verifier), on the
    model as it is, toward one of the threat models `radii` (when given)."""
    return (
        c.view is None
        and not contract.hooks(c.config).queries_only
        and not c.verifier
        and (radii is None or c.threat in {t.name for t in radii})
    )


def run_radii(cells: list[Cell], threat) -> list:
    """The dataset's threat model at each L-inf radius the cells run at (its own, or a
    run's `--eps`); its own where none does."""
    eps = sorted({float(c.threat.removeprefix("linf-")) for c in cells if c.threat.startswith("linf-")})
    return [threat if e == threat.eps else threat.at(e) for e in eps] or [threat]


def adapt_cells(cells: list[Cell], admission: dict | None, threat=None) -> list[Cell]:
    """The cells as this model needs them: the witness cells if its gradients say nothing
    (given the dataset's `threat`, which fills their budgets at each radius the cells run
    at); its gradient cells (of those L-inf radii) again through the forward's own gradient if a custom backward
    disagrees with its forward; then EOT crafting and majority votes if it is randomized."""
    keys = {c.key for c in cells}
    radii = run_radii(cells, threat) if threat is not None else None
    if radii is not None and gradients_say_nothing(admission):
        extra = [make_cell(name, {}, t) for t in radii for name in WITNESS]
        cells = cells + [c for c in extra if c.key not in keys]
    if forward_differentiable(admission):
        mirrored = [through(c) for c in cells if _follows_gradients(c, radii)]
        cells = cells + [c for c in mirrored if c.key not in keys]
    if not is_randomized(admission):
        return cells
    return [_for_randomized(c) for c in cells]


def _for_randomized(c: Cell) -> Cell:
    """EOT for gradient attacks; none for attacks that read only outputs (config
    `queries_only`) or that average over passes themselves (config `for_randomized()`,
    AutoAttack's `rand` version); majority votes and rounds for all."""
    config, key, eot = c.config, c.key, EOT_PASSES
    if contract.hooks(config).queries_only:
        eot = 1
    own = contract.for_randomized(config)
    if own is not None:
        config, eot = own, 1
        key = cell_key(c.attack, config, c.subset)
    return dataclasses.replace(
        c, config=config, key=adaptive_key(key, eot, VOTES, ROUNDS), eot=eot, votes=VOTES, rounds=ROUNDS
    )
