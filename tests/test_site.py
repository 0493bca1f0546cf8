"""The static leaderboard, checked the way a person sees it: in a real headless browser.

The store is synthetic (rows written through bench.store.db, no model runs), the site is
built once per module, and Debian's chromium is driven by playwright through its
executable path (playwright's own browser download is not used). Expected numbers are
computed here from the stored rows, independently of bench.reporting.site; the worst case comes
from the store's own definition, bench.store.db.worst_case.

Install: `apt-get install -y chromium` and `pip install playwright`. Without them these
browser tests skip, except under CI=true, where they fail and say what to install.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import types
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from bench.errors import BenchError
from bench.reporting.site import MARKER, build_site, render
from bench.reporting.site.names import factory_name
from bench.store.bits import pack_bits
from bench.store.db import Store
from bench.store.evidence import worst_case

N = 60  # test-set size of the synthetic store
SPSA_IDX = list(range(0, N, 3))  # the subset an SPSA cell ran on
XSS = "<script>window.__pwned = 1</script>"
INSTALL = "apt-get install -y chromium && pip install playwright"


# --- the synthetic store -----------------------------------------------------------------
def _bits(acc: float, seed: int, n: int = N) -> np.ndarray:
    """n booleans with exactly round(acc * n) true, at seeded places."""
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).permutation(n)[: round(acc * n)]] = True
    return out


def _pgd(steps: int, loss: str = "xent", restarts: int = 1, norm: str = "linf", eps: float = 0.2) -> tuple:
    params = {
        "eps": eps,
        "steps": steps,
        "step_size": 0.05,
        "loss": loss,
        "norm": norm,
        "random_start": True,
        "restarts": restarts,
    }
    key = f"pgd:eps={eps:g},loss={loss},norm={norm},random_start=true,restarts={restarts},step_size=0.05,steps={steps}"
    return "pgd", key, params, f"{norm}-{eps:g}"


FGSM = ("fgsm", "fgsm:eps=0.2,loss=xent", {"eps": 0.2, "loss": "xent"}, "linf-0.2")
SPSA = (
    "spsa",
    "spsa:eps=0.2,iterations=10,samples=64,subset=20",
    {"eps": 0.2, "iterations": 10, "samples": 64},
    "linf-0.2",
)
AUTO = ("autoattack", "autoattack:eps=0.2,norm=linf", {"eps": 0.2, "norm": "linf"}, "linf-0.2")
SQUARE = (
    "square",
    "square:eps=0.2,norm=linf,p_init=0.8,queries=1000",
    {"eps": 0.2, "norm": "linf", "p_init": 0.8, "queries": 1000},
    "linf-0.2",
)
# The admission record bench.science.admission.admit stores in a checkpoint's meta.
ADMISSION = {
    "schema": 2,
    "config": {"n": 500, "passes": 5, "noise_fraction": 0.05, "trace_steps": 100, "seed": 0},
    "n": N,
    "probabilities": {"min": -11.25, "max": 9.5, "max_row_sum_error": 3.75},
    "randomized": {"passes": 5, "max_output_diff": 0.0, "max_relative_diff": 0.0, "share_prediction_changed": 0.0},
    "autograd_calls": 0,
    "zero_gradient": {"count": 3, "n": N, "share": 0.05},
    "noise_flips": {"amplitude": 0.01, "flipped": 2, "correct": 57},
    "loss_rising": {
        "steps": 100,
        "n": N,
        "tail": 10,
        "loss_before_tail": 2.5,
        "loss_last": 2.75,
        "trace": [0.5, 1.5, 2.5],
    },
}


def _unbounded(eps: float) -> tuple:
    return (
        "unbounded",
        f"unbounded:eps={eps:g},loss=xent,steps=20",
        {"eps": eps, "loss": "xent", "steps": 20},
        f"unbounded-{eps:g}",
    )


# (defense, preset, dataset, threat, clean, [(cell, robust accuracy)], extra meta, config)
CHECKPOINTS = [
    (
        "natural",
        "natural_digits",
        "digits",
        "linf-0.2",
        0.95,
        [
            (FGSM, 0.30),
            (_pgd(5), 0.20),
            (_pgd(20), 0.10),
            (_pgd(200), 0.05),
            (_pgd(20, "cw"), 0.15),
            (_pgd(20, restarts=10), 0.05),
            (SPSA, 0.25),
            (AUTO, 0.0),
            (_unbounded(0.4), 0.05),
            (_unbounded(1.0), 0.0),
            (_pgd(20, norm="l2", eps=1.5), 0.4),
            (_pgd(20, "cw", norm="l2", eps=1.5), 0.45),
        ],
        # natural is the matrix's transfer surrogate (the run layer marks it so)
        {"paper": {"clean": 0.99, "pgd20": 0.02, "pgd200": 0.01}, "surrogate": True, "admission": ADMISSION},
        {},
    ),
    (
        "logit_squeeze",
        "logit_squeeze_digits",
        "digits",
        "linf-0.2",
        0.9,
        [
            (FGSM, 0.55),
            (_pgd(5), 0.6),
            (_pgd(20), 0.5),
            (_pgd(50), 0.45),
            (_pgd(20, "cw"), 0.4),
            (SPSA, 0.35),
            (SQUARE, 0.3),
            (_pgd(20, norm="l2", eps=1.5), 0.6),
        ],
        {"preset_description": f"squeezes logits {XSS}<b>not bold</b>"},
        {"beta": 0.05, "note": XSS},
    ),
    (
        "label_smoothing",
        None,
        "digits",
        "linf-0.2",
        0.93,
        [(FGSM, 0.45), (_pgd(20), 0.3), (_pgd(1000), 0.2)],
        {},
        {"smoothing": 0.1},
    ),
    ("pgd_at", None, "digits", "linf-0.2", 0.8, [], {}, {"attack_steps": 5}),  # trained, nothing attacked yet
    (
        "natural",
        None,
        "mnist",
        "linf-0.3",
        0.99,
        [
            (("fgsm", "fgsm:eps=0.3,loss=xent", {"eps": 0.3, "loss": "xent"}, "linf-0.3"), 0.1),
            (_pgd(20, eps=0.3), 0.01),
        ],
        {},
        {},
    ),
]


def _hist(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "edges": np.linspace(-10, 10, 21).round(3).tolist(),
        "clean": rng.integers(0, 50, 20).tolist(),
        "adv": rng.integers(0, 50, 20).tolist(),
    }


DIAGNOSED = (0, 1, 3)  # natural, logit_squeeze and pgd_at on digits; the others have none


def _add_diagnostic(store: Store, checkpoint_id: int, seed: int) -> None:
    """Synthetic per-sample diagnostics, summarized by bench.science.diagnostics itself."""
    import torch

    from bench.science.diagnostics import SAMPLE_FIELDS, _rounded, summarize

    rng = np.random.default_rng(seed)
    gap = rng.normal(3 + seed, 2, N)
    grad_gap = rng.uniform(5, 80, N)
    samples = {
        "logit_gap": gap,
        "grad_gap": grad_gap,
        "eps_l": gap / grad_gap,
        "coherence": rng.uniform(-1, 1, N),
        "grad_norm_true": rng.uniform(1, 50, N),
        "grad_norm_adv": rng.uniform(1, 50, N),
        "correct": gap > 0,
    }
    logits = torch.tensor(rng.normal(0, 3, (N, 10)))
    stored = {k: _rounded(samples[k]) for k in SAMPLE_FIELDS}
    stored["correct"] = [bool(c) for c in samples["correct"]]
    stored["logits"] = _rounded(logits.numpy(), 4)
    values = np.linspace(-0.25, 0.25, 5).tolist()
    land = {
        "values": values,
        "span": 1.25,
        "eps": 0.2,
        "seed": 0,
        "loss": [rng.uniform(0, 3, (5, 5)).round(4).tolist() for _ in range(8)],
    }
    store.add_diagnostic(
        checkpoint_id,
        eps=0.2,
        n=N,
        summary=summarize(samples, logits, 0.2),
        samples=stored,
        landscape=land,
        seconds=0.1,
    )


def make_store(folder: Path) -> Store:
    store = Store(f"sqlite:///{folder / 'bench.db'}")
    ids = []
    for i, (defense, preset, dataset, threat, clean, cells, meta, config) in enumerate(CHECKPOINTS):
        ck = store.add_checkpoint(
            key=f"{i:04d}{defense[:4]}abcdef01",
            dataset=dataset,
            defense=defense,
            preset=preset,
            arch="digits_cnn",
            seed=i,
            threat=threat,
            config=config,
            train_config={"epochs": 3, "lr": 0.01},
            path=str(folder / "results" / "checkpoints" / dataset / defense / f"{i:04d}{defense[:4]}abcdef01"),
            sha256=f"{i:064d}",
            epochs=3,
            train_seconds=10.0 + 7 * i,
            device="cpu (2 cores)",
            meta={
                "clean_acc": clean,
                "package_version": "0.1.0",
                "torch_version": "2.x",
                "git_commit": "deadbeef",
                "logit_stats": {"mean": 0.5, "variance": 3.0},
                **meta,
            },
        )
        ids.append(ck.id)
        clean_bits = _bits(clean, seed=1000 + i)
        for j, ((attack, key, params, cthreat), acc) in enumerate(cells):
            subset = attack == "spsa"
            n = len(SPSA_IDX) if subset else N
            # Robust implies clean; the accuracy is what is stored, the bits follow it.
            bits = _bits(acc, seed=100 * i + j, n=n) & (clean_bits[SPSA_IDX] if subset else clean_bits)
            store.add_evaluation(
                ck.id,
                cell_key=key,
                attack=attack,
                params=params,
                threat=cthreat,
                clean_acc=clean,
                robust_acc=float(bits.mean()),
                n=n,
                seconds=1.5,
                correct_bits=pack_bits(bits),
                indices=SPSA_IDX if subset else None,
                extra={
                    "logit_hist": _hist(j),
                    "adv_logit_stats": {"mean": -1.0},
                    "warnings": ["AutoAttack: possible gradient masking"] if attack == "autoattack" else [],
                },
            )
    # A 3 x 3 transfer grid among the first three digits checkpoints, diagonal included.
    _, key, params, _ = _pgd(10)
    for s in ids[:3]:
        for t in ids[:3]:
            bits = _bits(0.3 + 0.1 * ((s + 2 * t) % 5), seed=7 * s + t)
            store.add_transfer(
                s,
                t,
                cell_key=key,
                attack="pgd",
                params=params,
                threat="linf-0.2",
                clean_acc=0.9,
                robust_acc=float(bits.mean()),
                n=N,
                seconds=0.5,
                correct_bits=pack_bits(bits),
                extra={},
            )
    for i in DIAGNOSED:
        _add_diagnostic(store, ids[i], seed=i)
    store.replace_flags(
        ids[1],
        [
            {
                "name": "spsa_stronger_than_pgd",
                "message": "SPSA beats PGD on the same images.",
                "numbers": {"spsa": 0.35, "pgd_same_images": 0.5, "n": 20},
            },
            {
                "name": "square_stronger_than_pgd",
                "message": "Square breaks what PGD cannot.",
                "numbers": {
                    "broken_only_by_square": 7,
                    "n": N,
                    "share": 7 / N,
                    "whitebox_broken": 30,
                    "square_broken": 25,
                    "cells": [SQUARE[1]],
                },
            },
        ],
    )
    return store


def _lowest(cells, match) -> float | None:
    """The lowest robust accuracy of the cells that match; None when none does."""
    hits = [e.robust_acc for e in cells if match(e)]
    return min(hits) if hits else None


def _lowest_pgd(cells, steps: int, loss: str = "xent") -> float | None:
    """The lowest robust accuracy of PGD with `steps` steps, `loss` and one restart."""
    return _lowest(
        cells,
        lambda e: (
            e.attack == "pgd" and e.params["steps"] == steps and e.params["loss"] == loss and e.params["restarts"] == 1
        ),
    )


def expected_rows(store: Store) -> dict[str, dict]:
    """What each checkpoint's row on its own board must show, from the stored rows alone."""
    out = {}
    for ck in store.checkpoints():
        cells = [e for e in store.evaluations([ck.id]) if e.threat == ck.threat]
        transfers = [t for t in store.transfers([ck.id]) if t.target_id == ck.id]

        steps = [
            e.params["steps"]
            for e in cells
            if e.attack == "pgd" and e.params["loss"] == "xent" and e.params["restarts"] == 1
        ]
        wc = worst_case(ck.threat, [*cells, *transfers], N) if any(e.indices is None for e in cells) else None
        # The strongest transfer from another checkpoint (the diagonal is white-box) and its surrogates.
        black_box = [t for t in transfers if t.source_id != ck.id and t.threat == ck.threat]
        transfer = min(t.robust_acc for t in black_box) if black_box else None
        out[ck.key] = {
            "board": f"board-{ck.dataset}-{ck.threat}",
            "clean": ck.meta["clean_acc"],
            "fgsm": _lowest(cells, lambda e: e.attack == "fgsm"),
            "pgd20": _lowest_pgd(cells, 20),
            "pgd_longest": _lowest_pgd(cells, max(steps)) if steps else None,
            "cw20": _lowest_pgd(cells, 20, "cw"),
            "apgd_t": _lowest(cells, lambda e: e.attack == "apgd_t"),
            "spsa": _lowest(cells, lambda e: e.attack == "spsa"),
            "autoattack": _lowest(cells, lambda e: e.attack == "autoattack"),
            "square": _lowest(cells, lambda e: e.attack == "square"),
            "transfer": transfer,
            "surrogates": {t.source_id for t in black_box if t.robust_acc == transfer},
            "worst": wc.robust_acc if wc else None,
        }
    return out


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    store = make_store(folder)
    index = build_site(store, folder / "site")
    return types.SimpleNamespace(store=store, index=index, root=index.parent)


