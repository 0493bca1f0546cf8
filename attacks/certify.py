"""A certified floor as a cell: per image, whether a sound linear relaxation of the
network proves that no input of the L-inf ball changes its label (CROWN-style bounds,
bench.verify.bounds; or plain interval bounds, `method = "ibp"`, for comparison).

It perturbs nothing: the inputs come back as they are, and its robust bits are the
certified ones, a lower bound on the true robust accuracy. Its kind (`CellKind.CERTIFY`)
keeps it out of the worst case, which is an upper bound; the bracket between the two is
what the boards show.

An image is certified only where each bound on z_y - z_j exceeds the fp32 rounding
tolerance of that pair, for either method, and the graph is first held to the model on
points of each image's box (bench.verify.certify): the claim is about the model as it
runs, not about a float64 copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from attacks.verify import graph_of
from bench.plugin import CellKind, CertifiedVerdicts, Crafted, Role, certify, one_of, radius, register_attack


@dataclass(frozen=True)
class Certify:
    role: ClassVar[Role] = Role.TRUTH
    """A verifier cell."""
    kind: ClassVar[CellKind] = CellKind.CERTIFY
    verifier: ClassVar[bool] = True
    """Returns per-image verdicts besides its inputs (CertifiedVerdicts, bench.engine.verified)."""
    eps: float | None = None
    """L-inf radius; unset means the dataset's threat model."""
    method: str = "crown"
    """`crown` (linear bounds back-substituted to the input) or `ibp` (intervals)."""

    def __post_init__(self):
        one_of("method", self.method, ("crown", "ibp"))
        radius("eps", self.eps, "linf")

    def with_threat(self, threat) -> Certify:
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self) -> str:
        return f"linf-{self.eps:g}"


@register_attack("certify", config=Certify)
def perturb(model, x, y, cfg: Certify, *, generator=None) -> Crafted:
    """A certified floor: the images a sound linear relaxation (CROWN) proves robust; inputs unchanged."""
    graph = graph_of(model, tuple(x.shape[1:]))
    bits, margin = certify(graph, x, y, cfg.eps, model=model, method=cfg.method)
    return Crafted(
        x.clone(),
        CertifiedVerdicts(certified=torch.as_tensor(bits).bool().cpu(), margin=torch.as_tensor(margin).double().cpu()),
    )
