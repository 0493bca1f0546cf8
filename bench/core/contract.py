"""The contract between the harness and an attack plugin, declared once.

An attack is `perturb(model, x, y, config, *, generator) -> Crafted`. Its config is a
frozen dataclass (attacks/) with the two methods of `AttackConfig`, `with_threat` and
`threat_key`; the other hooks are optional, and a config that leaves one out gets the
default written here. The harness reads every hook through `hooks` and the functions
below, never with `getattr` at the place of use, so the defaults live in this module
alone and a new hook is added in one place.

What an attack returns is a `Crafted`: its inputs and, for a verifier cell, its
per-image verdicts (`CompleteVerdicts` or `CertifiedVerdicts`, as its kind says).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from bench.core.kinds import CellKind, Role


class AttackConfig(Protocol):
    """What the harness reads from an attack's frozen config.

    Required:

    - to be a frozen dataclass: its fields are the cell's key and its stored `params`;
    - `with_threat(threat)`: the config with every unset budget filled from the dataset's
      threat model (bench.core.data.ThreatModel); a config with nothing to fill may leave
      it out and is used as it is.
    - `threat_key()`: the threat model its cell counts toward, e.g. `linf-0.2`.

    Optional, with their defaults (see `Hooks`):

    - `role: ClassVar[Role]`: its place among the attacks (default `Role.OTHER`);
    - `kind: ClassVar[CellKind]`: what its cell's bits say (default `CellKind.ATTACK`;
      a verifier's is VERIFY or CERTIFY);
    - `verifier: ClassVar[bool]`: it returns per-image verdicts besides its inputs
      (default False);
    - `batch_limit: ClassVar[int]`: most images per call (default: no limit);
    - `queries_only: ClassVar[bool]`: it reads only the model's outputs, so a randomized
      model is not averaged for it (default False);
    - `norm`, `eps`: the ball it promises to stay in (default: the one its threat key
      names);
    - `for_transfer()`: the config that crafts examples for another model (default: the
      config itself);
    - `for_randomized()`: its own version for a randomized model, which averages over
      passes itself (default: none; the harness averages for it).
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def with_threat(self, threat: Any) -> AttackConfig: ...

    def threat_key(self) -> str: ...


@dataclass(frozen=True)
class Hooks:
    """The optional declarations of an attack config, each with its default."""

    role: Role = Role.OTHER
    kind: CellKind = CellKind.ATTACK
    verifier: bool = False
    batch_limit: int | None = None
    """None: any batch size."""
    queries_only: bool = False
    norm: str | None = None
    """None: the norm the threat key names."""
    eps: float | None = None
    """None: the radius the threat key names."""


_DEFAULT = Hooks()


def hooks(config: Any) -> Hooks:
    """The hooks `config` declares, defaults for the rest."""
    d = _DEFAULT
    return Hooks(
        role=getattr(config, "role", d.role),
        kind=getattr(config, "kind", d.kind),
        verifier=getattr(config, "verifier", d.verifier),
        batch_limit=getattr(config, "batch_limit", d.batch_limit),
        queries_only=getattr(config, "queries_only", d.queries_only),
        norm=getattr(config, "norm", d.norm),
        eps=getattr(config, "eps", d.eps),
    )


def with_threat(config: Any, threat: Any) -> Any:
    """The config with its unset budgets filled from `threat` (itself if it has none)."""
    fill = getattr(config, "with_threat", None)
    return config if fill is None else fill(threat)


def for_transfer(config: Any) -> Any | None:
    """The config's version for crafting transfers, or None where it declares none."""
    make = getattr(config, "for_transfer", None)
    return None if make is None else make()


def for_randomized(config: Any) -> Any | None:
    """The config's own version for a randomized model, or None where it declares none."""
    make = getattr(config, "for_randomized", None)
    return None if make is None else make()


@dataclass(frozen=True)
class CompleteVerdicts:
    """A complete verifier's verdicts (CellKind.VERIFY), one entry per image in order."""

    status: tuple[str, ...]
    """`robust`, `not_robust` (its counterexample is the returned input) or `unknown`."""
    decided_by: tuple[str, ...]
    """What settled each image (the bounds, the search, the MILP, branch and bound, the time limit)."""
    seconds: torch.Tensor
    """float64: time spent on each image."""
    unstable: torch.Tensor
    """int64: ReLUs the bounds left unstable."""
    binaries: torch.Tensor
    """int64: binary variables of the MILP (0 where it was not built)."""
    tolerance: torch.Tensor
    """float64: the fp32 rounding tolerance each proven margin had to exceed."""

    @staticmethod
    def concat(parts: list[CompleteVerdicts]) -> CompleteVerdicts:
        """The verdicts of consecutive batches as one record."""
        return CompleteVerdicts(
            sum((p.status for p in parts), ()),
            sum((p.decided_by for p in parts), ()),
            torch.cat([p.seconds for p in parts]),
            torch.cat([p.unstable for p in parts]),
            torch.cat([p.binaries for p in parts]),
            torch.cat([p.tolerance for p in parts]),
        )


@dataclass(frozen=True)
class CertifiedVerdicts:
    """A sound relaxation's verdicts (CellKind.CERTIFY), one entry per image in order."""

    certified: torch.Tensor
    """bool: proven robust."""
    margin: torch.Tensor
    """float64: the proven lower bound on min_j z_y - z_j over the ball."""

    @staticmethod
    def concat(parts: list[CertifiedVerdicts]) -> CertifiedVerdicts:
        """The verdicts of consecutive batches as one record."""
        return CertifiedVerdicts(torch.cat([p.certified for p in parts]), torch.cat([p.margin for p in parts]))


@dataclass(frozen=True)
class Crafted:
    """What an attack returns for one batch."""

    x_adv: torch.Tensor
    """The inputs it crafted, the shape of x (the harness holds them to the ball)."""
    verdicts: CompleteVerdicts | CertifiedVerdicts | None = None
    """A verifier cell's per-image verdicts (on the CPU); None for an attack."""
