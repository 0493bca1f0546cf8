"""Result rows from the store: one per stored cell, plus a `worst_case` row per checkpoint,
which says whether it covers every cell the checkpoint's matrices asked for (`complete`)
and which are `missing` (failed or never run).

Beside the worst case (an upper bound) the row carries its bracket (bench.store.bracket):
the certified floor, the exact figure where the verifier decided every image, the
images still unknown, the gap and the images the attacks missed.

This is what `bench results` prints, `bench run` shows and `bench.evaluate` returns; the
site reads the store itself (bench.reporting.site.load), through the same worst_case.
"""
from __future__ import annotations

from collections import defaultdict

from bench.core.data import DATASETS
from bench.store.bracket import bracket
from bench.store.db import Checkpoint, Store, coverage, worst_case

COLUMNS = ["defense", "preset", "dataset", "checkpoint", "attack", "threat", "clean_acc",
           "robust_acc", "n", "seconds"]
BRACKET = ["certified", "exact", "unknown", "gap", "attacks_missed", "withheld"]
"""The worst case row's bracket fields (None where no verifier cell ran; `withheld` says
why certified, exact and gap are None where a verifier cell did run)."""


def bracket_fields(ck: Checkpoint, b: dict | None) -> dict:
    """The worst case row's bracket: `certified` (the floor), `exact` (where every image
    was decided), `unknown` (images in doubt), `gap` (worst case minus floor, in points),
    `attacks_missed`, `withheld` ("unsound" where a verifier and an attack or another
    verifier contradict each other: then no certified, exact or gap figure); None where
    no verifier cell ran, and `not_verifiable` saying why
    where the verifier does not take the model."""
    out = {k: (b or {}).get(k) for k in BRACKET}
    reason = (ck.meta or {}).get("not_verifiable")
    if reason:
        out["not_verifiable"] = reason
    return out


def result_rows(store: Store, defense: str | None = None, dataset: str | None = None,
                checkpoint_keys: set[str] | None = None) -> list[dict]:
    cks = [c for c in store.checkpoints(dataset=dataset, defense=defense)
           if checkpoint_keys is None or c.key in checkpoint_keys]
    if not cks:
        return []
    ids = [c.id for c in cks]
    by_ck: dict[int, list] = defaultdict(list)
    for e in store.evaluations(ids):
        by_ck[e.checkpoint_id].append(e)
    incoming: dict[int, list] = defaultdict(list)
    for t in store.transfers(ids):
        incoming[t.target_id].append(t)
    flags: dict[int, list[str]] = defaultdict(list)
    for f in store.flags(ids):
        flags[f.checkpoint_id].append(f.name)
    defense_of = {c.id: c.defense for c in store.checkpoints()}
    rows = []
    for ck in cks:
        base = {"defense": ck.defense, "preset": ck.preset, "dataset": ck.dataset, "checkpoint": ck.key}
        clean = ck.meta.get("clean_acc")
        for e in by_ck[ck.id]:
            rows.append({**base, "attack": e.cell_key, "threat": e.threat, "clean_acc": e.clean_acc,
                         "robust_acc": e.robust_acc, "n": e.n, "seconds": round(e.seconds, 3)})
        for t in incoming[ck.id]:
            rows.append({**base, "attack": f"transfer[{t.source_id}]:{t.cell_key}", "threat": t.threat,
                         "clean_acc": t.clean_acc, "robust_acc": t.robust_acc, "n": t.n,
                         "seconds": round(t.seconds, 3), "source": defense_of.get(t.source_id)})
        test_size = next((e.n for e in by_ck[ck.id] if e.indices is None), 0)
        # The L2 worst case first: the checkpoint's own threat model's row stays last.
        l2 = l2_threat(ck)
        wc = worst_case(ck, by_ck[ck.id], incoming[ck.id], test_size, l2) if test_size and l2 else None
        if wc:
            rows.append({**base, "attack": "worst_case", "threat": l2, "clean_acc": clean,
                         "robust_acc": wc["robust_acc"], "n": wc["n"], "seconds": None, "cells": wc["cells"],
                         **coverage(ck, by_ck[ck.id], incoming[ck.id], defense_of, l2)})
        wc = worst_case(ck, by_ck[ck.id], incoming[ck.id], test_size) if test_size else None
        if wc:
            rows.append({**base, "attack": "worst_case", "threat": ck.threat, "clean_acc": clean,
                         "robust_acc": wc["robust_acc"], "n": wc["n"], "seconds": None,
                         "cells": wc["cells"], "flags": sorted(flags[ck.id]),
                         **coverage(ck, by_ck[ck.id], incoming[ck.id], defense_of),
                         **bracket_fields(ck, bracket(ck, by_ck[ck.id], incoming[ck.id], test_size))})
    return rows


def l2_threat(ck: Checkpoint) -> str | None:
    """The dataset's L2 threat model (`l2-1` on digits), whose cells (L2 PGD, AutoAttack's
    L2 version) make a worst case of their own beside the L-inf one."""
    spec = DATASETS.get(ck.dataset)
    return f"l2-{spec.threat.l2_eps:g}" if spec is not None else None
