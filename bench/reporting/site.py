"""The static leaderboard: `bench site` reads the store and writes a folder of HTML.

Pages are computed here (pandas for the tables) and rendered by the jinja2 templates in
bench/templates with autoescape on; the templates only loop and print. The site is:

- index.html: one board per dataset and threat model, checkpoints ranked by worst-case
  robust accuracy, the paper's reported number beside ours where a preset carries one;
- ck/<key>.html: one page per checkpoint with its config, provenance, every cell, its
  flags explained, and four small plots drawn as inline SVG;
- transfer.html: source-by-target grids, laid out like Summers & Dinneen's Table 2;
- attacks.html: what every attack, parameter and stored cell key means.

Everything is linked relatively and no asset is fetched from anywhere, so the site
works from file:// with no network. It is written to a temporary folder beside --out
and renamed into place, so a failure leaves the previous site as it was. The site never
runs a model: what a plot needs was stored with its cell.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import types
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from bench.errors import BenchError
from bench.registry import field_docs
from bench.store.db import Checkpoint, Evaluation, Store, Transfer, unpack_bits, worst_case

MARKER = ".bench-site"
"""A file in every site this module writes; only such a folder (or an empty one) is replaced."""

# Board columns after clean accuracy: (column id, header, cell label). The label is what
# `cell_label` calls a cell, and also the key of the paper's number in a preset
# (meta["paper"]); None is the longest PGD run, whatever its step count.
BOARD_COLUMNS = [
    ("fgsm", "FGSM", "fgsm"),
    ("pgd20", "PGD\u201120", "pgd20"),  # non-breaking hyphens: a header never splits there
    ("pgd_longest", "PGD longest", None),
    ("cw20", "CW\u201120", "cw20"),
    ("spsa", "SPSA", "spsa"),
    ("autoattack", "AutoAttack", "autoattack"),
]

# Labels presets use for the paper's numbers that are not `cell_label`'s own spelling.
PAPER_ALIASES = {"restarts10": "pgd20_r10"}


def cell_label(attack: str, params: dict) -> str:
    """The column label of a cell within its threat model: pgd20, cw200, pgd20_r10, fgsm, spsa.

    PGD is named by its loss and steps (cross-entropy `pgd`, CW margin `cw`), with `_rN`
    for N restarts; every other attack is named by itself.
    """
    if attack != "pgd":
        return attack
    base = "cw" if params.get("loss") == "cw" else "pgd"
    restarts = params.get("restarts", 1)
    return f"{base}{params.get('steps')}" + (f"_r{restarts}" if restarts and restarts > 1 else "")


def build_site(store: Store, out_dir: str | os.PathLike) -> Path:
    """Render the whole site from the store into `out_dir`; returns the index page's path."""
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise BenchError(f"cannot write the site to {str(out)!r} ({exc.strerror}{where}); "
                         "pass --out DIR with a folder you can write") from exc
    try:
        _render(_load(store), tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


# --- reading the store -------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Cell:
    """One stored evaluation or transfer row, read with a plain select (no ORM objects).

    `extra` comes as text and is parsed on first use: it holds the logit histograms and
    is most of a row's bytes, and only a few pages need it.
    """

    checkpoint_id: int
    """The attacked checkpoint (a transfer's target)."""
    source_id: int | None
    cell_key: str
    attack: str
    params: dict
    threat: str
    clean_acc: float
    robust_acc: float
    n: int
    seconds: float
    correct_bits: bytes
    indices: list | None
    raw_extra: str | None
    device: str
    _extra: dict | None = None

    def correct(self):
        return unpack_bits(self.correct_bits, self.n)

    @property
    def extra(self) -> dict:
        if self._extra is None:
            self._extra = json.loads(self.raw_extra) if self.raw_extra else {}
        return self._extra

    @property
    def warnings(self) -> list[str]:
        # Most cells warn of nothing; seeing that in the text spares parsing the histograms.
        raw = self.raw_extra or ""
        if '"warnings"' not in raw or _NO_WARNINGS.search(raw):
            return []
        return [str(w) for w in self.extra.get("warnings") or []]


_NO_WARNINGS = re.compile(r'"warnings"\s*:\s*\[\s*\]')


@dataclasses.dataclass
class _Data:
    checkpoints: list[Checkpoint]
    cells: dict[int, list[_Cell]]
    incoming: dict[int, list[_Cell]]
    outgoing: dict[int, list[_Cell]]
    flags: dict[int, list]
    frame: pd.DataFrame
    """One row per stored evaluation: checkpoint_id, cell_key, attack, threat, label, ..."""
    diagnostics: dict = dataclasses.field(default_factory=dict)
    """bench.store.db.Diagnostic rows by checkpoint id."""
    overrides: dict[int, str] = dataclasses.field(default_factory=dict)
    """Per checkpoint, the settings that tell it apart from others of its defense and
    preset (`beta=0.5, epochs=30`); absent where nothing needs telling apart."""


def _read_cells(store: Store, table) -> list[_Cell]:
    from sqlalchemy import Text, null, select, type_coerce

    target = table.target_id if table is Transfer else table.checkpoint_id
    source = table.source_id if table is Transfer else null()
    query = select(target, source, table.cell_key, table.attack, table.params, table.threat, table.clean_acc,
                   table.robust_acc, table.n, table.seconds, table.correct_bits, table.indices,
                   type_coerce(table.extra, Text), table.device).order_by(table.id)
    with store.Session() as s:
        return [_Cell(*row) for row in s.execute(query)]


def _load(store: Store) -> _Data:
    cks = store.checkpoints()
    cells: dict[int, list[_Cell]] = defaultdict(list)
    for e in _read_cells(store, Evaluation):
        cells[e.checkpoint_id].append(e)
    incoming: dict[int, list[_Cell]] = defaultdict(list)
    outgoing: dict[int, list[_Cell]] = defaultdict(list)
    for t in _read_cells(store, Transfer):
        incoming[t.checkpoint_id].append(t)
        outgoing[t.source_id].append(t)
    flags: dict[int, list] = defaultdict(list)
    for f in store.flags():
        flags[f.checkpoint_id].append(f)
    rows = [(e.checkpoint_id, e.cell_key, e.attack, e.threat, cell_label(e.attack, e.params),
             e.params.get("steps") if e.attack == "pgd" else None,
             e.params.get("loss") if e.attack == "pgd" else None,
             e.params.get("restarts", 1) if e.attack == "pgd" else None,
             e.robust_acc, e.n, e.indices is not None)
            for group in cells.values() for e in group]
    frame = pd.DataFrame(rows, columns=["checkpoint_id", "cell_key", "attack", "threat", "label", "steps",
                                        "loss", "restarts", "robust_acc", "n", "subset"])
    frame = frame.astype({"subset": bool, "robust_acc": float})  # typed even when empty (a mask, not labels)
    diagnostics = {d.checkpoint_id: d for d in store.diagnostics()}
    return _Data(cks, cells, incoming, outgoing, flags, frame, diagnostics, _overrides(cks))


def _overrides(cks: list[Checkpoint]) -> dict[int, str]:
    """The config and training settings that differ within each group of checkpoints
    sharing dataset, defense and preset (two `--set` variants of one recipe), as text."""
    groups: dict[tuple, list[Checkpoint]] = defaultdict(list)
    for ck in cks:
        groups[(ck.dataset, ck.defense, ck.preset)].append(ck)
    out: dict[int, str] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        flat = {ck.id: {**{k: v for k, v in (ck.config or {}).items() if not isinstance(v, dict)},
                        **(ck.train_config or {})} for ck in members}
        keys = sorted({k for f in flat.values() for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
        for ck in members:
            text = ", ".join(f"{k}={_num(flat[ck.id].get(k))}" for k in differ)
            if text:
                out[ck.id] = text
    return out


# --- formatting ----------------------------------------------------------------------------
def pct(value: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with two decimals; '' when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.2f}"


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _exact(value: Any) -> str:
    """A config or sidecar value as stored: strings as they are, the rest as JSON (floats in full)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def cell_anchor(cell_key: str) -> str:
    """The id of a cell key's entry on attacks.html (keys hold ':', '=' and ',')."""
    return "cell-" + hashlib.sha1(cell_key.encode()).hexdigest()[:12]


_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def page_path(ck: Checkpoint) -> str:
    """The checkpoint page's path under the site root, named by its key if that is a safe name."""
    return f"ck/{ck.key}.html" if _SAFE.match(ck.key) else f"ck/id-{ck.id}.html"


def _name(ck: Checkpoint, data: "_Data | None" = None) -> str:
    name = f"{ck.defense} ({ck.preset})" if ck.preset else ck.defense
    extra = data.overrides.get(ck.id) if data is not None else None
    return f"{name} [{extra}]" if extra else name


def _prose(text: str) -> list[list[tuple[bool, str]]]:
    """A docstring as paragraphs of (is_code, text) runs; `backticks` become code.

    Source line breaks are dropped (the page reflows the text), except before a bullet.
    """
    return [_runs(re.sub(r"\n(?!\s*[-*] )\s*", " ", para))
            for para in re.split(r"\n\s*\n", inspect.cleandoc(text or "")) if para.strip()]


def _runs(text: str) -> list[tuple[bool, str]]:
    parts = re.split(r"`([^`]*)`", text)
    return [(i % 2 == 1, p) for i, p in enumerate(parts) if p]


# --- the boards --------------------------------------------------------------------------
def _boards(data: _Data) -> list[dict]:
    """One board per dataset and threat model, rows ranked by worst-case robust accuracy.

    A checkpoint's own threat model always has a board; another threat model (an L2
    budget, say) gets one where some cell of it falls in a board column.
    """
    frame = data.frame
    full = frame[~frame["subset"]]
    # The strongest (lowest) number per checkpoint, threat and column label.
    table = frame.groupby(["checkpoint_id", "threat", "label"])["robust_acc"].min().to_dict()
    subset_n = frame[frame["subset"]].groupby(["checkpoint_id", "threat", "label"])["n"].min().to_dict()
    pgd = full[(full["attack"] == "pgd") & (full["loss"] == "xent") & (full["restarts"] == 1)]
    longest = pgd.groupby(["checkpoint_id", "threat"])["steps"].max().to_dict()
    test_size = full.groupby(["checkpoint_id", "threat"])["n"].max().to_dict()
    column_labels = {label for _, _, label in BOARD_COLUMNS if label}
    by_id = {ck.id: ck for ck in data.checkpoints}

    members: dict[tuple[str, str], set[int]] = defaultdict(set)
    for ck in data.checkpoints:
        members[(ck.dataset, ck.threat)].add(ck.id)
    for cid, threat in {*longest, *((c, t) for c, t, label in table if label in column_labels)}:
        members[(by_id[cid].dataset, threat)].add(cid)

    def value(cid, threat, label):
        v = table.get((cid, threat, label))
        return None if v is None or math.isnan(v) else float(v)

    boards = []
    own = {(ck.dataset, ck.threat) for ck in data.checkpoints}
    for dataset, threat in sorted(members, key=lambda k: (k[0], k not in own, k[1])):
        rows = []
        for cid in members[(dataset, threat)]:
            ck = by_id[cid]
            meta = ck.meta or {}
            # The paper's numbers are for the checkpoint's own threat model only.
            paper = (meta.get("paper") or {}) if threat == ck.threat else {}
            size = test_size.get((cid, threat))
            wc = None
            if size:
                wc = worst_case(types.SimpleNamespace(threat=threat), data.cells[cid],
                                data.incoming[cid], int(size))
            cols = [_cell("clean", meta.get("clean_acc"), paper.get("clean"))]
            for col, _, label in BOARD_COLUMNS:
                note = ""
                if label is None:
                    steps = longest.get((cid, threat))
                    label = f"pgd{int(steps)}" if steps is not None and not math.isnan(steps) else None
                    note = f"{int(steps)} steps" if label else ""
                v = value(cid, threat, label) if label else None
                n = subset_n.get((cid, threat, label)) if label else None
                if n is not None and v is not None:
                    note = f"on {int(n)} images"
                cols.append(_cell(col, v, paper.get(label) if label else None, note))
            cols.append(_cell("worst", wc["robust_acc"] if wc else None, None,
                              f"{wc['cells']} cell{'' if wc['cells'] == 1 else 's'}" if wc else ""))
            rows.append({"key": ck.key, "href": page_path(ck), "defense": ck.defense,
                         "preset": ck.preset or "", "seed": ck.seed, "short": ck.key[:8], "arch": ck.arch,
                         "overrides": data.overrides.get(cid, ""),
                         "outside": (meta.get("outside") or {}).get("factory") or "",
                         "cols": cols, "worst": wc["robust_acc"] if wc else None,
                         "flags": [{"name": f.name, "href": f"{page_path(ck)}#flag-{f.name}"}
                                   for f in data.flags[cid]] if threat == ck.threat else [],
                         "cost": {"value": repr(float(ck.train_seconds)), "text": f"{ck.train_seconds:,.1f} s",
                                  "device": ck.device}})
        rows.sort(key=lambda r: (r["worst"] is None, -(r["worst"] or 0.0), r["defense"], r["key"]))
        for rank, r in enumerate(rows, 1):
            r["rank"] = rank
        boards.append({"id": f"board-{dataset}-{threat}", "dataset": dataset, "threat": threat,
                       "own": (dataset, threat) in own, "rows": rows,
                       "columns": [("clean", "Clean")] + [(c, h) for c, h, _ in BOARD_COLUMNS] + [("worst", "Worst case")]})
    return boards


def _cell(col: str, value: float | None, paper: float | None, note: str = "") -> dict:
    return {"col": col, "value": "" if value is None else repr(float(value)), "text": pct(value) or "–",
            "paper": pct(paper), "note": note}


# --- a checkpoint's page -----------------------------------------------------------------
def _checkpoint_page(ck: Checkpoint, data: _Data, by_id: dict[int, Checkpoint], root: str,
                     presets: dict[str, tuple[str, str]]) -> dict:
    """The template context of one checkpoint's page."""
    meta = ck.meta or {}
    description, source = presets.get(ck.preset or "", ("", ""))
    cells = sorted(data.cells[ck.id], key=lambda e: (e.threat != ck.threat, *_cell_order(e)))
    shown = {"key", "defense", "config", "train", "dataset", "arch", "seed", "epochs", "train_seconds",
             "device", "preset", "paper", "clean_acc", "logit_stats", "package_version", "git_commit",
             "torch_version", "sha256", "preset_description", "preset_source", "train_losses"}
    provenance = [
        ("checkpoint key", ck.key), ("weights sha256", ck.sha256), ("dataset", ck.dataset),
        ("threat model", ck.threat), ("architecture", ck.arch), ("seed", str(ck.seed)),
        ("epochs", str(ck.epochs)), ("training time", _seconds(ck.train_seconds)), ("device", ck.device),
        ("bench version", str(meta.get("package_version", ""))), ("torch version", str(meta.get("torch_version", ""))),
        ("git commit", str(meta.get("git_commit") or "unknown")), ("stored at", ck.created_at),
        ("path", ck.path),
    ]
    losses = meta.get("train_losses")
    if isinstance(losses, list) and losses and isinstance(losses[-1], (int, float)):
        provenance.append(("final training loss", _num(float(losses[-1]))))
    # Whatever else the sidecar holds, so provenance added later shows without a code change.
    provenance += [(k, _clip(_exact(v))) for k, v in sorted(meta.items()) if k not in shown]

    labels: dict[str, float] = {}
    for e in cells:
        if e.threat == ck.threat:
            label = cell_label(e.attack, e.params)
            labels[label] = min(labels.get(label, 1.0), e.robust_acc)
    paper = [{"label": k, "paper": pct(v),
              "ours": pct(meta.get("clean_acc") if k == "clean" else labels.get(PAPER_ALIASES.get(k, k)))}
             for k, v in (meta.get("paper") or {}).items()]

    def transfer_row(t: _Cell, other: int) -> dict:
        o = by_id.get(other)
        return {"name": _name(o, data) if o else f"checkpoint {other}", "short": o.key[:8] if o else "",
                "href": f"{root}{page_path(o)}" if o else "", "cell_key": t.cell_key,
                "anchor": cell_anchor(t.cell_key), "robust": pct(t.robust_acc), "n": t.n}

    plots = _plots(ck, cells)
    return {
        "root": root, "title": f"{_name(ck, data)} [{ck.key[:8]}]", "ck": ck, "name": _name(ck, data),
        "outside": meta.get("outside"),
        "clean": pct(meta.get("clean_acc")),
        "description": meta.get("preset_description") or description,
        "source": meta.get("preset_source") or source,
        "provenance": provenance,
        "config": [(k, _exact(v)) for k, v in sorted((ck.config or {}).items())],
        "train_config": [(k, _exact(v)) for k, v in sorted((ck.train_config or {}).items())],
        "paper": paper,
        "cells": [{"key": e.cell_key, "anchor": cell_anchor(e.cell_key), "attack": e.attack, "threat": e.threat,
                   "clean": pct(e.clean_acc), "robust": pct(e.robust_acc), "n": e.n,
                   "subset": e.indices is not None, "seconds": f"{e.seconds:.2f}", "device": e.device,
                   "warnings": "; ".join(e.warnings)} for e in cells],
        "incoming": [transfer_row(t, t.source_id) for t in data.incoming[ck.id]],
        "outgoing": [transfer_row(t, t.checkpoint_id) for t in data.outgoing[ck.id]],
        "flags": [{"name": f.name, "message": f.message or _flag_text(f.name),
                   "numbers": [(k, _num(v)) for k, v in (f.numbers or {}).items()]} for f in data.flags[ck.id]],
        "logit_stats": plots["logit_stats"],
        "plots": plots["list"],
        "diagnostics": _diagnostics_section(ck, data, root),
    }


def _diagnostics_section(ck: Checkpoint, data: _Data, root: str) -> dict | None:
    from bench.reporting.site_diagnostics import checkpoint_section

    natural = next((data.diagnostics[c.id] for c in data.checkpoints
                    if c.dataset == ck.dataset and c.defense == "natural" and c.id in data.diagnostics), None)
    return checkpoint_section(ck, data.diagnostics.get(ck.id), natural, data.cells[ck.id], root)


def _histogram(hist: Any) -> bool:
    """Whether a stored logit histogram has the shape the plot needs."""
    return (isinstance(hist, dict) and isinstance(hist.get("edges"), list) and len(hist["edges"]) > 1
            and all(isinstance(hist.get(k), list) and len(hist[k]) == len(hist["edges"]) - 1
                    for k in ("clean", "adv")))


def _preset_text() -> dict[str, tuple[str, str]]:
    """(description, source) of every preset the package ships, by name.

    The sidecar records a preset's name and paper numbers, not its prose, so the prose
    comes from the preset files; a sidecar that does record `preset_description` wins.
    A broken preset file costs its description here, not the whole site.
    """
    from bench.core.presets import all_presets

    try:
        return {name: (p.description, p.source) for name, p in all_presets().items()}
    except BenchError:
        return {}


def _flag_text(name: str) -> str:
    from bench.science.flags import FLAG_TEXT

    return FLAG_TEXT.get(name, "")


def _plots(ck: Checkpoint, cells: list[_Cell]) -> dict:
    """The four plots of a checkpoint page from its stored cells, as inline SVG."""
    own = [e for e in cells if e.indices is None]
    listing = []

    def add(name, title, caption, svg, empty):
        listing.append({"id": name, "svg": Markup(svg), "title": title, "caption": caption, "empty": empty})

    # Robust accuracy against PGD steps: one line per loss, norm and threat (single start).
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    series = defaultdict(dict)
    for e in own:
        steps = e.params.get("steps")
        if e.attack == "pgd" and e.params.get("restarts", 1) == 1 and number(steps) and steps > 0:
            name = f"{e.params.get('loss')} {e.threat}"
            series[name][steps] = min(series[name].get(steps, 1.0), e.robust_acc)
    lines = [(n, sorted(s.items())) for n, s in sorted(series.items())]
    add("pgd-steps", "Robust accuracy against PGD steps",
        "Single-start PGD; a line still falling at the right means the shorter runs had not converged.",
        svg_lines(lines, xlabel="PGD steps", ylabel="robust accuracy (%)", logx=True) if lines else "",
        "No PGD cells stored (the full matrix runs PGD-5 to PGD-1000).")

    # Accuracy against epsilon, through the unbounded sweep.
    # Each budget is its own threat model (unbounded-<eps>), so group by loss instead.
    sweep: dict[str, dict] = defaultdict(dict)
    for e in own:
        if e.attack == "unbounded" and number(e.params.get("eps")):
            name, eps = f"{e.params.get('loss', 'xent')} PGD", e.params["eps"]
            sweep[name][eps] = min(sweep[name].get(eps, 1.0), e.robust_acc)
    lines = [(t, sorted(s.items())) for t, s in sorted(sweep.items())]
    budget = next((e.params["eps"] for e in own if e.threat == ck.threat and number(e.params.get("eps"))), None)
    add("eps-sweep", "Accuracy against epsilon (unbounded sweep)",
        "PGD with a growing budget must reach 0% accuracy; a plateau above zero is a sign of gradient masking."
        + (f" The dashed line is the threat model's eps = {budget:g}." if budget is not None else ""),
        svg_lines(lines, xlabel="epsilon", ylabel="accuracy (%)", mark=budget) if lines else "",
        "No unbounded sweep stored.")

    # Accuracy against restarts: one line per loss, steps and threat with several restart counts.
    by_restarts = defaultdict(dict)
    for e in own:
        r = e.params.get("restarts", 1)
        if e.attack == "pgd" and number(r):
            name = f"{e.params.get('loss')}-{e.params.get('steps')} {e.threat}"
            by_restarts[name][r] = min(by_restarts[name].get(r, 1.0), e.robust_acc)
    lines = [(n, sorted(s.items())) for n, s in sorted(by_restarts.items()) if len(s) > 1]
    add("restarts", "Accuracy against random restarts",
        "More restarts lowering accuracy by more than a point means single-start PGD misses the worst case.",
        svg_lines(lines, xlabel="restarts", ylabel="robust accuracy (%)") if lines else "",
        "No PGD setting is stored with more than one restart count.")

    # Logit distribution on clean and adversarial data, from the strongest cell that kept it.
    ranked = sorted((e for e in own if e.threat == ck.threat),
                    key=lambda e: (e.robust_acc, -(e.params.get("steps") if number(e.params.get("steps")) else 0),
                                   e.cell_key))
    strongest = next((e for e in ranked if _histogram(e.extra.get("logit_hist"))), None)
    hist = strongest.extra["logit_hist"] if strongest else None
    add("logits", "Distribution of logits, clean and adversarial",
        f"All logits of the test set, clean and under the strongest stored attack ({strongest.cell_key})."
        if strongest else "",
        svg_hist(hist["edges"], [("clean", hist["clean"]), ("adversarial", hist["adv"])],
                 xlabel="logit value", ylabel="count") if hist else "",
        "No cell stored a logit histogram.")

    clean_stats = (ck.meta or {}).get("logit_stats") or {}
    adv_stats = (strongest.extra.get("adv_logit_stats") or {}) if strongest else {}
    stats = [(k, _num(clean_stats.get(k)) if k in clean_stats else "", _num(adv_stats.get(k)) if k in adv_stats else "")
             for k in dict.fromkeys([*clean_stats, *adv_stats])]
    return {"list": listing, "logit_stats": stats}


# --- the transfer page ---------------------------------------------------------------------
def _transfer_grids(data: _Data) -> list[dict]:
    """Per dataset and crafting cell: rows are targets, columns sources (Summers & Dinneen Table 2)."""
    by_id = {ck.id: ck for ck in data.checkpoints}
    frame = pd.DataFrame([{"source": t.source_id, "target": t.checkpoint_id, "cell_key": t.cell_key,
                           "robust_acc": t.robust_acc, "n": t.n}
                          for ts in data.incoming.values() for t in ts],
                         columns=["source", "target", "cell_key", "robust_acc", "n"])
    frame = frame[frame["source"].isin(by_id) & frame["target"].isin(by_id)]
    if frame.empty:
        return []
    frame["dataset"] = [by_id[s].dataset for s in frame["source"]]
    grids = []
    for (dataset, cell_key), group in frame.groupby(["dataset", "cell_key"], sort=True):
        grid = group.pivot_table(index="target", columns="source", values="robust_acc", aggfunc="min")
        sources, targets = sorted(grid.columns), sorted(grid.index)
        rows = []
        for t in targets:
            ck = by_id[t]
            cells = []
            for s in sources:
                v = grid.at[t, s]
                v = None if math.isnan(v) else float(v)
                cells.append({"text": pct(v) or "–", "value": "" if v is None else repr(v),
                              "style": _heat(v), "diagonal": s == t,
                              "title": f"{_name(ck, data)} attacked with examples crafted on {_name(by_id[s], data)}"})
            others = [grid.at[t, s] for s in sources if s != t and not math.isnan(grid.at[t, s])]
            rows.append({"name": _name(ck, data), "short": ck.key[:8], "href": page_path(ck),
                         "cells": cells, "min": pct(min(others)) if others else "–"})
        grids.append({"dataset": dataset, "cell_key": cell_key, "anchor": cell_anchor(cell_key),
                      "n": int(group["n"].max()),
                      "sources": [{"name": _name(by_id[s], data), "short": by_id[s].key[:8],
                                   "href": page_path(by_id[s])} for s in sources],
                      "rows": rows})
    return grids


def _heat(value: float | None) -> str:
    """Background and text colour for an accuracy: pale (0%) to deep blue (100%)."""
    if value is None:
        return ""
    lo, hi = (247, 251, 255), (8, 69, 148)
    r, g, b = (round(a + (c - a) * value) for a, c in zip(lo, hi))
    return f"background:#{r:02x}{g:02x}{b:02x};color:{'#fff' if value > 0.55 else '#111'}"


# --- the attacks page --------------------------------------------------------------------
def _parse_key(cell_key: str) -> tuple[str, list[tuple[str, str]]]:
    name, _, rest = cell_key.partition(":")
    return name, [tuple(p.partition("=")[::2]) for p in rest.split(",") if p]


def _attacks(data: _Data) -> list[dict]:
    """Every registered or stored attack: its docstrings, its parameters, its stored cells.

    A cell's meaning is its parameters, so each attack's stored cells form one table with
    a column per parameter of the key, under the table that explains the parameters.
    """
    from bench.core.matrix import Cell
    from bench.registry import ATTACKS

    stored: dict[str, dict[str, dict]] = defaultdict(dict)
    for attacked, group in [*data.cells.items(), *data.incoming.items()]:
        for e in group:
            entry = stored[e.attack].setdefault(e.cell_key, {"cell": e, "checkpoints": set()})
            entry["checkpoints"].add(attacked)
    attacks = []
    for name in sorted(set(ATTACKS.names()) | set(stored)):
        entry = ATTACKS.get(name) if name in ATTACKS else None
        docs = field_docs(entry.config) if entry else {}
        module = sys.modules.get(entry.fn.__module__) if entry else None
        fields = []
        if entry:
            for f in dataclasses.fields(entry.config):
                default = f.default if f.default is not dataclasses.MISSING else (
                    "(computed)" if f.default_factory is not dataclasses.MISSING else "(required)")
                fields.append({"name": f.name, "type": str(f.type),
                               "default": "unset" if default is None else _num(default),
                               "doc": _runs(" ".join(docs.get(f.name, "").split())),
                               "in_key": f.metadata.get("key", True)})
        cells = sorted(stored[name].values(), key=lambda info: _cell_order(info["cell"]))
        parsed = [dict(_parse_key(info["cell"].cell_key)[1]) for info in cells]
        columns = list(dict.fromkeys([*(f["name"] for f in fields if f["in_key"]), *(k for p in parsed for k in p)]))
        columns = [c for c in columns if any(c in p for p in parsed)]
        if any("subset" in p for p in parsed) and not any(f["name"] == "subset" for f in fields):
            fields.append({"name": "subset", "type": "int", "default": "0", "in_key": True,
                           "doc": _runs(field_docs(Cell).get("subset", "") + " Set by the matrix, for any attack.")})
        attacks.append({
            "name": name, "registered": entry is not None,
            "module_doc": _prose(module.__doc__ if module and module.__doc__ else ""),
            "doc": _prose(entry.doc) if entry else [], "fields": fields, "columns": columns,
            "cells": [{"key": info["cell"].cell_key, "anchor": cell_anchor(info["cell"].cell_key),
                       "label": cell_label(name, info["cell"].params), "threat": info["cell"].threat,
                       "n": info["cell"].n, "checkpoints": len(info["checkpoints"]),
                       "params": [p.get(c, "") for c in columns]} for info, p in zip(cells, parsed)]})
    return attacks


def _cell_order(e: _Cell) -> tuple:
    """Cells in reading order: by threat, attack, loss, restarts, steps, eps."""
    p = e.params

    def number(k, default=0.0):
        v = p.get(k, default)
        return v if isinstance(v, (int, float)) else default

    return (e.threat, e.attack, str(p.get("loss", "")), number("restarts", 1), number("steps"), number("eps"),
            e.cell_key)


# --- rendering and publishing ------------------------------------------------------------
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("bench", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _render(data: _Data, out: Path) -> None:
    env = _env()
    from bench.science.flags import FLAG_TEXT

    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    common = {"built": built, "version": _version()}
    by_id = {ck.id: ck for ck in data.checkpoints}
    boards = _boards(data)
    (out / MARKER).write_text("written by `bench site`; this folder is replaced on every build\n")
    shutil.copyfile(Path(__file__).resolve().parents[1] / "templates" / "site.css", out / "site.css")
    _write(out / "index.html", env.get_template("index.html").render(
        root="", title="Leaderboard", boards=boards, checkpoints=len(data.checkpoints),
        flag_text=sorted(FLAG_TEXT.items()), columns=_column_help(), **common))
    _write(out / "transfer.html", env.get_template("transfer.html").render(
        root="", title="Transfer", grids=_transfer_grids(data), **common))
    _write(out / "attacks.html", env.get_template("attacks.html").render(
        root="", title="Attacks", attacks=_attacks(data), columns=_column_help(), **common))
    _render_compare(data, out, env, common)
    page = env.get_template("checkpoint.html")
    presets = _preset_text()
    (out / "ck").mkdir()
    for ck in data.checkpoints:
        _write(out / page_path(ck), page.render(**_checkpoint_page(ck, data, by_id, "../", presets), **common))


def _render_compare(data: _Data, out: Path, env, common: dict) -> None:
    """compare-<dataset>.html for every dataset with a checkpoint (bench.reporting.site_diagnostics)."""
    from bench.reporting.site_diagnostics import compare_page, compare_path

    template = env.get_template("compare.html")
    for dataset in dict.fromkeys(ck.dataset for ck in data.checkpoints):
        cks = [ck for ck in data.checkpoints if ck.dataset == dataset]
        _write(out / compare_path(dataset), template.render(
            root="", title=f"Why it is robust: {dataset}",
            **compare_page(dataset, cks, data.diagnostics, data.cells, "", page_path), **common))


def _column_help() -> list[tuple[str, str]]:
    return [
        ("Clean", "accuracy on the unperturbed test set, measured when the checkpoint was stored"),
        ("FGSM", "one signed-gradient step of the full budget (label fgsm)"),
        ("PGD-20", "20 steps of PGD in the board's norm on cross-entropy, one random start (label pgd20)"),
        ("PGD longest", "the single-start cross-entropy PGD cell with the most steps (label pgdN)"),
        ("CW-20", "20 steps of PGD on the Carlini-Wagner margin (label cw20)"),
        ("SPSA", "the gradient-free SPSA attack, on the fixed subset of test images it ran on"),
        ("AutoAttack", "the AutoAttack ensemble"),
        ("Worst case", "a sample counts as robust only if every cell of the threat model failed on it, "
                       "transfer cells included: the per-sample AND over all cells"),
    ]


def _version() -> str:
    from bench.run.driver import package_version

    return package_version()


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} is a file, not a folder; pass --out DIR")
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        raise BenchError(f"refusing to replace {str(out)!r}: it is not empty and was not written by "
                         f"`bench site` (no {MARKER} file); pass --out with a new or empty folder")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished site into place; the old one is removed only after the swap."""
    try:
        if out.exists():
            _check_target(out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "site")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        os.chmod(out, 0o755)  # mkdtemp makes 0700 folders; a static server needs to read it
    except OSError as exc:
        raise BenchError(f"cannot move the site into {str(out)!r} ({exc.strerror}); "
                         "pass --out DIR with a folder you can write") from exc


# --- plots -------------------------------------------------------------------------------
# Hand-written SVG rather than matplotlib. The spec asks for matplotlib, but a site of
# 1,000 checkpoints has 4,000 plots and a 10 s budget. `python benchmarks/site_render.py
# --compare-matplotlib` draws the same plots both ways: matplotlib (Agg, one reused
# figure, only savefig timed) took 70-100 ms of CPU a plot on the 2-core dev machine,
# about 300 s for the site; these functions take about 0.2 ms, under a second. The plots
# are simple (lines with markers, two overlaid histograms), so a hundred lines of SVG do
# what matplotlib would, inline in the page, with hover titles on every point.
W, H = 360, 230
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40
COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"]
_esc = html.escape


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _frame(xlabel: str, ylabel: str, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]]) -> list[str]:
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="#fff" stroke="#999"/>']
    last = -1e9
    for px, text in xticks:
        out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y0 + 4}" stroke="#999"/>')
        if px - last >= 26:  # leave out labels that would overlap the previous one
            out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{_esc(text)}</text>')
            last = px
    for py, text in yticks:
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 5}" y="{py + 4:.1f}" text-anchor="end">{_esc(text)}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{H - 6}" text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(f'<text transform="translate(12 {(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{_esc(ylabel)}</text>')
    return out


def _legend(out: list[str], names: list[str]) -> None:
    for i, name in enumerate(names):
        y = TOP + 14 + 14 * i
        color = COLORS[i % len(COLORS)]
        out.append(f'<line x1="{W - RIGHT - 128}" y1="{y - 4}" x2="{W - RIGHT - 112}" y2="{y - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT - 108}" y="{y}">{_esc(name)}</text>')


def svg_lines(series: list[tuple[str, list[tuple[float, float]]]], *, xlabel: str, ylabel: str,
              logx: bool = False, mark: float | None = None) -> str:
    """Lines with markers; y is an accuracy in [0, 1] drawn as a percentage."""
    xs = [x for _, pts in series for x, _ in pts]
    if logx:
        xs = [x for x in xs if x > 0]
    f = math.log10 if logx else float
    lo, hi = f(min(xs)), f(max(xs))
    if mark is not None and not logx:
        lo, hi = min(lo, mark), max(hi, mark)
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP

    def px(x):
        return x0 + (f(x) - lo) / (hi - lo) * (x1 - x0)

    def py(y):
        return y0 - y * (y0 - y1)

    distinct = sorted(set(xs))
    values = distinct if len(distinct) <= 8 else (
        [10 ** k for k in range(math.ceil(lo), math.floor(hi) + 1)] if logx else _ticks(lo, hi))
    out = _frame(xlabel, ylabel, [(px(v), f"{v:g}") for v in values],
                 [(py(v / 100), f"{v:g}") for v in (0, 25, 50, 75, 100)])
    if mark is not None:
        out.append(f'<line x1="{px(mark):.1f}" y1="{y0}" x2="{px(mark):.1f}" y2="{y1}" stroke="#666" '
                   'stroke-dasharray="4 3"/>')
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [(x, y) for x, y in pts if x > 0 or not logx]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                       f'<title>{_esc(name)}: {x:g} → {100 * y:.2f}%</title></circle>')
    _legend(out, [name for name, _ in series])
    out.append("</svg>")
    return "\n".join(out)


def svg_hist(edges: list[float], series: list[tuple[str, list[int]]], *, xlabel: str, ylabel: str) -> str:
    """Step histograms over shared bin edges, drawn over each other."""
    lo, hi = edges[0], edges[-1]
    top = max([max(counts) for _, counts in series if counts] + [1])
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP

    def px(x):
        return x0 + (x - lo) / ((hi - lo) or 1) * (x1 - x0)

    def py(y):
        return y0 - y / top * (y0 - y1)

    yticks = [v for v in _ticks(0, top, 4) if v <= top]
    out = _frame(xlabel, ylabel, [(px(v), f"{v:g}") for v in _ticks(lo, hi) if lo <= v <= hi],
                 [(py(v), f"{v:g}") for v in yticks])
    for i, (name, counts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [f"{px(lo):.1f},{py(0):.1f}"]
        for left, right, c in zip(edges, edges[1:], counts):
            pts.append(f"{px(left):.1f},{py(c):.1f} {px(right):.1f},{py(c):.1f}")
        pts.append(f"{px(hi):.1f},{py(0):.1f}")
        out.append(f'<polygon points="{" ".join(pts)}" fill="{color}" fill-opacity="0.18" stroke="{color}" '
                   f'stroke-width="1.5"><title>{_esc(name)}</title></polygon>')
    _legend(out, [name for name, _ in series])
    out.append("</svg>")
    return "\n".join(out)
