"""ck/<key>.html: one page per checkpoint with its config, provenance, every cell and
what it cost, its flags explained, and small plots drawn as inline SVG (four here, and
the budget view of budget_view.py)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from markupsafe import Markup

from bench.core.kinds import Role
from bench.core.presets import all_presets
from bench.errors import BenchError
from bench.reporting.format import duration, exact, missing, num, passes, pct
from bench.reporting.site.budget_view import budget_plot
from bench.reporting.site.diagnostics import checkpoint_section
from bench.reporting.site.load import SiteData, cell_order
from bench.reporting.site.names import (
    SURROGATE_TEXT,
    breakable,
    cell_anchor,
    cell_label,
    checkpoint_folder,
    checkpoint_name,
    many_classes,
    page_path,
)
from bench.reporting.site.records import (
    admission_rows,
    flag_number,
    outside_line,
    portable,
)
from bench.reporting.site.svg import svg_hist, svg_lines
from bench.science.flags import FLAG_TEXT
from bench.science.white_box import is_pgd, role_of
from bench.store.db import Checkpoint
from bench.store.rows import CellRow

# Labels presets use for the paper's numbers that are not `cell_label`'s own spelling.
PAPER_ALIASES = {"restarts10": "pgd20_r10"}


def checkpoint_page(
    ck: Checkpoint, data: SiteData, by_id: dict[int, Checkpoint], root: str, presets: dict[str, tuple[str, str]]
) -> dict:
    """The template context of one checkpoint's page."""
    meta = ck.meta or {}
    description, source = presets.get(ck.preset or "", ("", ""))
    cells = sorted(data.cells[ck.id], key=lambda e: (e.threat != ck.threat, *cell_order(e)))
    shown = {
        "key",
        "defense",
        "config",
        "train",
        "dataset",
        "arch",
        "seed",
        "epochs",
        "train_seconds",
        "device",
        "preset",
        "paper",
        "paper_threat",
        "clean_acc",
        "logit_stats",
        "package_version",
        "git_commit",
        "torch_version",
        "sha256",
        "preset_description",
        "preset_source",
        "train_losses",
        "admission",
        "outside",
        "surrogate",
    }  # the last three have lines of their own
    provenance = [
        ("checkpoint key", ck.key),
        ("weights sha256", ck.sha256),
        ("dataset", ck.dataset),
        ("threat model", ck.threat),
        ("architecture", ck.arch),
        ("seed", str(ck.seed)),
        ("epochs", str(ck.epochs)),
        ("training time", duration(ck.train_seconds)),
        ("device", ck.device),
        ("bench version", str(meta.get("package_version", ""))),
        ("torch version", str(meta.get("torch_version", ""))),
        ("git commit", str(meta.get("git_commit") or "unknown")),
        ("stored at", ck.created_at),
        ("checkpoint folder", checkpoint_folder(ck)),
    ]
    losses = meta.get("train_losses")
    if isinstance(losses, list) and losses and isinstance(losses[-1], (int, float)):
        provenance.append(("final training loss", num(float(losses[-1]))))
    # Whatever else the sidecar holds, so provenance added later shows without a code change.
    provenance += [(k, _clip(exact(portable(k, v)))) for k, v in sorted(meta.items()) if k not in shown]

    # Ours beside each paper number: the strongest cell of its label at the radius the paper
    # measured (the checkpoint's own unless the preset named another), top-5 as `_top5`.
    paper_threat = meta.get("paper_threat") or ck.threat
    labels: dict[str, float] = {}
    for e in cells:
        if e.threat == paper_threat:
            label = cell_label(e.attack, e.params)
            labels[label] = min(labels.get(label, 1.0), e.robust_acc)
            if e.top5_acc is not None:
                labels[f"{label}_top5"] = min(labels.get(f"{label}_top5", 1.0), e.top5_acc)
    paper = [
        {
            "label": k,
            "paper": pct(v),
            "ours": pct(meta.get("clean_acc") if k == "clean" else labels.get(PAPER_ALIASES.get(k, k))),
        }
        for k, v in (meta.get("paper") or {}).items()
    ]

    def transfer_row(t: CellRow, other: int) -> dict:
        o = by_id.get(other)
        return {
            "name": checkpoint_name(o, data.overrides) if o else f"checkpoint {other}",
            "short": o.key[:8] if o else "",
            "href": f"{root}{page_path(o)}" if o else "",
            "cell_key": breakable(t.cell_key),
            "anchor": cell_anchor(t.cell_key),
            "robust": pct(t.robust_acc),
            "n": t.n,
            # What crafting the examples cost on the source, per image.
            "forward": _passes(t.forward_passes),
            "backward": _passes(t.backward_passes),
        }

    plots = _plots(ck, cells)
    name = checkpoint_name(ck, data.overrides)
    ev = data.evidence[ck.id]
    # Only the sources of transfers onto this checkpoint are named: not every checkpoint for every page.
    sources = {t.source_id: by_id[t.source_id] for t in data.incoming[ck.id] if t.source_id in by_id}
    plots["list"].append(budget_plot(ev, {i: checkpoint_name(o, data.overrides) for i, o in sources.items()}))
    wc = ev.own
    b = ev.bracket if wc else None
    return {
        "worst": {
            "robust": pct(wc.robust_acc),
            "top5": pct(wc.top5_acc) if many_classes(ck.dataset) and wc.top5_acc is not None else "",
            "low": pct(wc.interval[0]),
            "high": pct(wc.interval[1]),
            "n": wc.n,
            "cells": len(wc.cells),
            "complete": wc.complete,
            "missing": list(wc.missing),
            "forward": _passes(wc.forward_passes),
            "backward": _passes(wc.backward_passes),
            "counted": wc.forward_passes is not None,
        }
        if wc
        else None,
        "bracket": {
            "certified": pct(b.certified),
            "exact": pct(b.exact) if b.exact is not None else "",
            "withheld": b.withheld or "",
            "unsound": b.unsound,
            "unknown": b.unknown,
            "unknown_indices": list(b.unknown_indices),
            "gap": f"{b.gap:.1f}" if b.gap is not None else "",
            "missed": b.attacks_missed,
            "missed_indices": list(b.missed_indices),
        }
        if b
        else None,
        "not_verifiable": ev.not_verifiable or "",
        "no_cells": not data.cells[ck.id] and not data.incoming[ck.id],
        "root": root,
        "title": f"{name} [{ck.key[:8]}]",
        "ck": ck,
        "name": name,
        "outside": outside_line(meta.get("outside")),
        "surrogate": SURROGATE_TEXT if meta.get("surrogate") else "",
        "clean": pct(meta.get("clean_acc")),
        "description": meta.get("preset_description") or description,
        "source": meta.get("preset_source") or source,
        "provenance": provenance,
        "admission": admission_rows(ck.admission) if ck.admission else [],
        "config": [(k, exact(portable(k, v))) for k, v in sorted((ck.config or {}).items())],
        "train_config": [(k, exact(v)) for k, v in sorted((ck.train_config or {}).items())],
        "paper": paper,
        "paper_threat": paper_threat,
        "cells": [
            {
                "key": breakable(e.cell_key),
                "anchor": cell_anchor(e.cell_key),
                "attack": e.attack,
                "threat": e.threat,
                "clean": pct(e.clean_acc),
                "robust": pct(e.robust_acc),
                "n": e.n,
                "subset": e.indices is not None,
                "seconds": f"{e.seconds:.2f}",
                "forward": _passes(e.forward_passes),
                "backward": _passes(e.backward_passes),
                "device": e.device,
                "warnings": "; ".join(e.warnings),
            }
            for e in cells
        ],
        "incoming": [transfer_row(t, t.source_id) for t in data.incoming[ck.id]],
        "outgoing": [transfer_row(t, t.checkpoint_id) for t in data.outgoing[ck.id]],
        "flags": [
            {
                "name": f.name,
                "message": f.message or FLAG_TEXT.get(f.name, ""),
                "numbers": [(k, flag_number(k, v, by_id, data.overrides)) for k, v in (f.numbers or {}).items()],
            }
            for f in data.flags[ck.id]
        ],
        "logit_stats": plots["logit_stats"],
        "plots": plots["list"],
        "diagnostics": _diagnostics(ck, data, root),
    }


