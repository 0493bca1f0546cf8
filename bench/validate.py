"""Range checks shared by every config's __post_init__.

Each raises ValueError with the field's name, the rule and the value; `build_config`
(bench.registry) prefixes it with where the value came from (file, cell, --set), so
`matrix 'm.toml': cell 2 (pgd): eps must be in (0, 1] for L-inf, got 7.0` is one line
that says what to mend. NaN fails every comparison, so each rule is written as "the
value is inside" rather than "the value is outside": NaN is never inside.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from bench.errors import did_you_mean

NORMS = ("linf", "l2")
"""The threat models' norms: L-inf and L2, both in [0, 1] pixel units."""


def at_least(name: str, value: Any, low: int) -> None:
    """An integer count (steps, restarts, iterations, epochs) of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")


def positive(name: str, value: Any) -> None:
    """A finite number above zero (a step size, a learning rate, an L2 radius)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number above zero, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    """A finite number of zero or more (a penalty weight, weight decay)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of zero or more, got {value!r}")


def in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """A number inside an interval; the bounds say whether they belong to it."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def one_of(name: str, value: Any, choices: Iterable[str]) -> None:
    """A known name (a norm, a loss, an optimizer), with the closest ones on a typo."""
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}{hint}")


def radius(name: str, value: Any, norm: str) -> None:
    """A perturbation budget: (0, 1] for L-inf (inputs live in [0, 1]); any finite
    positive radius for L2. None (unset: the dataset's threat model) passes."""
    if value is None:
        return
    if norm == "linf":
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1
        if not ok:
            raise ValueError(f"{name} must be in (0, 1] for L-inf, got {value!r}")
    else:
        positive(f"{name} (an L2 radius)", value)
