"""The site's view of the stored diagnostics (bench.science.diagnostics): why a defense works.

- On each checkpoint's page: the Table 1 row of Shafahi et al. (medians of the logit
  gap, gradient gap, εL and gradient coherence; predicted accuracy at the threat eps
  beside the measured FGSM and PGD accuracies), histograms of the logit gap, gradient
  gap, εL and coherence against natural training on the same dataset (their Fig. 1),
  and the cross-entropy landscape around the first eight test images (their Fig. 9).
- compare-<dataset>.html: every checkpoint of the dataset side by side on the same
  quantities, and the clean-logit histograms of natural training and of every
  checkpoint trained against an adversary, labelled by the adversary's strength
  (their Fig. 2: logits squashed more under stronger training adversaries).

Plots are hand-written SVG from bench.reporting.site.svg (see the note there on why not matplotlib).
"""

from __future__ import annotations

import numpy as np
from markupsafe import Markup

from bench.core.data import DATASETS
from bench.reporting.diagnosis import measured
from bench.reporting.format import fmt, pct
from bench.reporting.site.names import compare_path, page_path
from bench.reporting.site.svg import heatmap_png, svg_hist
from bench.science.diagnostics import stored_eps_l

# Quantities of the Table 1 row: (summary key, header, format).
QUANTITIES = [
    ("logit_gap", "logit gap", ".3g"),
    ("grad_gap", "gradient gap", ".3g"),
    ("eps_l", "εL", ".3g"),
    ("coherence", "coherence", ".2f"),
    ("grad_norm_true", "‖∇z_y‖₁", ".3g"),
    ("grad_norm_adv", "‖∇z_ȳ‖₁", ".3g"),
]

HIST_BINS = 30
HEAT_CELL = 5
"""Pixels per landscape grid point."""


def _values(diag, name: str) -> np.ndarray:
    if name == "eps_l":
        v = stored_eps_l(diag.samples)
    else:
        v = np.array([np.nan if x is None else x for x in diag.samples[name]], dtype=np.float64)
    return v[np.isfinite(v)]


def table_row(ck, diag, cells: list, href: str) -> dict:
    """One checkpoint's Table 1 row as the templates print it, with the raw numbers in
    data-value attributes so a browser test can compare them with the store."""
    s = diag.summary
    m = measured(ck, cells, diag.eps)
    cols = [
        {
            "col": key,
            "value": repr(s[key]["median"]) if s[key]["median"] is not None else "",
            "text": fmt(s[key]["median"], spec),
        }
        for key, _, spec in QUANTITIES
    ]
    cols.append({"col": "logit_variance", "value": repr(s["logit_variance"]), "text": fmt(s["logit_variance"], ".3g")})
    for key, value in (
        ("clean", s["clean_acc"]),
        ("predicted", s["predicted_acc"]),
        ("fgsm", m["fgsm_acc"]),
        ("pgd", m["pgd_acc"]),
    ):
        cols.append({"col": key, "value": "" if value is None else repr(float(value)), "text": pct(value)})
    return {
        "key": ck.key,
        "short": ck.key[:8],
        "defense": ck.defense,
        "preset": ck.preset or "",
        "href": href,
        "eps": f"{diag.eps:g}",
        "n": diag.n,
        "cols": cols,
        "pgd_cell": m["pgd_cell"] or "",
    }


def _hist_svg(series: list[tuple[str, np.ndarray]], xlabel: str) -> str:
    """Overlaid histograms on shared bins spanning the 1st to 99th percentile of all the
    values (the rest fall into the end bins, so one outlier cannot squash the plot)."""
    pooled = np.concatenate([v for _, v in series if len(v)]) if any(len(v) for _, v in series) else np.array([])
    if not len(pooled):
        return ""
    lo, hi = np.quantile(pooled, [0.01, 0.99])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    counts = [(name, np.histogram(np.clip(v, lo, hi), edges)[0].tolist()) for name, v in series]
    return svg_hist([round(float(e), 6) for e in edges], counts, xlabel=xlabel, ylabel="test images")


def fig1_plots(ck, diag, natural, prefix: str = "diag") -> list[dict]:
    """Logit gap, gradient gap, εL and coherence: this checkpoint against natural training."""
    plots = []
    for key, title, xlabel in (
        ("logit_gap", "Logit gap z_y − z_ȳ", "logit gap"),
        ("grad_gap", "Gradient gap ‖∇z_y − ∇z_ȳ‖₁", "gradient gap"),
        ("eps_l", "εL = logit gap / gradient gap", "εL"),
        ("coherence", "Gradient coherence cos(∇z_y, ∇z_ȳ)", "cosine"),
    ):
        series = [(f"{ck.defense} [{ck.key[:6]}]", _values(diag, key))]
        if natural is not None and natural.checkpoint_id != diag.checkpoint_id:
            series.append(("natural", _values(natural, key)))
        plots.append(
            {"id": f"{prefix}-{key.replace('_', '-')}", "title": title, "svg": Markup(_hist_svg(series, xlabel))}
        )
    return plots


