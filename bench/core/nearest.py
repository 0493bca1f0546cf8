"""A cascade cell's choice among the images standing before it: the share nearest the
decision boundary (`nearest = F`), by the margin at the clean image or, with `probe = K`,
at the end of a K-step PGD probe on the CW margin (bench.engine.selection).

The clean margin says little about where an attack will succeed on a robust model: on
mnist5k's IBP checkpoint the four images only AutoAttack's Square broke beyond `fast`
ranked 0, 69, 79 and 180 of 430 by it, and 1, 6, 13 and 16 by the margin after 20 steps
of PGD on the CW margin (a cosine step of eps / 4, from a random start).
A3 (Liu et al. 2022) discards images by statistics taken during the attack for the same
reason; a probe is the cell-local form of it, seeded and counted like the cell's own
passes, so a resumed cascade chooses the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.errors import BenchError


@dataclass(frozen=True)
class Nearest:
    share: float
    """The share in (0, 1) of the standing images the cell attacks."""
    probe: int = 0
    """Steps of the PGD probe whose final margins rank the images; 0: clean margins."""

    def key_parts(self) -> list[str]:
        parts = [f"nearest={float(self.share):.6g}"]
        return [*parts, f"probe={self.probe}"] if self.probe else parts

    def probe_params(self, config: Any) -> dict[str, Any]:
        """The probe's PGD at the cell's own radius and norm: the CW margin, a cosine step
        of a quarter of eps (`fast`'s PGD-20), from a random start in the ball."""
        return {
            "eps": config.eps,
            "norm": getattr(config, "norm", "linf"),
            "steps": self.probe,
            "loss": "cw",
            "schedule": "cosine",
            "step_fraction": 0.25,
        }


def nearest_from(params: dict[str, Any], attack: str, where: str) -> Nearest | None:
    """The cell's `nearest` and `probe` values, popped from its params and checked."""
    share = params.pop("nearest", 0.0)
    probe = params.pop("probe", 0)
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
    return Nearest(float(share), probe) if share else None
