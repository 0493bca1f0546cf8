"""What the site says each number cost: the board's passes per test image of every worst
case, the checkpoint page's passes of every cell, and the budget view, against a store
written by hand whose sums are worked out below."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from bench.core.data import get_spec
from bench.reporting.format import MISSING, passes
from bench.reporting.site import build_site
from bench.store.bits import pack_bits
from bench.store.db import Store

THREAT = get_spec("digits").threat.name
OTHER_THREAT = "l2-1.0"
N = 10


def _bits(standing: list[int]) -> np.ndarray:
    return np.array(standing, dtype=bool)


def _checkpoint(store: Store, key: str, defense: str):
    return store.add_checkpoint(
        key=key,
        dataset="digits",
        defense=defense,
        preset=None,
        arch="digits_mlp",
        seed=0,
        threat=THREAT,
        config={},
        train_config={},
        path="/nowhere",
        sha256="0" * 64,
        epochs=1,
        train_seconds=1.0,
        device="cpu",
        meta={"clean_acc": 0.9},
    )


def _cell(key, attack, correct, forward, backward, threat=THREAT, indices=None, kind="attack") -> dict:
    """The fields of one stored cell; `forward` None is a row stored before passes were counted."""
    return dict(
        cell_key=key,
        attack=attack,
        params={},
        threat=threat,
        clean_acc=0.9,
        robust_acc=float(np.mean(correct)),
        n=len(correct),
        seconds=0.0,
        correct_bits=pack_bits(correct),
        indices=indices,
        extra={},
        test_size=N,
        kind=kind,
        proven_bits=pack_bits(correct) if kind == "certify" else None,
        forward_passes=forward,
        backward_passes=backward,
    )


# Checkpoint "counted": every cell counted. Cost per test image = forward x n / N.
FGSM = _bits([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])  # 1 pass: cost 1
TRANSFER = _bits([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])  # 10 passes on the source: cost 10, breaks nothing new
PGD = _bits([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])  # 21 forward, 20 backward: cost 21
SPSA = _bits([1, 1, 0, 1, 1])  # on images 0-4 only, 200 forward: cost 200 x 5 / 10 = 100
# Left out of the worst case and of the budget: a certified bound (it breaks nothing) and
# a cell of another threat model.
CERTIFY = _bits([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
L2 = _bits([0] * N)

# (cell added, its cost, passes so far, worst case so far), cheapest first.
BUDGET = [
    ("fgsm", 1.0, 1.0, 0.8),
    ("transfer", 10.0, 11.0, 0.8),
    ("pgd20", 21.0, 32.0, 0.5),
    ("spsa", 100.0, 132.0, 0.4),
]
FORWARD = 1 + 10 + 21 + 200 * 5 / 10
BACKWARD = 1 + 10 + 20 + 0


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cost")
    store = Store.for_results(folder)
    counted = _checkpoint(store, "0000countedabcd", "trades")
    partly = _checkpoint(store, "0001partlyabcde", "madry")
    never = _checkpoint(store, "0002neverabcdef", "natural")
    for fields in (
        _cell("pgd20", "pgd", PGD, 21.0, 20.0),
        _cell("spsa", "spsa", SPSA, 200.0, 0.0, indices=[0, 1, 2, 3, 4]),
        _cell("fgsm", "fgsm", FGSM, 1.0, 1.0),
        _cell("certify", "certify", CERTIFY, 3.0, 0.0, kind="certify"),
        _cell("pgd20_l2", "pgd", L2, 21.0, 20.0, threat=OTHER_THREAT),
    ):
        store.add_evaluation(counted.id, **fields)
    store.add_transfer(partly.id, counted.id, **_cell("transfer", "pgd", TRANSFER, 10.0, 10.0, kind="transfer"))
    store.add_evaluation(partly.id, **_cell("pgd20", "pgd", PGD, 21.0, 20.0))
    store.add_evaluation(partly.id, **_cell("square", "square", FGSM, None, None))
    store.add_evaluation(never.id, **_cell("fgsm", "fgsm", FGSM, None, None))
    return build_site(store, folder / "site").parent


class _Elements(HTMLParser):
    """Every element of a page with its attributes and the text inside it."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict, list[str]]] = []
        self._open: list[tuple[str, dict, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        element = (tag, {k: v or "" for k, v in attrs}, [])
        self.elements.append(element)
        if tag not in ("br", "img", "input", "link", "meta", "line", "rect", "polyline", "polygon"):
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, _, text in self._open:
            text.append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict, str]]:
        return [
            (a, "".join(text).strip())
            for t, a, text in self.elements
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def _page(path: Path) -> _Elements:
    return _Elements(path.read_text(encoding="utf-8"))


def _board_passes(site: Path) -> dict[str, tuple[dict, str]]:
    """Each row's passes cell on the digits board of the own threat model, by checkpoint key."""
    page = _page(site / "index.html")
    rows = [a["data-key"] for a, _ in page.find("tr") if "data-key" in a]
    cells = page.find("td", data_col="passes")
    board = f"board-digits-{THREAT}"
    assert page.find("section", id=board)
    # The own board comes first; its rows are the first three.
    return dict(zip(rows[:3], cells[:3], strict=True))


def test_the_board_shows_the_passes_the_worst_case_cost(site):
    shown = _board_passes(site)
    attrs, text = shown["0000countedabcd"]
    assert float(attrs["data-value"]) == pytest.approx(FORWARD)
    assert text == "132"
    assert f"{FORWARD:,.1f} forward and {BACKWARD:,.1f} backward" in attrs["title"]
    assert "4 cells" in attrs["title"]


def test_a_worst_case_with_an_uncounted_cell_shows_a_dash(site):
    shown = _board_passes(site)
    for key in ("0001partlyabcde", "0002neverabcdef"):
        attrs, text = shown[key]
        assert text == MISSING and attrs["data-value"] == "", key
        assert "not counted" in attrs["title"]


def test_the_passes_column_sorts_like_the_other_numbers(site):
    page = _page(site / "index.html")
    header = next(a for a, text in page.find("th") if text == "Passes/img")
    assert header["data-sort"] == "num" and header["data-first"] == "asc"


def test_every_cell_row_shows_its_passes_and_a_dash_where_not_counted(site):
    page = _page(site / "ck" / "0001partlyabcde.html")
    forward = [text for _, text in page.find("td", data_col="forward")]
    backward = [text for _, text in page.find("td", data_col="backward")]
    # The cells table in reading order (pgd20, square), then the outgoing transfer's craft.
    assert forward == ["21", MISSING, "10"]
    assert backward == ["20", MISSING, "10"]
    counted = _page(site / "ck" / "0000countedabcd.html")
    spsa = [a for a, text in counted.find("td", data_col="forward") if text == "200"]
    assert spsa and spsa[0]["title"] == "200.00 per image"


def test_the_worst_case_line_says_what_it_cost(site):
    counted = _page(site / "ck" / "0000countedabcd.html")
    line = counted.find("span", **{"class": "worst-cost"})[0][1]
    assert line == "Its cells cost 132 forward and 31 backward passes per test image."
    partly = _page(site / "ck" / "0001partlyabcde.html")
    assert "not known" in partly.find("span", **{"class": "worst-cost"})[0][1]


def test_the_budget_plot_adds_the_cells_cheapest_first(site):
    page = _page(site / "ck" / "0000countedabcd.html")
    points = page.find("circle")
    budget = [a for a, _ in points if "data-passes" in a]
    assert [a["data-cell"] for a in budget] == [cell for cell, *_ in BUDGET]
    for a, (_, cost, spent, acc) in zip(budget, BUDGET, strict=True):
        assert float(a["data-cost"]) == pytest.approx(cost)
        assert float(a["data-passes"]) == pytest.approx(spent)
        assert float(a["data-acc"]) == pytest.approx(acc)
    # The last point is the worst case itself: every cell was counted.
    assert float(budget[-1]["data-passes"]) == pytest.approx(FORWARD)
    titles = [text for a, text in points if "data-passes" in a]
    assert titles[0].startswith("+ fgsm (1 passes/img): 1 in all, worst case 80.00%")
    assert "transfer crafted on madry" in titles[1]
    figure = page.find("figure", id="plot-budget")[0][1]
    assert "(log)" in figure  # 1 to 132 passes: more than two decades
    assert "left out" not in figure


def test_the_budget_says_how_many_cells_were_left_out_or_that_none_was_counted(site):
    partly = _page(site / "ck" / "0001partlyabcde.html")
    assert [a["data-cell"] for a, _ in partly.find("circle") if "data-passes" in a] == ["pgd20"]
    figure = partly.find("figure", id="plot-budget")[0][1]
    assert "1 cell of the worst case was left out" in figure
    assert "(log)" not in figure
    never = _page(site / "ck" / "0002neverabcdef.html")
    figure = never.find("figure", id="plot-budget")[0][1]
    assert "No cell of" in figure and "has its passes counted" in figure
    assert not [a for a, _ in never.find("circle") if "data-passes" in a]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, MISSING),
        (float("nan"), MISSING),
        (0.0, "0"),
        (0.28, "0.3"),
        (21.34, "21.3"),
        (277.8, "278"),
        (1500.0, "1.5k"),
        (21340.0, "21.3k"),
        (1.2e6, "1.2M"),
    ],
)
def test_passes_read_short(value, text):
    assert passes(value) == text


