"""Complete verification as a cell: per image, robust, not robust (with a counterexample)
or unknown (the per-image time limit ran out): CROWN, a PGD search, then branch and
bound on optimized linear bounds (alpha- and beta-CROWN style) for a chain of affine ops
and ReLUs with many unstable ReLUs, or Tjeng, Xiao & Tedrake (2019)'s MILP encoding
solved with HiGHS for the rest (bench.verify).

A counterexample is an input like any attack's: it is returned as the cell's adversarial
example, held to the ball by the harness, judged by the model in fp32, and so enters the
worst case; one that does not reproduce fails the cell (bench.engine.verified). Images
called robust or unknown are returned as they are. Robust means robust for the model in
fp32: each proven margin beyond its rounding tolerance, the graph held to the model on
the box (bench.verify.verify_images). The network must be one the verifier
takes (ReLU networks of Linear, Conv2d, BatchNorm, Normalize, MaxPool2d, Flatten and
residual adds); any other is refused with one line naming the layer.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from bench.plugin import (
    CellKind,
    CompleteVerdicts,
    Crafted,
    Role,
    one_of,
    positive,
    radius,
    register_attack,
    to_graph,
    verify_images,
)

_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def graph_of(model: torch.nn.Module, shape: tuple[int, ...]):
    """The verifier's graph of the model on inputs of `shape` (C, H, W), built once per
    model and weights (a cell calls the attack once per batch of images)."""
    key = (shape, tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers())))
    cached = _GRAPHS.get(model)
    if cached is None or cached[0] != key:
        cached = _GRAPHS[model] = (key, to_graph(model, shape))
    return cached[1]


@dataclass(frozen=True)
class Verify:
    role: ClassVar[Role] = Role.TRUTH
    """A verifier cell."""
    kind: ClassVar[CellKind] = CellKind.VERIFY
    verifier: ClassVar[bool] = True
    """Returns per-image verdicts besides its inputs (CompleteVerdicts, bench.engine.verified)."""
    batch_limit: ClassVar[int] = 8
    """Images per call, so a long cell's progress moves."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    method: str = "milp"
    """`milp`: bounds, a seeded PGD search, then the MILP (bench.verify.milp)."""
    time_limit: float = 10.0
    """Seconds per image; an image still undecided then is `unknown`."""

    def __post_init__(self):
        one_of("method", self.method, ("milp",))
        radius("eps", self.eps, "linf")
        positive("time_limit", self.time_limit)

    def with_threat(self, threat) -> Verify:
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


@register_attack("verify", config=Verify)
def perturb(model, x, y, cfg: Verify, *, generator=None) -> Crafted:
    """Complete verification (MILP through HiGHS): per image robust, a counterexample, or unknown."""
    verdicts = verify_images(graph_of(model, tuple(x.shape[1:])), model, x, y, cfg.eps, time_limit=cfg.time_limit)
    x_adv = x.clone()
    for i, v in enumerate(verdicts):
        if v.x_adv is not None:
            x_adv[i] = v.x_adv.to(x.device, x.dtype).view_as(x[i])
    return Crafted(
        x_adv,
        CompleteVerdicts(
            status=tuple(v.status for v in verdicts),
            decided_by=tuple(v.decided_by for v in verdicts),
            seconds=torch.tensor([v.seconds for v in verdicts], dtype=torch.float64),
            unstable=torch.tensor([v.unstable for v in verdicts], dtype=torch.int64),
            binaries=torch.tensor([v.binaries for v in verdicts], dtype=torch.int64),
            tolerance=torch.tensor([v.tolerance for v in verdicts], dtype=torch.float64),
        ),
    )
