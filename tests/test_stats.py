"""How sure each number is: the exact binomial interval against scipy.stats, the exact
McNemar test against a case worked by hand, and the board's ties on stored bits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from test_truth import ATTACKS, N, _add, _store  # the stored checkpoint the bracket tests share

from bench.core.stats import interval, mcnemar
from bench.reporting.results import result_rows
from bench.reporting.site.board import rank_rows


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (113, 360), (1, 1), (359, 360), (50, 100)])
def test_the_interval_is_scipys_exact_clopper_pearson(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = interval(k, n)
    assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)


def test_the_interval_on_360_images_is_about_five_points_wide_near_thirty_percent():
    low, high = interval(108, 360)  # 30.0%
    assert 0.25 < low < 0.26 and 0.34 < high < 0.36


def test_mcnemar_by_hand():
    # Six images only the first model gets right, one only the second, three both, two neither.
    a = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    # Under the null each of the 7 discordant images is a fair coin: p = 2 P(X <= 1), X ~ Bin(7, 1/2)
    # = 2 (1 + 7) / 128.
    assert mcnemar(a, b) == pytest.approx(16 / 128)
    assert mcnemar(b, a) == pytest.approx(16 / 128)
    assert mcnemar(a, a) == 1.0
    assert mcnemar(a, b) == pytest.approx(binomtest(6, 7, 0.5).pvalue)


def test_mcnemar_refuses_verdicts_on_different_images():
    with pytest.raises(ValueError, match="same images"):
        mcnemar(np.ones(3, dtype=bool), np.ones(4, dtype=bool))


def _row(short: str, bits: np.ndarray) -> dict:
    return {"short": short, "bits": bits, "worst": float(bits.mean())}


def test_rows_a_point_apart_on_360_images_share_a_rank():
    rng = np.random.default_rng(0)
    first = rng.random(360) < 0.314
    second = first.copy()
    second[np.flatnonzero(first)[:4]] = False  # 4 images fewer: 31.4% against 30.3%
    far = np.zeros(360, dtype=bool)
    rows = [_row("a", first), _row("b", second), _row("c", far)]
    rank_rows(rows)
    assert [r["rank"] for r in rows] == [1, 1, 3]
    assert rows[1]["tied"]["with"] == "a" and float(rows[1]["tied"]["p"]) == pytest.approx(0.125, abs=0.01)
    assert rows[0]["tied"] is None and rows[2]["tied"] is None
    assert all("bits" not in r and "_bits" not in r for r in rows)


def test_result_rows_carry_each_numbers_interval(tmp_path):
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", ATTACKS)
    fgsm = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    _add(store, ck, "fgsm:eps=0.2", "fgsm", fgsm)
    rows = {r["attack"]: r for r in result_rows(store)}
    assert (rows["fgsm:eps=0.2"]["ci_low"], rows["fgsm:eps=0.2"]["ci_high"]) == interval(7, N)
    # The worst case's interval is on its own AND: images 0-4 of 10.
    assert (rows["worst_case"]["ci_low"], rows["worst_case"]["ci_high"]) == interval(5, N)


def test_ties_do_not_chain_past_the_first_row_of_a_rank():
    # Each row breaks 5 more images than the one above: p = 2 / 2^5 = 0.0625 between
    # neighbours (tied), p = 2 / 2^10 between rows two apart (not).
    rows = []
    for i, short in enumerate("abcd"):
        bits = np.zeros(360, dtype=bool)
        bits[: 120 - 5 * i] = True
        rows.append(_row(short, bits))
    rank_rows(rows)
    assert [r["rank"] for r in rows] == [1, 1, 3, 3]  # adjacent tests alone would chain all four into 1
    assert rows[1]["tied"]["with"] == "a" and rows[3]["tied"]["with"] == "c" and rows[2]["tied"] is None