# --- what a browser shows ------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """A headless chromium (the site's browser tests need one; tests/test_site.py says how to install it)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if executable is None:
        pytest.skip("no chromium executable on PATH")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


def test_a_browser_sorts_the_board_by_passes_and_hovers_the_budget_points(site, browser):
    page = browser.new_page()
    page.goto((site / "index.html").as_uri())
    board = f"[id='board-digits-{THREAT}']"
    page.locator(f"{board} th", has_text="Passes/img").click()  # cheapest first; the uncounted last
    shown = page.eval_on_selector_all(
        f"{board} tbody tr", "rs => rs.map(r => [r.dataset.key, r.querySelector('td.passes').innerText])"
    )
    assert shown[0] == ["0000countedabcd", "132"]
    assert sorted(text for _, text in shown[1:]) == [MISSING, MISSING]
    page.goto((site / "ck" / "0000countedabcd.html").as_uri())
    box = page.locator("#plot-budget svg").bounding_box()
    assert box and box["width"] > 100 and box["height"] > 60
    titles = page.eval_on_selector_all("#plot-budget circle title", "ts => ts.map(t => t.textContent)")
    assert [t.split(" (")[0] for t in titles] == [
        "+ fgsm",
        "+ transfer crafted on madry",
        "+ pgd20",
        "+ spsa",
    ]
    page.close()
