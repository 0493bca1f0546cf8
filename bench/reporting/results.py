"""Result rows from the store: one per stored cell, plus a `worst_case` row per checkpoint
and threat model shown (the dataset's L2 ball, each other L-inf radius a run chose with
`--eps` or its matrix, then the checkpoint's own, which stays last), all read from the
checkpoint's evidence (bench.store.evidence).

A worst case row says whether it covers every cell the checkpoint's matrices asked for
(`complete`) and which are `missing` (failed or never run). Beside the worst case (an
upper bound) the own row carries its bracket: the certified floor, the exact figure
where the verifier decided every image, the images still unknown, the gap and the
images the attacks missed. A complete verifier's row carries its `verdicts`: how many
images it proved robust, broke and left unknown, and which (its robust accuracy is the
proven share: an unknown image is not robust).

This is what `bench results` prints, `bench run` shows and `bench.evaluate` returns.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from bench.core.data import DATASETS
from bench.reporting.site.names import cell_label
from bench.store.bracket import Bracket
from bench.store.db import Checkpoint, Flag, Store
from bench.store.evidence import Evidence, WorstCase, load_evidence
from bench.store.rows import CellRow

COLUMNS = [
    "defense",
    "preset",
    "dataset",
    "checkpoint",
    "attack",
    "threat",
    "clean_acc",
    "robust_acc",
    "ci_low",
    "ci_high",
    "n",
    "seconds",
    "forward_passes",
    "backward_passes",
    "robust_top5",
]
"""The CSV's columns; `ci_low` and `ci_high` bound the robust accuracy's 95% exact binomial
interval on the n images it was measured on; `forward_passes` and `backward_passes` are the
model's passes per image the cell cost (a worst case: its cells' together, per test image),
empty where they were not counted; `robust_top5` the share whose label stayed among the
five largest logits (Kannan et al.'s top-5), empty where not kept."""
BRACKET = ["certified", "exact", "unknown", "gap", "attacks_missed", "withheld"]
"""The worst case row's bracket fields (None where no verifier cell ran; `withheld` says
why certified, exact and gap are None where a verifier cell did run)."""
WORST_CASE = "worst_case"
"""The `attack` of a checkpoint's worst case row."""


def bracket_fields(ev: Evidence, threat: str | None = None) -> dict:
    """The bracket of a worst case row at `threat` (the checkpoint's own, unset):
    `certified` (the floor), `exact` (where every image was decided), `unknown` (images in
    doubt; `unknown_images` lists them), `gap` (worst case minus floor, in points),
    `attacks_missed`, `withheld` ("unsound" where a verifier and an attack or another
    verifier contradict each other: then no certified, exact or gap figure); None where
    no verifier cell ran, and `not_verifiable` saying why where the verifier does not
    take the model."""
    b: Bracket | None = ev.bracket_of(threat)
    out = {k: getattr(b, k) if b is not None else None for k in BRACKET}
    if b is not None and b.verified:
        out["unknown_images"] = list(b.unknown_indices)
    if ev.not_verifiable:
        out["not_verifiable"] = ev.not_verifiable
    return out


def _cell_row(base: dict, c: CellRow, defense_of: dict[int, str]) -> dict:
    low, high = c.interval()
    row = {
        **base,
        "attack": c.cell_key,
        "threat": c.threat,
        "clean_acc": c.clean_acc,
        "robust_acc": c.robust_acc,
        "ci_low": low,
        "ci_high": high,
        "n": c.n,
        "seconds": round(c.seconds, 3),
        "forward_passes": c.forward_passes,
        "backward_passes": c.backward_passes,
        "kind": c.kind,
        "label": cell_label(c.attack, c.params),
        "params": c.params,
        "robust_top5": c.top5_acc,
    }
    verdicts = c.verdicts()
    if verdicts is not None:  # a complete verifier: its counts, and each image's verdict by index
        row["verdicts"] = {**verdicts.counts(), "images": {k: list(v) for k, v in dataclasses.asdict(verdicts).items()}}
    if c.source_id is not None:  # a transfer: named by its source as well as its key
        row.update(
            attack=f"transfer[{c.source_id}]:{c.cell_key}",
            cell=c.cell_key,
            source_id=c.source_id,
            source=defense_of.get(c.source_id),
        )
    return row


def _worst_row(base: dict, ev: Evidence, wc: WorstCase) -> dict:
    low, high = wc.interval
    return {
        **base,
        "attack": WORST_CASE,
        "threat": wc.threat,
        "clean_acc": ev.meta.clean_acc,
        "robust_acc": wc.robust_acc,
        "ci_low": low,
        "ci_high": high,
        "n": wc.n,
        "seconds": None,
        "forward_passes": wc.forward_passes,
        "backward_passes": wc.backward_passes,
        "kind": WORST_CASE,
        "robust_top5": wc.top5_acc,
        "cells": len(wc.cells),
        "complete": wc.complete,
        "missing": list(wc.missing),
    }


def result_rows(
    store: Store, defense: str | None = None, dataset: str | None = None, checkpoint_keys: set[str] | None = None
) -> list[dict]:
    cks = [
        c
        for c in store.checkpoints(dataset=dataset, defense=defense)
        if checkpoint_keys is None or c.key in checkpoint_keys
    ]
    if not cks:
        return []
    evidence = load_evidence(store, cks)
    flags: dict[int, list[Flag]] = defaultdict(list)
    for f in store.flags([c.id for c in cks]):
        flags[f.checkpoint_id].append(f)
    defense_of = {c.id: c.defense for c in store.checkpoints()}
    rows = []
    for ck in cks:
        ev = evidence[ck.id]
        base = {"defense": ck.defense, "preset": ck.preset, "dataset": ck.dataset, "checkpoint": ck.key}
        rows += [_cell_row(base, c, defense_of) for c in (*ev.cells, *ev.transfers)]
        # The L2 worst case first, then each other L-inf radius a run chose, each with its
        # bracket and flags; the checkpoint's own threat model's row stays last.
        l2 = l2_threat(ck)
        wc = ev.worst_case(l2) if l2 and l2 != ck.threat else None
        if wc:
            rows.append(_worst_row(base, ev, wc))
        for threat in [*ev.radii[1:], ck.threat]:
            wc = ev.worst_case(threat)
            if wc:
                raised = sorted(f.name for f in flags[ck.id] if f.threat(ck.threat) == threat)
                rows.append({**_worst_row(base, ev, wc), "flags": raised, **bracket_fields(ev, threat)})
    return rows


def l2_threat(ck: Checkpoint) -> str | None:
    """The dataset's L2 threat model (`l2-1` on digits), whose cells (L2 PGD, AutoAttack's
    L2 version) make a worst case of their own beside the L-inf one."""
    spec = DATASETS.get(ck.dataset)
    return f"l2-{spec.threat.l2_eps:g}" if spec is not None else None