def _diagnostics(ck: Checkpoint, data: SiteData, root: str) -> dict | None:
    """The page's diagnostics block, drawn against natural training on the same dataset."""
    natural = next(
        (
            data.diagnostics[c.id]
            for c in data.checkpoints
            if c.dataset == ck.dataset and c.defense == "natural" and c.id in data.diagnostics
        ),
        None,
    )
    return checkpoint_section(ck, data.diagnostics.get(ck.id), natural, data.cells[ck.id], root)


def _histogram(hist: Any) -> bool:
    """Whether a stored logit histogram has the shape the plot needs."""
    return (
        isinstance(hist, dict)
        and isinstance(hist.get("edges"), list)
        and len(hist["edges"]) > 1
        and all(isinstance(hist.get(k), list) and len(hist[k]) == len(hist["edges"]) - 1 for k in ("clean", "adv"))
    )


def preset_text() -> dict[str, tuple[str, str]]:
    """(description, source) of every preset the package ships, by name.

    The sidecar records a preset's name and paper numbers, not its prose, so the prose
    comes from the preset files; a sidecar that does record `preset_description` wins.
    A broken preset file costs its description here, not the whole site.
    """
    try:
        return {name: (p.description, p.source) for name, p in all_presets().items()}
    except BenchError:
        return {}