def _chromium() -> str | None:
    for name in (os.environ.get("BENCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and (shutil.which(name) or (name if Path(name).is_file() else None))
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed"
    executable = _chromium()
    if problem is None and executable is None:
        problem = "no chromium executable on PATH (set BENCH_CHROMIUM to its path)"
    if problem:
        message = f"browser tests need a headless chromium: {problem}; install with `{INSTALL}`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


class Session:
    """A browser context that records every request and refuses any that would leave the machine."""

    def __init__(self, browser, **options):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, **options)
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.context.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        if urlsplit(url).scheme in ("file", "data", "about"):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def open(self, url: str):
        page = self.context.new_page()
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.goto(url)
        return page

    def close(self):
        self.context.close()


@pytest.fixture()
def session(browser):
    s = Session(browser)
    yield s
    s.close()
    assert not s.refused, f"requests that would leave the machine: {s.refused}"
    outside = [u for u in s.requests if urlsplit(u).scheme not in ("file", "data", "about")]
    assert not outside, f"non-local requests: {outside}"
    assert not s.errors, f"errors in the page: {s.errors}"


ROWS_JS = """(table) => Array.from(table.tBodies[0].rows).filter(r => !r.hidden).map(r => {
  const cells = {};
  r.querySelectorAll('td[data-col]').forEach(td => {
    cells[td.dataset.col] = {value: td.dataset.value, text: td.innerText.trim()};
  });
  return {key: r.dataset.key, cells: cells, text: r.innerText};
})"""


def _board_rows(page, board_id: str) -> list[dict]:
    return page.eval_on_selector(f"[id='{board_id}'] table.board", ROWS_JS)


# --- the board ---------------------------------------------------------------------------
COLUMNS = (
    "clean",
    "fgsm",
    "pgd20",
    "pgd_longest",
    "cw20",
    "apgd_t",
    "spsa",
    "square",
    "transfer",
    "autoattack",
    "worst",
)


def test_every_checkpoint_is_on_its_board_with_the_stored_numbers(built, session):
    page = session.open(built.index.as_uri())
    expected = expected_rows(built.store)
    boards: dict[str, list] = {}
    for key, want in expected.items():
        rows = boards.setdefault(want["board"], _board_rows(page, want["board"]))
        row = next((r for r in rows if r["key"] == key), None)
        assert row is not None, f"checkpoint {key} missing from {want['board']}"
        for col in COLUMNS:
            shown = row["cells"][col]
            if want[col] is None:
                assert shown["value"] == "" and shown["text"].startswith("–"), (key, col, shown)
            else:
                assert float(shown["value"]) == pytest.approx(want[col], abs=1e-12), (key, col)
                assert shown["text"].split()[0] == f"{100 * want[col]:.2f}", (key, col, shown)
        if want["transfer"] is not None:  # the note names the surrogate of the strongest transfer
            defense = {ck.id: ck.defense for ck in built.store.checkpoints()}
            assert any(f"from {defense[s]}" in row["cells"]["transfer"]["text"] for s in want["surrogates"]), row
    # Ranked by worst case, best first; checkpoints without one come last.
    for board, rows in boards.items():
        worst = [expected[r["key"]]["worst"] for r in rows]
        known = [w for w in worst if w is not None]
        assert known == sorted(known, reverse=True) and worst[: len(known)] == known, board
        assert len(rows) == sum(1 for w in expected.values() if w["board"] == board)


def test_paper_numbers_stand_beside_ours(built, session):
    page = session.open(built.index.as_uri())
    natural = next(r for r in _board_rows(page, "board-digits-linf-0.2") if r["key"] == "0000natuabcdef01")
    assert "paper 99.00" in natural["cells"]["clean"]["text"]
    assert "paper 2.00" in natural["cells"]["pgd20"]["text"]
    assert "paper 1.00" in natural["cells"]["pgd_longest"]["text"]  # the paper's pgd200 beside our PGD-200
    # The paper's numbers are for the checkpoint's own threat model, not for its L2 cells.
    l2 = next(r for r in _board_rows(page, "board-digits-l2-1.5") if r["key"] == "0000natuabcdef01")
    assert not any("paper" in c["text"] for c in l2["cells"].values())


def test_other_threat_models_get_their_own_board(built, session):
    page = session.open(built.index.as_uri())
    ids = page.eval_on_selector_all("section.board-section", "s => s.map(x => x.id)")
    assert ids == ["board-digits-linf-0.2", "board-digits-l2-1.5", "board-mnist-linf-0.3"]
    l2 = _board_rows(page, "board-digits-l2-1.5")
    assert sorted(r["key"] for r in l2) == ["0000natuabcdef01", "0001logiabcdef01"]
    store = {
        e.cell_key: e.robust_acc
        for e in built.store.evaluations()
        if e.threat == "l2-1.5"
        and e.params["loss"] == "xent"
        and e.checkpoint_id == built.store.checkpoint(l2[0]["key"]).id
    }
    assert float(l2[0]["cells"]["pgd20"]["value"]) == pytest.approx(min(store.values()))


def test_square_and_transfer_columns_are_filled_where_stored(built, session):
    page = session.open(built.index.as_uri())
    headers = page.eval_on_selector_all("[id='board-digits-linf-0.2'] th[data-col]", "hs => hs.map(h => h.dataset.col)")
    assert headers == list(COLUMNS)
    rows = {r["key"]: r["cells"] for r in _board_rows(page, "board-digits-linf-0.2")}
    # Square only on logit_squeeze; transfers among the first three, none on pgd_at.
    assert [k for k, c in rows.items() if c["square"]["value"]] == ["0001logiabcdef01"]
    assert sorted(k for k, c in rows.items() if c["transfer"]["value"]) == [
        "0000natuabcdef01",
        "0001logiabcdef01",
        "0002labeabcdef01",
    ]
    help_text = page.inner_text("section.help")
    assert "Square" in help_text and "strongest" in help_text


EPS_JS = """(figure) => Array.from(figure.querySelectorAll('svg circle[data-key]')).map(c => ({
  key: c.dataset.key, eps: parseFloat(c.dataset.eps), acc: parseFloat(c.dataset.acc),
  cx: parseFloat(c.getAttribute('cx')), cy: parseFloat(c.getAttribute('cy'))}))"""


def expected_curves(store: Store, threat: str, keys: list[str]) -> dict[str, dict[float, float]]:
    """Per checkpoint on a board, eps -> accuracy from the stored rows: clean accuracy at 0,
    the worst case at the threat model's eps, and on an L-inf board the lowest stored
    unbounded-sweep accuracy at each of its eps; checkpoints with nothing beyond eps 0 are left out."""
    norm, eps = threat.rsplit("-", 1)
    out = {}
    for key in keys:
        ck = store.checkpoint(key)
        evals = store.evaluations([ck.id])
        transfers = [t for t in store.transfers([ck.id]) if t.target_id == ck.id]
        points = {0.0: ck.meta["clean_acc"]}
        if any(e.threat == threat and e.indices is None for e in evals):
            points[float(eps)] = worst_case(threat, [*evals, *transfers], N).robust_acc
        for e in evals:
            if norm == "linf" and e.attack == "unbounded":
                points[e.params["eps"]] = min(points.get(e.params["eps"], 1.0), e.robust_acc)
        if len(points) > 1:
            out[key] = points
    return out


def test_each_board_plots_accuracy_against_eps_from_the_store(built, session):
    page = session.open(built.index.as_uri())
    for board in page.eval_on_selector_all("section.board-section", "s => s.map(x => x.id)"):
        threat = board.split("-", 2)[2]
        keys = [r["key"] for r in _board_rows(page, board)]  # in rank order
        want = expected_curves(built.store, threat, keys)
        points = page.eval_on_selector(f"[id='eps-{board}']", EPS_JS)
        shown: dict[str, dict[float, float]] = {}
        for p in points:
            shown.setdefault(p["key"], {})[p["eps"]] = p["acc"]
        assert sorted(shown) == sorted(want), board
        for key, curve in want.items():
            assert sorted(shown[key]) == pytest.approx(sorted(curve)), (board, key)
            for eps, acc in curve.items():
                match = [a for e, a in shown[key].items() if e == pytest.approx(eps)]
                assert match == [pytest.approx(acc, abs=1e-12)], (board, key, eps)
        # Drawn where the numbers say: right with eps, up with accuracy.
        by_eps = sorted(points, key=lambda p: p["eps"])
        assert all(a["cx"] <= b["cx"] for a, b in itertools.pairwise(by_eps))
        by_acc = sorted(points, key=lambda p: p["acc"])
        assert all(a["cy"] >= b["cy"] for a, b in itertools.pairwise(by_acc))
        # The legend names the lines in board order.
        legend = page.eval_on_selector_all(f"[id='eps-{board}'] ul.legend small", "s => s.map(x => x.innerText)")
        assert legend == [k[:8] for k in keys if k in want]
    # natural's sweep on the L-inf board: clean, worst case at 0.2, and the two unbounded budgets.
    natural = expected_curves(built.store, "linf-0.2", ["0000natuabcdef01"])["0000natuabcdef01"]
    assert sorted(natural) == [0.0, 0.2, 0.4, 1.0]
    # pgd_at has no attack stored, so no line; the L2 board draws no L-inf sweep.
    assert "0003pgd_abcdef01" not in expected_curves(built.store, "linf-0.2", ["0003pgd_abcdef01"])
    l2 = page.inner_text("[id='eps-board-digits-l2-1.5'] figcaption:last-child")
    assert "eps = 1.5" in l2 and "unbounded" not in l2


def test_surrogates_are_marked_and_explained(built, session):
    page = session.open(built.index.as_uri())
    for board in ("board-digits-linf-0.2", "board-digits-l2-1.5"):
        marked = page.eval_on_selector_all(
            f"[id='{board}'] tbody tr:has(.mark.surrogate)", "rs => rs.map(r => r.dataset.key)"
        )
        assert marked == ["0000natuabcdef01"], board
        assert "black-box transfer cells" in page.inner_text(f"[id='{board}'] .surrogate-note")
    assert page.locator("[id='board-mnist-linf-0.3'] .surrogate").count() == 0
    natural = session.open((built.root / "ck" / "0000natuabcdef01.html").as_uri())
    assert "black-box transfer cells" in natural.inner_text(".surrogate-line")
    squeeze = session.open((built.root / "ck" / "0001logiabcdef01.html").as_uri())
    assert squeeze.locator(".surrogate-line").count() == 0


def test_clicking_a_header_sorts_the_rows(built, session):
    page = session.open(built.index.as_uri())
    board = "board-digits-linf-0.2"

    def column(col):
        return [r["cells"][col]["value"] for r in _board_rows(page, board)]

    header = page.locator(f"[id='{board}'] th[data-col='clean']")
    header.click()
    values = [float(v) for v in column("clean")]
    assert values == sorted(values, reverse=True) and header.get_attribute("aria-sort") == "descending"
    header.click()
    values = [float(v) for v in column("clean")]
    assert values == sorted(values) and header.get_attribute("aria-sort") == "ascending"
    # Missing numbers stay at the bottom whichever way a column sorts.
    page.locator(f"[id='{board}'] th[data-col='fgsm']").click()
    fgsm = column("fgsm")
    assert fgsm[-1] == "" and [float(v) for v in fgsm[:-1]] == sorted(map(float, fgsm[:-1]), reverse=True)
    # Text columns sort alphabetically, and the keyboard works too.
    defense = page.locator(f"[id='{board}'] th", has_text="Defense")
    defense.focus()
    page.keyboard.press("Enter")
    names = column("defense")
    assert names == sorted(names) and defense.get_attribute("aria-sort") == "ascending"


def test_the_search_box_filters_rows(built, session):
    page = session.open(built.index.as_uri())
    page.fill("#filter", "squeeze")
    rows = _board_rows(page, "board-digits-linf-0.2")
    assert [r["key"] for r in rows] == ["0001logiabcdef01"]
    assert page.inner_text("#filter-count") == "2 of 7 rows"  # it is on the L2 board too
    page.fill("#filter", "")
    assert len(_board_rows(page, "board-digits-linf-0.2")) == 4


def test_the_board_is_complete_without_javascript(built, browser):
    s = Session(browser, java_script_enabled=False)
    try:
        page = s.open(built.index.as_uri())
        assert not page.is_visible("#filter")  # the search box needs script, so it stays hidden
        rows = _board_rows(page, "board-digits-linf-0.2")
        expected = {k: w for k, w in expected_rows(built.store).items() if w["board"] == "board-digits-linf-0.2"}
        assert sorted(r["key"] for r in rows) == sorted(expected)
        for r in rows:
            assert r["cells"]["clean"]["text"].split()[0] == f"{100 * expected[r['key']]['clean']:.2f}"
        worst = [expected[r["key"]]["worst"] for r in rows]
        assert worst[-1] is None and worst[:-1] == sorted(worst[:-1], reverse=True)
    finally:
        s.close()


# --- links, requests, pages ----------------------------------------------------------------
LINKS_JS = """() => Array.from(document.querySelectorAll('a[href], link[href], img[src], script[src], iframe[src]'))
  .map(e => e.href || e.src)"""


def test_every_local_link_resolves_and_nothing_leaves_the_machine(built, session):
    root = built.root.resolve()
    pages = {built.index.as_uri()}
    todo = [built.index.as_uri()]
    ids: dict[str, set] = {}
    links: list[tuple[str, str]] = []
    while todo:
        url = todo.pop()
        page = session.open(url)
        ids[url] = set(page.eval_on_selector_all("[id]", "es => es.map(e => e.id)"))
        for link in page.evaluate(LINKS_JS):
            parts = urlsplit(link)
            if parts.scheme == "data":  # pictures inlined in the page (the loss landscapes)
                continue
            assert parts.scheme == "file", f"{url} links outside the site: {link}"
            links.append((url, link))
            target = Path(unquote(parts.path))
            assert target.is_file(), f"{url} links to a missing file: {link}"
            assert root in target.resolve().parents, f"{url} links outside the site folder: {link}"
            page_url = link.split("#")[0]
            if target.suffix == ".html" and page_url not in pages:
                pages.add(page_url)
                todo.append(page_url)
        page.close()
    for url, link in links:
        page_url, _, fragment = link.partition("#")
        if fragment:
            assert unquote(fragment) in ids[page_url], f"{url} links to a missing anchor: {link}"
    # index, transfer, attacks, one page per checkpoint and one comparison page per
    # dataset (digits, mnist), all reached by links
    assert len(pages) == 3 + len(CHECKPOINTS) + 2
    assert len(session.requests) >= len(pages)


def test_checkpoint_page_shows_cells_plots_flags_and_provenance(built, session):
    natural = built.store.checkpoint("0000natuabcdef01")
    page = session.open((built.root / "ck" / f"{natural.key}.html").as_uri())
    cells = page.eval_on_selector_all("#cells tbody tr", "rs => rs.map(r => r.innerText)")
    assert len(cells) == len(CHECKPOINTS[0][5])
    text = page.inner_text("body")
    for needle in (natural.sha256, "deadbeef", "2.x", "seed", "natural_digits"):
        assert needle in text
    # Four plots, each a drawn SVG with a visible size.
    for plot in ("pgd-steps", "eps-sweep", "restarts", "logits"):
        box = page.locator(f"#plot-{plot} svg").bounding_box()
        assert box and box["width"] > 100 and box["height"] > 60, plot
    # L-inf steps 5, 20, 200 on cross-entropy, 20 on CW, and L2 PGD-20 on both: six markers;
    # the eps sweep has two.
    assert page.locator("#plot-pgd-steps circle").count() == 6
    assert page.locator("#plot-eps-sweep circle").count() == 2
    squeeze = built.store.checkpoint("0001logiabcdef01")
    page = session.open((built.root / "ck" / f"{squeeze.key}.html").as_uri())
    flag = page.inner_text("#flag-spsa_stronger_than_pgd")
    assert "SPSA beats PGD on the same images." in flag and "pgd_same_images" in flag
    assert page.locator("#plot-eps-sweep .empty").count() == 1  # no sweep stored: said so, not drawn


FLAG_JS = """(t) => Object.fromEntries(Array.from(t.rows).map(r => [r.cells[0].innerText, r.cells[1].innerText]))"""


def test_flag_numbers_speak_percent_and_admission_is_a_table(built, session):
    squeeze = session.open((built.root / "ck" / "0001logiabcdef01.html").as_uri())
    # Accuracies and shares of samples in percent, as the page's other numbers; counts as counts.
    spsa = squeeze.eval_on_selector("#flag-spsa_stronger_than_pgd table", FLAG_JS)
    assert spsa == {"spsa": "35.00%", "pgd_same_images": "50.00%", "n": "20"}
    square = squeeze.eval_on_selector("#flag-square_stronger_than_pgd table", FLAG_JS)
    assert square["share"] == f"{100 * 7 / N:.2f}%" and square["broken_only_by_square"] == "7"
    assert square["n"] == str(N) and square["cells"] == SQUARE[1]
    # The admission checks: a small table of their parts, not clipped JSON in the provenance.
    natural = session.open((built.root / "ck" / "0000natuabcdef01.html").as_uri())
    provenance = natural.eval_on_selector("#provenance table.kv:not(.admission)", FLAG_JS)
    assert "admission" not in provenance and "surrogate" not in provenance
    assert provenance["checkpoint folder"] == "checkpoints/digits/natural/0000natuabcdef01"
    admission = natural.eval_on_selector("#provenance table.admission", FLAG_JS)
    assert admission["samples with a zero input gradient"] == f"3 of {N} (5.00%)"
    assert admission["correct predictions flipped by tiny noise"] == "2 of 57 (3.51%) at amplitude 0.01"
    assert admission["lowest output"] == "-11.25" and admission["largest row-sum error |Σ − 1|"] == "3.75"
    assert admission["share of predictions changed between passes"] == "0.00%"
    assert admission["mean loss at the last step"] == "2.75" and admission["autograd calls in one forward pass"] == "0"
    assert not any("{" in v for v in admission.values())


BREAKS_JS = """(codes) => codes.map(code => {
  const breaks = [], range = document.createRange();
  const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
  let top = null, last = null;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let i = 0; i < node.length; i++) {
      range.setStart(node, i); range.setEnd(node, i + 1);
      const rects = range.getClientRects();
      if (!rects.length) { continue; }
      if (top !== null && rects[0].top > top + 2) { breaks.push(last); }
      top = rects[0].top; last = node.data[i];
    }
  }
  return {text: code.innerText, breaks: breaks};
})"""


def test_cell_keys_wrap_only_after_commas(built, browser):
    context = browser.new_context(viewport={"width": 720, "height": 900})
    try:
        natural = built.store.checkpoint("0000natuabcdef01")
        page = context.new_page()
        page.goto((built.root / "ck" / f"{natural.key}.html").as_uri())
        keys = page.eval_on_selector_all("#cells code.key", BREAKS_JS)
        assert sorted(k["text"] for k in keys) == sorted(e.cell_key for e in built.store.evaluations([natural.id]))
        assert any(k["breaks"] for k in keys)  # the narrow window makes the long keys wrap...
        for k in keys:
            assert set(k["breaks"]) <= {","}, k  # ...and each wraps only after a comma
    finally:
        context.close()


def test_script_in_stored_text_shows_as_text(built, session):
    ck = built.store.checkpoint("0001logiabcdef01")
    page = session.open((built.root / "ck" / f"{ck.key}.html").as_uri())
    assert page.evaluate("window.__pwned") is None
    assert XSS in page.inner_text(".description")
    assert page.locator(".description b").count() == 0
    assert XSS in page.inner_text("#config")


def test_transfer_page_is_a_target_by_source_grid(built, session):
    page = session.open((built.root / "transfer.html").as_uri())
    grid = page.eval_on_selector(
        "table.transfer",
        """t => ({
        sources: Array.from(t.tHead.rows[1].cells).slice(1, -1).map(c => c.querySelector('a').innerText),
        rows: Array.from(t.tBodies[0].rows).map(r => ({target: r.cells[0].querySelector('a').innerText,
              values: Array.from(r.querySelectorAll('td.heat')).map(c => c.dataset.value)}))})""",
    )
    ids = sorted({t.source_id for t in built.store.transfers()})
    names = ["natural (natural_digits)", "logit_squeeze (logit_squeeze_digits)", "label_smoothing"]
    assert grid["sources"] == names and [r["target"] for r in grid["rows"]] == names
    for t in built.store.transfers():  # rows are targets, columns sources
        shown = grid["rows"][ids.index(t.target_id)]["values"][ids.index(t.source_id)]
        assert float(shown) == pytest.approx(t.robust_acc)
    assert page.locator("td.diagonal").count() == 3
    # Each grid is headed by its dataset and the label of the cell its examples were crafted with.
    assert page.eval_on_selector_all("section.grid h2", "hs => hs.map(h => h.innerText)") == ["digits · pgd10"]


def test_attacks_page_explains_every_stored_cell_key(built, session):
    page = session.open((built.root / "attacks.html").as_uri())
    keys = set(page.eval_on_selector_all("tr.cell code.key", "cs => cs.map(c => c.innerText)"))
    stored = {e.cell_key for e in built.store.evaluations()} | {t.cell_key for t in built.store.transfers()}
    assert keys == stored
    pgd = page.inner_text("#attack-pgd")
    assert "Madry" in pgd and "Gradient steps per restart" in pgd  # module and field docstrings


DIAG_JS = """(table) => Array.from(table.tBodies[0].rows).map(r => {
  const cells = {};
  r.querySelectorAll('td[data-col]').forEach(td => { cells[td.dataset.col] = td.dataset.value; });
  return {key: r.dataset.key, cells: cells};
})"""


PIXELS_JS = """(img) => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
  c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  return Array.from(g.getImageData(0, 0, c.width, c.height).data); }"""


def _expected_diag(store: Store, ck) -> dict:
    """What a Table 1 row must show, from the stored rows alone (measured accuracies are
    the weakest stored FGSM and L-inf PGD cells at the diagnostic's eps)."""
    d = store.diagnostics([ck.id])[0]
    cells = [
        e
        for e in store.evaluations([ck.id])
        if e.indices is None
        and e.threat == ck.threat
        and e.params.get("eps") == d.eps
        and e.params.get("norm", "linf") == "linf"
    ]
    fgsm = [e.robust_acc for e in cells if e.attack == "fgsm"]
    pgd = [e.robust_acc for e in cells if e.attack == "pgd"]
    s = d.summary
    return {
        "logit_gap": s["logit_gap"]["median"],
        "grad_gap": s["grad_gap"]["median"],
        "eps_l": s["eps_l"]["median"],
        "coherence": s["coherence"]["median"],
        "logit_variance": s["logit_variance"],
        "predicted": s["predicted_acc"],
        "clean": s["clean_acc"],
        "fgsm": min(fgsm) if fgsm else None,
        "pgd": min(pgd) if pgd else None,
    }


def _check_diag_row(shown: dict, expected: dict) -> None:
    for col, value in expected.items():
        if value is None:
            assert shown[col] == "", col
        else:
            assert float(shown[col]) == pytest.approx(value, rel=1e-12), col


def test_checkpoint_page_shows_its_stored_diagnostics(built, session):
    natural = built.store.checkpoint("0000natuabcdef01")
    page = session.open((built.root / "ck" / f"{natural.key}.html").as_uri())
    rows = page.eval_on_selector("#diag-row", DIAG_JS)
    assert len(rows) == 1 and rows[0]["key"] == natural.key
    _check_diag_row(rows[0]["cells"], _expected_diag(built.store, natural))
    # Eight landscapes, each a PNG the browser decodes to the stored 5 x 5 grid.
    sizes = page.eval_on_selector_all(
        ".landscapes img", "is => is.map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[True, 5, 5]] * 8
    # The highest stored loss of the eight is drawn in the top colour, the lowest in the bottom one.
    grids = np.array(built.store.diagnostics([natural.id])[0].landscape["loss"])
    hi_at, lo_at = np.unravel_index(grids.argmax(), grids.shape), np.unravel_index(grids.argmin(), grids.shape)
    for (image, row, col), color in ((hi_at, [253, 231, 37]), (lo_at, [68, 1, 84])):
        pixels = page.eval_on_selector(f"#landscape-{image} img", PIXELS_JS)
        assert pixels[4 * (row * 5 + col) : 4 * (row * 5 + col) + 3] == color
    for plot in ("logit-gap", "grad-gap", "eps-l", "coherence"):
        box = page.locator(f"#plot-diag-{plot} svg").bounding_box()
        assert box and box["width"] > 100, plot
    # logit_squeeze is drawn against natural training on the same dataset.
    squeeze = built.store.checkpoint("0001logiabcdef01")
    page = session.open((built.root / "ck" / f"{squeeze.key}.html").as_uri())
    assert "natural" in page.inner_text("#plot-diag-logit-gap")
    # A checkpoint without diagnostics says how to compute them.
    smoothing = built.store.checkpoint("0002labeabcdef01")
    page = session.open((built.root / "ck" / f"{smoothing.key}.html").as_uri())
    assert f"bench diagnose --defense {smoothing.key}" in page.inner_text("#diagnostics")


def test_compare_page_puts_every_checkpoint_side_by_side(built, session):
    page = session.open(built.index.as_uri())
    page.click("#board-digits-linf-0\\.2 a.compare-link")
    assert page.url.endswith("compare-digits.html")
    rows = page.eval_on_selector("#compare-table", DIAG_JS)
    digits = [ck for ck in built.store.checkpoints(dataset="digits")]
    diagnosed = [ck for i, ck in enumerate(digits) if i in DIAGNOSED]
    assert [r["key"] for r in rows] == [ck.key for ck in diagnosed]
    for r, ck in zip(rows, diagnosed, strict=True):
        _check_diag_row(r["cells"], _expected_diag(built.store, ck))
    missing = page.inner_text("#table .note")
    assert "label_smoothing" in missing and "Not computed yet" in missing
    # Fig. 2: natural and the adversarially trained pgd_at, not the regularizer.
    fig2 = page.inner_text("#fig2 figcaption")
    assert "natural" in fig2 and "pgd_at" in fig2 and "PGD-5" in fig2 and "logit_squeeze" not in fig2
    # Fig. 1: two plots per diagnosed checkpoint.
    assert page.locator("#fig1 figure svg").count() == 2 * len(diagnosed)
    # The mnist comparison page exists and says nothing is computed there.
    page = session.open((built.root / "compare-mnist.html").as_uri())
    assert "No diagnostics stored for mnist" in page.inner_text("#table")


def test_screenshot(built, session, tmp_path):
    """A picture of the rendered board; kept under $BENCH_ARTIFACTS when CI sets it."""
    page = session.open(built.index.as_uri())
    folder = Path(os.environ.get("BENCH_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "test_site_board.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


# --- writing the folder (no browser needed) ------------------------------------------------
OUTSIDE_FACTORY = """
from bench.core.data import get_spec
from bench.core.models import build_model


def build():
    return build_model("digits_cnn", get_spec("digits"))
"""


def _pages(root: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in root.rglob("*") if p.suffix in (".html", ".css")}


def test_no_page_names_the_folders_of_the_machine(built):
    folder = built.root.parent  # the store's checkpoint folders lie under it, as a results folder's do
    assert all(ck.path.startswith(str(folder)) for ck in built.store.checkpoints())
    for page, text in _pages(built.root).items():
        assert str(folder) not in text, page


def test_a_factory_shows_as_its_file_name_and_a_module_as_it_is():
    assert factory_name("/home/someone/models/my_models.py:build") == "my_models.py:build"
    assert factory_name("C:\\Users\\someone\\my_models.py:build") == "my_models.py:build"
    assert factory_name("../my_models.py:build") == "my_models.py:build"
    assert factory_name("my_package.models:build") == "my_package.models:build"
    assert factory_name(None) == ""


def test_an_outside_model_shows_its_file_not_its_folder(tmp_path):
    """bench.evaluate on a factory file in a folder of its own (a model runs: one PGD cell):
    the site names the file and the weights' hash, never the folders the run recorded."""
    import torch
    from safetensors.torch import save_file

    import bench
    from bench.core.data import get_spec
    from bench.core.models import build_model

    home = tmp_path / "home" / "someone" / "models"
    home.mkdir(parents=True)
    (home / "my_models.py").write_text(OUTSIDE_FACTORY)
    (home / "tiny.toml").write_text('[[cell]]\nattack = "pgd"\nsteps = 5\n')
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_model("digits_cnn", get_spec("digits")).state_dict().items()}
    save_file(state, str(home / "weights.safetensors"))
    results = tmp_path / "results"
    bench.evaluate(
        f"{home / 'my_models.py'}:build",
        name="mine",
        matrix=str(home / "tiny.toml"),
        weights=str(home / "weights.safetensors"),
        results=results,
        device="cpu",
    )
    store = Store.for_results(results, None)
    (ck,) = store.checkpoints()
    assert str(home) in ck.meta["outside"]["factory"] and str(home) in ck.meta["outside"]["weights_file"]
    index = build_site(store, tmp_path / "site")
    pages = _pages(index.parent)
    for page, text in pages.items():
        assert str(tmp_path) not in text and str(results.resolve()) not in text, page
    assert "outside model my_models.py:build" in pages[index]
    text = pages[index.parent / "ck" / f"{ck.key}.html"]
    for needle in (
        "<code>my_models.py:build</code>",
        "<code>weights.safetensors</code>",
        ck.meta["outside"]["weights_sha256"],
        f"checkpoints/digits/mine/{ck.key}",
    ):
        assert needle in text


def test_bad_out_is_one_line_bench_error(built, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BenchError, match="cannot write the site") as exc:
        build_site(built.store, blocker / "site")
    assert "\n" not in str(exc.value)
    with pytest.raises(BenchError, match="is a file"):
        build_site(built.store, blocker)
    stranger = tmp_path / "not-a-site"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(BenchError, match="refusing to replace"):
        build_site(built.store, stranger)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_cli_exits_2_on_unwritable_out(built, tmp_path, monkeypatch, capsys):
    from bench import cli

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(
        sys,
        "argv",
        ["bench", "site", "--db", built.store.url, "--results", str(tmp_path), "--out", str(blocker / "site")],
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: cannot write the site") and len(err.strip().splitlines()) == 1


def test_a_failed_build_leaves_the_old_site(built, tmp_path, monkeypatch):
    out = tmp_path / "site"
    build_site(built.store, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / MARKER).is_file()

    def broken(data, folder):
        (folder / "index.html").write_text("half a site")
        raise RuntimeError("template exploded")

    monkeypatch.setattr(render, "render", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        build_site(built.store, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no temporary folder left behind


def test_rebuild_replaces_the_site_and_an_empty_store_renders(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    out = tmp_path / "site"
    build_site(store, out)
    index = build_site(store, out)
    assert "No checkpoints are stored yet" in index.read_text()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("empty.db")] == ["site"]
