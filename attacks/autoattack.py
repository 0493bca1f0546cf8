"""AutoAttack (Croce & Hein, 2020) through the `pyautoattack` package.

The standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5,000
queries), each run only on the samples the earlier ones left unbroken. Every sample
keeps its own adversary (x itself where nothing broke it), so the cell stores
per-sample results like any other and enters the worst case.

Around the package it behaves like a bench attack (attacks._packaged holds how, for
every attack run through pyautoattack): seeded from the cell's generator with torch's
global generator saved and restored, in fp32 whatever the caller's autocast, quiet,
and with the package's own sanity checks (randomized or dynamic model, probabilities
instead of logits, zero gradients, Square beating the gradient attacks) re-raised as
`AutoAttackWarning`s, so that bench.engine.cell.run_cell records them and
flags.autoattack_warning fires.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from pyautoattack import AutoAttack as PackageAutoAttack

from attacks._packaged import AutoAttackWarning, package_run, reraise
from bench.plugin import NORMS, Crafted, Role, one_of, radius, register_attack, seed_from

__all__ = ["AutoAttack", "AutoAttackWarning", "perturb", "run_autoattack"]


@dataclass(frozen=True)
class AutoAttack:
    role: ClassVar[Role] = Role.ENSEMBLE
    """An ensemble with a black-box member (Square): never a white-box reference."""
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    version: str = "standard"
    """pyautoattack's version: `standard` (APGD-CE, APGD-T, FAB-T, Square), `plus`
    (adds APGD-DLR and untargeted FAB, with 5 restarts each; slower) or `rand` (for
    randomized models: APGD-CE and APGD-DLR, each gradient averaged over 20 passes)."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        one_of("version", self.version, ("standard", "plus", "rand"))
        radius("eps", self.eps, self.norm)

    def with_threat(self, threat) -> AutoAttack:
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"

    def for_randomized(self) -> AutoAttack:
        """AutoAttack's own version for randomized models, which averages its gradients
        over passes itself (bench.science.adaptive then adds no EOT wrapper)."""
        return replace(self, version="rand")


def run_autoattack(model, x, y, cfg: AutoAttack, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(x_adv, the package's warnings) for one batch; the global RNG is left untouched."""
    with package_run(x) as messages:
        attack = PackageAutoAttack(
            model,
            norm="Linf" if cfg.norm == "linf" else "L2",
            eps=cfg.eps,
            version=cfg.version,
            seed=seed,
            device=x.device,
        )
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
    return x_adv, messages


@register_attack("autoattack", config=AutoAttack)
def perturb(model, x, y, cfg: AutoAttack, *, generator=None) -> Crafted:
    """AutoAttack at the cell's eps, in the cell's version (standard, plus or rand),
    seeded from the generator."""
    x_adv, messages = run_autoattack(model, x, y, cfg, seed_from(generator))
    reraise(messages)
    # Its sub-attacks clamp to [0, 1] themselves, so this is an exact no-op kept as a
    # guard; nothing else is touched (x + (x_adv - x) could move a pixel by a rounding
    # step and flip a borderline prediction against pyautoattack's own verdict).
    return Crafted(x_adv.clamp(0, 1).detach())