def landscapes(diag) -> dict:
    land = diag.landscape or {}
    grids = land.get("loss") or []
    flat = [v for g in grids for row in g for v in row if v is not None]
    if not flat:
        return {"images": [], "lo": "", "hi": "", "span": ""}
    lo, hi = min(flat), max(flat)
    images = []
    for i, g in enumerate(grids):
        centre = g[len(g) // 2][len(g) // 2]
        images.append(
            {
                "index": i,
                "centre": fmt(centre, ".3g"),
                "max": fmt(max(v for r in g for v in r if v is not None), ".3g"),
                "src": heatmap_png(g, lo, hi),
                "size": len(g) * HEAT_CELL,
                "points": len(g),
            }
        )
    values = land.get("values") or [0.0]
    return {"images": images, "lo": fmt(lo, ".3g"), "hi": fmt(hi, ".3g"), "span": fmt(values[-1], ".3g")}


def checkpoint_section(ck, diag, natural, cells: list, root: str) -> dict | None:
    """The diagnostics block of a checkpoint page, or None when none is stored."""
    if diag is None:
        return None
    row = table_row(ck, diag, cells, "")
    s = diag.summary
    stats = [
        (label, *(fmt(s[key][q], spec) for q in ("q25", "median", "q75", "mean"))) for key, label, spec in QUANTITIES
    ]
    return {
        "row": row,
        "stats": stats,
        "plots": fig1_plots(ck, diag, natural),
        "landscape": landscapes(diag),
        "compare_href": f"{root}{compare_path(ck.dataset)}",
        "natural": natural is not None and natural.checkpoint_id != diag.checkpoint_id,
    }


def _adversary(ck) -> tuple[float, str, str] | None:
    """(strength, short label, long label) of a checkpoint's training adversary, from its
    config: steps times step size is how far it can walk; None when it trains on none."""
    cfg = ck.config or {}
    steps = cfg.get("attack_steps")
    if not isinstance(steps, int) or cfg.get("clean_weight", 0.0) == 1.0:
        return None
    threat = DATASETS[ck.dataset].threat if ck.dataset in DATASETS else None
    step = cfg.get("attack_step_size") or (threat.step_size if threat else None)
    eps = cfg.get("attack_eps") or (threat.eps if threat else None)
    if step is None:
        return None
    return (
        steps * step,
        f"{ck.defense} PGD-{steps}×{step:g}",
        f"{ck.defense} [{ck.key[:6]}]: PGD-{steps}, step {step:g}, eps {eps:g}",
    )


def fig2_plot(cks, diags: dict) -> dict:
    """Clean logits of natural training and of every adversarially trained checkpoint."""
    series = []
    for ck in cks:
        d = diags.get(ck.id)
        if d is None or not d.samples.get("logits"):
            continue
        adv = _adversary(ck)
        if ck.defense == "natural" or adv is not None:
            values = np.array([v for row in d.samples["logits"] for v in row if v is not None], dtype=np.float64)
            name = f"natural [{ck.key[:6]}]"
            series.append((adv[0], adv[1], adv[2], values) if adv else (0.0, "natural", name, values))
    series.sort(key=lambda s: s[0])
    return {
        "svg": Markup(_hist_svg([(short, v) for _, short, _, v in series], "clean logit value")) if series else "",
        "labels": [label for _, _, label, _ in series],
    }


def compare_page(dataset: str, cks: list, diags: dict, cells: dict, root: str) -> dict:
    """The template context of compare-<dataset>.html."""
    rows = [table_row(ck, diags[ck.id], cells.get(ck.id, []), f"{root}{page_path(ck)}") for ck in cks if ck.id in diags]
    missing = [
        {"defense": ck.defense, "short": ck.key[:8], "href": f"{root}{page_path(ck)}"}
        for ck in cks
        if ck.id not in diags
    ]
    natural = next((diags[ck.id] for ck in cks if ck.defense == "natural" and ck.id in diags), None)
    # Fig. 1 for every checkpoint: its logit gap and gradient gap against natural training.
    figures = [
        {
            "key": ck.key,
            "short": ck.key[:8],
            "defense": ck.defense,
            "href": f"{root}{page_path(ck)}",
            "plots": fig1_plots(ck, diags[ck.id], natural, f"cmp-{ck.key[:8]}")[:2],
        }
        for ck in cks
        if ck.id in diags
    ]
    return {
        "dataset": dataset,
        "rows": rows,
        "missing": missing,
        "figures": figures,
        "fig2": fig2_plot(cks, diags),
        "eps": rows[0]["eps"] if rows else "",
        "has_natural": natural is not None,
    }
