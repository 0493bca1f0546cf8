"""How sure a robust accuracy is: exact binomial intervals, and the exact paired test
between two models judged on the same images.

Both are closed forms on the binomial distribution, written here on scipy.special's
incomplete beta function rather than through scipy.stats, whose import alone costs
about a second of every command that prints a result (tests/test_stats.py holds them
to scipy.stats.binomtest).
"""

from __future__ import annotations

import numpy as np
from scipy.special import bdtr, betaincinv

LEVEL = 0.95
"""The confidence of every interval the bench shows."""
SIGNIFICANCE = 0.05
"""Two adjacent rows of a board whose paired test gives a p-value at or above this are tied."""


def interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval on a proportion of k successes in n trials:
    the quantiles of the beta distributions that bound the binomial's tails."""
    if n <= 0:
        return (0.0, 1.0)
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return (low, high)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """The exact two-sided McNemar p-value of two per-sample verdicts on the same images:
    under the null each discordant image is a fair coin, so the p-value is twice the
    binomial tail of the smaller discordant count (at most 1)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired verdicts must be on the same images: {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * float(bdtr(min(only_a, only_b), discordant, 0.5)))
