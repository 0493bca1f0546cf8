"""The flag registry: one `FlagCheck` record per reliability check, added by `@flag`
(bench.science.flags holds the checks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.store.db import Checkpoint
from bench.store.rows import CellRow


@dataclass(frozen=True)
class FlagCheck:
    """One reliability check: its stable name (a database key), the text the site and
    README show, whether it is a sign of gradient masking, whether it calls for the
    witness cells (a black-box attack beat the white-box ones), and the check itself."""

    name: str
    text: str
    masking: bool
    check: Callable[[Checkpoint, list[CellRow], list[CellRow], str], dict | None]
    """(checkpoint, its cells, transfers onto it, the radius judged) -> the flag's numbers, or None."""
    calls_witness: bool = False
    every_radius: bool = True
    """Judged at each L-inf radius the checkpoint's cells ran at; False: once, at its own
    (checks of the model itself, and of cells that belong to no one radius)."""


FLAGS: list[FlagCheck] = []
"""Every check, in the order flags are computed and shown; `@flag` adds one."""


def flag(name: str, text: str, *, masking: bool = False, calls_witness: bool = False, every_radius: bool = True):
    """Register the decorated check under `name`, its stable database key (never derived
    from the function's name, which may change): a new flag is one entry."""

    def register(fn):
        if any(f.name == name for f in FLAGS):
            raise ValueError(f"flag {name!r} is registered twice")
        FLAGS.append(FlagCheck(name, " ".join(text.split()), masking, fn, calls_witness, every_radius))
        return fn

    return register
