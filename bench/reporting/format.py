"""How reporting prints numbers: accuracies, diagnostic quantities, config values, durations.

One module so that the site and the CLI show the same number the same way; in
particular a missing number is always shown as MISSING ("–"), never as an empty string.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

MISSING = "–"
"""What a missing number is shown as: an en dash, so a table cell is visibly empty on purpose."""


def missing(value: Any) -> bool:
    """Whether a number is absent: None, NaN or infinite (numpy scalars included)."""
    return value is None or (isinstance(value, numbers.Real) and not math.isfinite(value))


def pct(value: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage with `digits` decimals (the site's two, the
    terminal table's one), without the % sign.

    `pct(0.1234)` is "12.34". None, NaN and infinities are shown as MISSING ("–"): a
    page that must print nothing at all for an absent number (the paper's note beside
    a board cell) checks `missing(value)` first rather than relying on the text.
    """
    if missing(value):
        return MISSING
    return f"{100 * value:.{digits}f}"


def percent(value: float | None) -> str:
    """A fraction of samples (an accuracy, a share) as `pct` with the % sign: "11.67%"; MISSING when absent."""
    return MISSING if missing(value) else f"{pct(value)}%"


def fmt(value: Any, spec: str) -> str:
    """A number with a format spec (`fmt(0.123456, ".3g")` is "0.123"); MISSING when absent."""
    if missing(value):
        return MISSING
    return f"{value:{spec}}"


def num(value: Any) -> str:
    """A setting or statistic in short form: floats to four significant digits, ints and
    strings as they are, None and booleans and anything else as JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def exact(value: Any) -> str:
    """A config or sidecar value as stored: strings as they are, the rest as JSON (floats in full)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def duration(seconds: float | None) -> str:
    """A duration in seconds, minutes or hours with one decimal ("42.0 s", "1.5 h"); MISSING when absent."""
    if missing(seconds):
        return MISSING
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def passes(value: float | None) -> str:
    """A count of model passes per image in short form: "0.3", "20", "278", "21.3k", "1.2M";
    MISSING when absent (a row stored before passes were counted), never a zero."""
    if missing(value):
        return MISSING
    scale, suffix = next(((s, x) for s, x in ((1e6, "M"), (1e3, "k")) if value >= s), (1.0, ""))
    short = value / scale
    # Three significant figures at most: a cost is read for its size; a title has it in full.
    return (f"{short:.0f}" if short >= 100 else f"{short:.1f}".removesuffix(".0")) + suffix