def _plots(ck: Checkpoint, cells: list[CellRow]) -> dict:
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
        if is_pgd(e) and e.params.get("restarts", 1) == 1 and number(steps) and steps > 0:
            name = f"{e.params.get('loss')} {e.threat}"
            series[name][steps] = min(series[name].get(steps, 1.0), e.robust_acc)
    lines = [(n, sorted(s.items())) for n, s in sorted(series.items())]
    add(
        "pgd-steps",
        "Robust accuracy against PGD steps",
        "Single-start PGD; a line still falling at the right means the shorter runs had not converged.",
        svg_lines(lines, xlabel="PGD steps", ylabel="robust accuracy (%)", logx=True) if lines else "",
        "No PGD cells stored (the full matrix runs PGD-5 to PGD-1000).",
    )

    # Accuracy against epsilon, through the unbounded sweep.
    # Each budget is its own threat model (unbounded-<eps>), so group by loss instead.
    sweep: dict[str, dict] = defaultdict(dict)
    for e in own:
        if role_of(e) is Role.SWEEP and number(e.params.get("eps")):
            name, eps = f"{e.params.get('loss', 'xent')} PGD", e.params["eps"]
            sweep[name][eps] = min(sweep[name].get(eps, 1.0), e.robust_acc)
    lines = [(t, sorted(s.items())) for t, s in sorted(sweep.items())]
    budget = next((e.params["eps"] for e in own if e.threat == ck.threat and number(e.params.get("eps"))), None)
    add(
        "eps-sweep",
        "Accuracy against epsilon (unbounded sweep)",
        "PGD with a growing budget must reach 0% accuracy; a plateau above zero is a sign of gradient masking."
        + (f" The dashed line is the threat model's eps = {budget:g}." if budget is not None else ""),
        svg_lines(lines, xlabel="epsilon", ylabel="accuracy (%)", mark=budget) if lines else "",
        "No unbounded sweep stored.",
    )

    # Accuracy against restarts: one line per loss, steps and threat with several restart counts.
    by_restarts = defaultdict(dict)
    for e in own:
        r = e.params.get("restarts", 1)
        if is_pgd(e) and number(r):
            name = f"{e.params.get('loss')}-{e.params.get('steps')} {e.threat}"
            by_restarts[name][r] = min(by_restarts[name].get(r, 1.0), e.robust_acc)
    lines = [(n, sorted(s.items())) for n, s in sorted(by_restarts.items()) if len(s) > 1]
    add(
        "restarts",
        "Accuracy against random restarts",
        "More restarts lowering accuracy by more than a point means single-start PGD misses the worst case.",
        svg_lines(lines, xlabel="restarts", ylabel="robust accuracy (%)") if lines else "",
        "No PGD setting is stored with more than one restart count.",
    )

    # Logit distribution on clean and adversarial data, from the strongest cell that kept it.
    ranked = sorted(
        (e for e in own if e.threat == ck.threat),
        key=lambda e: (e.robust_acc, -(e.params.get("steps") if number(e.params.get("steps")) else 0), e.cell_key),
    )
    strongest = next((e for e in ranked if _histogram(e.extra.get("logit_hist"))), None)
    hist = strongest.extra["logit_hist"] if strongest else None
    add(
        "logits",
        "Distribution of logits, clean and adversarial",
        f"All logits of the test set, clean and under the strongest stored attack ({strongest.cell_key})."
        if strongest
        else "",
        svg_hist(
            hist["edges"],
            [("clean", hist["clean"]), ("adversarial", hist["adv"])],
            xlabel="logit value",
            ylabel="count",
        )
        if hist
        else "",
        "No cell stored a logit histogram.",
    )

    clean_stats = (ck.meta or {}).get("logit_stats") or {}
    adv_stats = (strongest.extra.get("adv_logit_stats") or {}) if strongest else {}
    stats = [
        (k, num(clean_stats.get(k)) if k in clean_stats else "", num(adv_stats.get(k)) if k in adv_stats else "")
        for k in dict.fromkeys([*clean_stats, *adv_stats])
    ]
    return {"list": listing, "logit_stats": stats}


def _passes(value: float | None) -> dict:
    """Passes per image as a table shows them: short, with the figure in full on hover."""
    return {"text": passes(value), "title": "" if missing(value) else f"{value:,.2f} per image"}


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
