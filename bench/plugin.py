"""The plugin API: everything a defense in defenses/ or an attack in attacks/ may use from
the bench. Plugins import this module (and each other's public parts), nothing else of
bench/; import-linter holds them to it (pyproject.toml).

- registration: `register_defense`, `register_attack`;
- what an attack config declares (`AttackConfig`, the hooks the harness reads): its
  `Role` and, for a verifier, its `CellKind`;
- what an attack returns: `Crafted` (its inputs, and a verifier's `CompleteVerdicts` or
  `CertifiedVerdicts`);
- range checks for config `__post_init__`: `at_least`, `positive`, `non_negative`,
  `in_range`, `one_of`, `radius`, and `NORMS`;
- the attack objectives on logits: `xent`, `cw_margin`, `LOSSES`;
- `exact_view`: a model's exact graph rewrite (the same gradients, bit for bit, faster);
- `full_fp32`: true fp32 arithmetic (no TF32 on CUDA) for an attack's own confirmations;
- `seed_from`: an integer seed drawn from a cell's generator, for libraries that take
  a seed rather than a generator;
- the verifier (bench.verify): `to_graph`, `verify_images`, `certify`, `interval_margin`
  for the verifier cells, and `ibp_bounds` (differentiable interval bounds on the
  logits) for interval bound propagation training.
"""

from __future__ import annotations

import torch

from bench.core.contract import AttackConfig, CertifiedVerdicts, CompleteVerdicts, Crafted
from bench.core.kinds import CellKind, Role
from bench.engine.device import full_fp32
from bench.engine.losses import LOSSES, cw_margin, xent
from bench.engine.rewrite import exact_view
from bench.registry import register_attack, register_defense
from bench.validate import NORMS, at_least, in_range, non_negative, one_of, positive, radius
from bench.verify import certify, ibp_bounds, interval_margin, to_graph, verify_images

__all__ = [
    "LOSSES",
    "NORMS",
    "AttackConfig",
    "CellKind",
    "CertifiedVerdicts",
    "CompleteVerdicts",
    "Crafted",
    "Role",
    "at_least",
    "certify",
    "cw_margin",
    "exact_view",
    "full_fp32",
    "ibp_bounds",
    "in_range",
    "interval_margin",
    "non_negative",
    "one_of",
    "positive",
    "radius",
    "register_attack",
    "register_defense",
    "seed_from",
    "to_graph",
    "verify_images",
    "xent",
]


def seed_from(generator: torch.Generator | None) -> int:
    """The integer seed a seeded library gets: the next draw of the cell's generator."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
