"""A cascade cell's choice among the images standing before it: the share nearest the
decision boundary (`nearest = F`), by the margin at the clean image or, with `probe = K`,
after a K-step probe (bench.engine.selection): PGD on the CW margin, its final iterate,
or with `probe_attack = "apgd"` APGD-CE, each image's highest-loss iterate.

The clean margin says little about where an attack will succeed on a robust model: on
mnist5k's IBP checkpoint the four images only AutoAttack's Square broke beyond `fast`
ranked 0, 69, 79 and 180 of 430 by it, and 1, 6, 13 and 16 by the margin after 20 steps
of PGD on the CW margin (a cosine step of eps / 4, from a random start).
On mnist5k's ALP and PGD-AT checkpoints (another CPU, other weights) the PGD-20 probe's
nearest tenth held 0 and 1 of the 9 and 8 images AutoAttack's Square broke beyond `fast`;
that of APGD-CE's highest-loss iterate after 10 steps held 7 to 8 and 6 to 7 over three
seeds, for half the passes (docs/results.md).
A3 (Liu et al. 2022) discards images by statistics taken during the attack for the same
reason; a probe is the cell-local form of it, seeded and counted like the cell's own
passes, so a resumed cascade chooses the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.errors import BenchError

PROBES = ("pgd", "apgd")
"""The attacks a probe may run (`probe_attack`)."""


@dataclass(frozen=True)
class Nearest:
    share: float
    """The share in (0, 1) of the standing images the cell attacks."""
    probe: int = 0
    """Steps of the probe whose margins rank the images; 0: clean margins."""
    probe_attack: str = "pgd"
    """The probe: `pgd` (the CW margin, its final iterate) or `apgd` (APGD-CE, each image's
    highest-loss iterate). Only in the key where not `pgd`, so the cells that never set it
    keep their keys."""

    def key_parts(self) -> list[str]:
        parts = [f"nearest={float(self.share):.6g}"]
        if self.probe:
            parts.append(f"probe={self.probe}")
        if self.probe_attack != "pgd":
            parts.append(f"probe_attack={self.probe_attack}")
        return parts

    def probe_params(self, config: Any) -> dict[str, Any]:
        """The probe's settings at the cell's own radius and norm. PGD: the CW margin, a
        cosine step of a quarter of eps (`fast`'s PGD-20), from a random start in the ball.
        APGD: the cross-entropy, no step size to choose, every image's highest-loss iterate."""
        ball = {"eps": config.eps, "norm": getattr(config, "norm", "linf"), "steps": self.probe}
        if self.probe_attack == "apgd":
            return {**ball, "loss": "ce", "best_loss": True}
        return {**ball, "loss": "cw", "schedule": "cosine", "step_fraction": 0.25}


def nearest_from(params: dict[str, Any], attack: str, where: str) -> Nearest | None:
    """The cell's `nearest`, `probe` and `probe_attack` values, popped from its params and
    checked."""
    share = params.pop("nearest", 0.0)
    probe = params.pop("probe", 0)
    probe_attack = params.pop("probe_attack", "pgd")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
        raise BenchError(
            f"{where} ({attack}): nearest must be a share in (0, 1) of the images a cascade left "
            f"standing, got {share!r} (0 or no nearest attacks all of them)"
        )
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
        raise BenchError(f"{where} ({attack}): probe must be a number of PGD steps (0 or more), got {probe!r}")
    if probe and not share:
        raise BenchError(
            f"{where} ({attack}): probe ranks the images nearest= chooses; set nearest = 0.1 or drop probe"
        )
    if probe_attack not in PROBES:
        raise BenchError(f"{where} ({attack}): probe_attack must be one of {', '.join(PROBES)}, got {probe_attack!r}")
    if probe_attack != "pgd" and not probe:
        raise BenchError(
            f"{where} ({attack}): probe_attack names the attack of a probe; set probe = 10 (its steps) "
            "or drop probe_attack"
        )
    return Nearest(float(share), probe, probe_attack) if share else None
