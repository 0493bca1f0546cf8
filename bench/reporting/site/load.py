"""Reading the store into what the pages are computed from: one read per table, no ORM objects."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import TYPE_CHECKING

from bench.reporting.format import num
from bench.reporting.site.names import cell_label
from bench.science.white_box import is_pgd
from bench.store.db import Checkpoint, Store
from bench.store.evidence import Evidence
from bench.store.evidence import evidence as build_evidence
from bench.store.rows import CellRow

if TYPE_CHECKING:
    import pandas as pd


@dataclasses.dataclass
class SiteData:
    checkpoints: list[Checkpoint]
    cells: dict[int, list[CellRow]]
    incoming: dict[int, list[CellRow]]
    outgoing: dict[int, list[CellRow]]
    flags: dict[int, list]
    frame: pd.DataFrame
    """One row per stored evaluation: checkpoint_id, cell_key, attack, threat, label, ..."""
    diagnostics: dict = dataclasses.field(default_factory=dict)
    """bench.store.db.Diagnostic rows by checkpoint id."""
    evidence: dict[int, Evidence] = dataclasses.field(default_factory=dict)
    """Each checkpoint's evidence (bench.store.evidence), by id."""
    overrides: dict[int, str] = dataclasses.field(default_factory=dict)
    """Per checkpoint, the settings that tell it apart from others of its defense and
    preset (`beta=0.5, epochs=30`); absent where nothing needs telling apart."""


def load_data(store: Store) -> SiteData:
    """Everything the site shows, read from the store once."""
    cks = store.checkpoints()
    cells: dict[int, list[CellRow]] = defaultdict(list)
    for e in store.evaluations():
        cells[e.checkpoint_id].append(e)
    incoming: dict[int, list[CellRow]] = defaultdict(list)
    outgoing: dict[int, list[CellRow]] = defaultdict(list)
    for t in store.transfers():
        incoming[t.checkpoint_id].append(t)
        outgoing[t.source_id].append(t)
    flags: dict[int, list] = defaultdict(list)
    for f in store.flags():
        flags[f.checkpoint_id].append(f)
    rows = [
        (
            e.checkpoint_id,
            e.cell_key,
            e.attack,
            e.threat,
            cell_label(e.attack, e.params),
            pgd,
            e.params.get("steps") if pgd else None,
            e.params.get("loss") if pgd else None,
            e.params.get("restarts", 1) if pgd else None,
            e.robust_acc,
            e.n,
            e.indices is not None,
        )
        for group in cells.values()
        for e in group
        for pgd in (is_pgd(e),)
    ]
    # Imported here: pandas takes a quarter of a second to import, and only the site's
    # tables use it; `bench run` and `bench results` load this package without them.
    import pandas as pd

    frame = pd.DataFrame(
        rows,
        columns=[
            "checkpoint_id",
            "cell_key",
            "attack",
            "threat",
            "label",
            "pgd",
            "steps",
            "loss",
            "restarts",
            "robust_acc",
            "n",
            "subset",
        ],
    )
    frame = frame.astype(
        {"subset": bool, "pgd": bool, "robust_acc": float}
    )  # typed even when empty (a mask, not labels)
    diagnostics = {d.checkpoint_id: d for d in store.diagnostics()}
    defense_of = {c.id: c.defense for c in cks}
    evidence = {c.id: build_evidence(c, cells[c.id], incoming[c.id], defense_of) for c in cks}
    return SiteData(cks, cells, incoming, outgoing, flags, frame, diagnostics, evidence, override_labels(cks))


def override_labels(cks: list[Checkpoint]) -> dict[int, str]:
    """The config and training settings that differ within each group of checkpoints
    sharing dataset, defense and preset (two `--set` variants of one recipe), as text."""
    groups: dict[tuple, list[Checkpoint]] = defaultdict(list)
    for ck in cks:
        groups[(ck.dataset, ck.defense, ck.preset)].append(ck)
    out: dict[int, str] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        flat = {
            ck.id: {
                **{k: v for k, v in (ck.config or {}).items() if not isinstance(v, dict)},
                **(ck.train_config or {}),
            }
            for ck in members
        }
        keys = sorted({k for f in flat.values() for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
        for ck in members:
            text = ", ".join(f"{k}={num(flat[ck.id].get(k))}" for k in differ)
            if text:
                out[ck.id] = text
    return out


def cell_order(e: CellRow) -> tuple:
    """Cells in reading order: by threat, attack, loss, restarts, steps, eps."""
    p = e.params

    def number(k, default=0.0):
        v = p.get(k, default)
        return v if isinstance(v, (int, float)) else default

    return (
        e.threat,
        e.attack,
        str(p.get("loss", "")),
        number("restarts", 1),
        number("steps"),
        number("eps"),
        e.cell_key,
    )
