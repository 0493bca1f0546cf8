"""A cascade cell that runs only when the cascade has smelt masking (`when = ...`).

`fast` escalates to `full` on the admission checks and flags. A smaller sign comes from
the cascade itself: its black-box cell (Square, Role.QUERY) runs only on images every
white-box cell before it left standing, so each image it breaks is one the gradients
missed. AutoAttack warns on the same sign (its Square beating its gradient attacks), and
it fires on mnist5k's ALP, PGD-AT and IBP, whose gradients are honest by every admission
check. A gated cell spends more white-box passes there and nowhere else: on digits, where
`fast`'s Square breaks nothing, it costs nothing (bench.run.cascade).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from bench.errors import BenchError


class Gate(StrEnum):
    BLACK_BOX_WON = "black_box_won"
    """An earlier query-based cell of the cascade (Square) broke an image."""


def gate_from(params: dict[str, Any], attack: str, where: str) -> Gate | None:
    """The cell's `when` value, popped from its params and checked."""
    when = params.pop("when", None)
    if when is None:
        return None
    try:
        return Gate(when)
    except ValueError:
        choices = ", ".join(g.value for g in Gate)
        raise BenchError(f"{where} ({attack}): when must be one of {choices}, got {when!r}") from None
