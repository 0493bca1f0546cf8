"""transfer.html: source-by-target grids, laid out like Summers & Dinneen's Table 2."""

from __future__ import annotations

import math

from bench.reporting.format import pct
from bench.reporting.site.load import SiteData
from bench.reporting.site.names import (
    breakable,
    cell_anchor,
    cell_label,
    checkpoint_name,
    page_path,
)


def transfer_grids(data: SiteData) -> list[dict]:
    """Per dataset and crafting cell: rows are targets, columns sources (Summers & Dinneen Table 2).
    Each grid is titled by its dataset and its cell's label (`digits · cw20`)."""
    by_id = {ck.id: ck for ck in data.checkpoints}

    def name(ck):
        return checkpoint_name(ck, data.overrides)

    import pandas as pd  # only the site's tables use pandas (see load.py)

    frame = pd.DataFrame(
        [
            {
                "source": t.source_id,
                "target": t.checkpoint_id,
                "cell_key": t.cell_key,
                "label": cell_label(t.attack, t.params),
                "robust_acc": t.robust_acc,
                "n": t.n,
            }
            for ts in data.incoming.values()
            for t in ts
        ],
        columns=["source", "target", "cell_key", "label", "robust_acc", "n"],
    )
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
                cells.append(
                    {
                        "text": pct(v),
                        "value": "" if v is None else repr(v),
                        "style": _heat(v),
                        "diagonal": s == t,
                        "title": f"{name(ck)} attacked with examples crafted on {name(by_id[s])}",
                    }
                )
            others = [grid.at[t, s] for s in sources if s != t and not math.isnan(grid.at[t, s])]
            rows.append(
                {
                    "name": name(ck),
                    "short": ck.key[:8],
                    "href": page_path(ck),
                    "cells": cells,
                    "min": pct(min(others) if others else None),
                }
            )
        label = group["label"].iloc[0]
        grids.append(
            {
                "dataset": dataset,
                "cell_key": breakable(cell_key),
                "anchor": cell_anchor(cell_key),
                "label": label,
                "title": f"{dataset} · {label}",
                "n": int(group["n"].max()),
                "sources": [
                    {"name": name(by_id[s]), "short": by_id[s].key[:8], "href": page_path(by_id[s])} for s in sources
                ],
                "rows": rows,
            }
        )
    return grids


def _heat(value: float | None) -> str:
    """Background and text colour for an accuracy: pale (0%) to deep blue (100%)."""
    if value is None:
        return ""
    lo, hi = (247, 251, 255), (8, 69, 148)
    r, g, b = (round(a + (c - a) * value) for a, c in zip(lo, hi, strict=True))
    return f"background:#{r:02x}{g:02x}{b:02x};color:{'#fff' if value > 0.55 else '#111'}"
