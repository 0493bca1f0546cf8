"""The attack stage: every matrix cell a stored checkpoint lacks, as jobs on an executor.

A model's admission checks run first and choose how its cells run
(bench.science.adaptive.adapt_cells); each cell runs under a claim and is committed in
its own transaction as it arrives; the checkpoint's flags are recomputed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from bench.core.cells import Cell, make_cell
from bench.core.data import get_spec, load_dataset
from bench.engine.verdicts import majority_correct
from bench.errors import BenchError
from bench.run.cascade import run_cascade
from bench.run.executors import LocalExecutor
from bench.run.jobs import EvalJob, Failed
from bench.run.progress import progress_bar
from bench.run.training import once
from bench.run.workspace import Workspace
from bench.science.adaptive import VOTES, WITNESS, adapt_cells
from bench.science.admission import ensure_admission
from bench.science.admitted import is_randomized
from bench.science.flags import CALLS_WITNESS, recompute_flags
from bench.store.claims import Claims, claimed, eval_claim
from bench.store.db import Checkpoint
from bench.verify import to_graph


def expect(ws: Workspace, row: Checkpoint, keys: list[str], threats: dict[str, str] | None = None) -> None:
    """Record that the checkpoint's matrix asks for these cells (evaluation keys, or
    `<surrogate>|<key>` for transfers): its worst case is complete only once all are stored.
    `threats` gives the threat model of each key not of the checkpoint's own (the L2
    cells, toward the L2 worst case)."""
    meta = row.meta or {}
    known = set(meta.get("expected_cells", []))
    other = {k: t for k, t in (threats or {}).items() if t != row.threat}
    recorded = meta.get("cell_threats", {})
    if set(keys) <= known and other.items() <= recorded.items():
        return
    ws.store.update_meta(row, expected_cells=sorted(known | set(keys)), cell_threats={**recorded, **other})


def verifiable_cells(
    ws: Workspace, row: Checkpoint, cells: list[Cell], model: Callable[[], torch.nn.Module]
) -> list[Cell]:
    """The cells, less the verifier cells (attack config `verifier`) when the verifier does
    not take the model: a layer it does not support, or a forward pass that varies. The
    one-line reason is kept in the meta (`not_verifiable`), where the boards show it; the
    model is built only the first time the question comes up."""
    if not any(c.verifier for c in cells):
        return cells
    meta = row.meta or {}
    if "not_verifiable" not in meta:
        reason = None
        if is_randomized(row.admission):
            reason = "verify: the model's forward pass varies from pass to pass; only a fixed network can be verified"
        else:
            try:
                to_graph(model(), get_spec(row.dataset).shape)
            except BenchError as exc:  # Unsupported, naming the layer, or a shape it cannot take
                reason = str(exc)
        ws.store.update_meta(row, not_verifiable=reason)
        meta = row.meta
    if meta["not_verifiable"] is None:
        return cells
    return [c for c in cells if not c.verifier]


def majority_clean(ws: Workspace, row: Checkpoint, model: Callable[[], torch.nn.Module]) -> None:
    """A randomized model's clean accuracy (its checkpoint's clean column) as the seeded
    majority of VOTES passes, like every verdict of its cells, instead of the one pass
    taken when it was stored."""
    meta = row.meta or {}
    if not is_randomized(row.admission) or meta.get("clean_votes") == VOTES:
        return
    x, y = load_dataset(row.dataset, "test", ws.data_root)
    clean = majority_correct(model(), x, y, VOTES, device=ws.device, batch_size=ws.batch_size(row.dataset))
    ws.store.update_meta(row, clean_acc=float(clean.float().mean()), clean_votes=VOTES)


EVAL_IDS = "eval_ids.json"


def record_eval_set(ws: Workspace, row: Checkpoint) -> None:
    """Which images a checkpoint's cells judge, where the test set is a seeded subset of a
    folder (ImageNet's val/): their count and digest in its meta (`eval_set`), their ids
    beside it (eval_ids.json), so two runs are comparable. A folder that now gives other
    images is refused: the checkpoint's stored cells are about the ones recorded."""
    spec = get_spec(row.dataset)
    if spec.eval_ids is None:
        return
    held = spec.eval_ids(ws.data_root)
    recorded = (row.meta or {}).get("eval_set")
    if recorded is None:
        (Path(row.path) / EVAL_IDS).write_text(json.dumps(list(held.ids)))
        ws.store.update_meta(row, eval_set={"size": len(held.ids), "sha256": held.digest, "ids": EVAL_IDS})
    elif recorded["sha256"] != held.digest:
        raise BenchError(
            f"checkpoint {row.key[:8]} was judged on another evaluation set of {row.dataset} "
            f"({recorded['size']} images, sha256 {recorded['sha256'][:12]}; --data-root now gives {len(held.ids)}, "
            f"{held.digest[:12]}): point --data-root at the folder it was judged on, or use a fresh --results folder"
        )


class CellsRun(list):
    """The keys of the cells run (a list, in the order they finished), and the cells that
    failed: `failures`, cell key -> one-line reason."""

    def __init__(self):
        super().__init__()
        self.failures: dict[str, str] = {}


def attack_checkpoint(
    ws: Workspace, row: Checkpoint, cells: list[Cell], model: Callable[[], torch.nn.Module], executor=None
) -> list[str]:
    """Run the cells the store lacks for one stored checkpoint, commit each result as it
    arrives, and recompute the checkpoint's flags. `model` builds the model, and is only
    called (once) when a cell or the admission checks are missing. The checks choose how
    the cells run (bench.science.adaptive.adapt_cells). Returns the keys of the cells run (a
    CellsRun, whose `failures` names the cells whose attack raised)."""
    return attack_checkpoints(ws, [(row, cells, model)], executor)[row.id]


def attack_checkpoints(
    ws: Workspace, work: list[tuple[Checkpoint, list[Cell], Callable[[], torch.nn.Module]]], executor=None
) -> dict[int, CellsRun]:
    """`attack_checkpoint` for several checkpoints as one stream of jobs, so a parallel
    executor attacks them all at once. Each cell runs under a claim: a second driver on
    the same store waits for it and reads the row instead of running it again."""
    # What each model does (randomness, zero gradients, ...) chooses how it is attacked.
    work = [
        (row, adapt_cells(cells, ensure_admission(ws, row, build), get_spec(row.dataset).threat), build)
        for row, cells, build in ((r, c, once(b)) for r, c, b in work)
    ]
    work = [(row, verifiable_cells(ws, row, cells, build), build) for row, cells, build in work]
    for row, cells, build in work:
        # The attacks make the worst case; a verifier's cells bracket it, and one that
        # fails leaves the bracket open, not the worst case incomplete.
        record_eval_set(ws, row)
        expect(ws, row, [c.key for c in cells if not c.verifier], {c.key: c.threat for c in cells})
        majority_clean(ws, row, build)
    executor = executor or LocalExecutor()
    ran = {row.id: CellsRun() for row, _, _ in work}
    rows = {row.key: row for row, _, _ in work}
    models: dict[str, torch.nn.Module] = {}
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bars: dict[str, tuple] = {}

    def claim_key(item) -> str:
        return eval_claim(item[0].key, item[1].key)

    def missing():
        for row, cells, build in work:
            done = ws.store.done_cells(row.id)
            # A cascade's cells wait for the ones before them: they run below, in order.
            yield from ((row, c, build) for c in cells if c.key not in done and not c.cascade)

    with Claims(ws.store) as claims:

        def jobs():
            for item in claimed(
                missing(), claims, key=claim_key, done=lambda it: it[1].key in ws.store.done_cells(it[0].id)
            ):
                if item is None:
                    yield None
                    continue
                row, cell, build = item
                if row.key not in models:  # built once, on the first cell this driver runs
                    models[row.key] = build()
                    data.setdefault(row.dataset, load_dataset(row.dataset, "test", ws.data_root))
                    bars[row.key] = progress_bar(
                        ws,
                        f"attack {row.defense} [{row.key[:8]}]",
                        sum(len(c) for r, c, _ in work if r.key == row.key),
                    )
                x, y = data[row.dataset]
                yield EvalJob(
                    models[row.key],
                    cell,
                    x,
                    y,
                    ws.device,
                    ws.batch_size(row.dataset),
                    fast=ws.fast,
                    label=row.key,
                    keep=Path(row.path),
                )

        try:
            for job, result in executor.map(jobs()):
                row = rows[job.label]
                if isinstance(result, Failed):
                    ran[row.id].failures[job.cell.key] = result.reason
                else:
                    ws.commit_cell(row, result)
                    ran[row.id].append(job.cell.key)
                claims.release(eval_claim(row.key, job.cell.key))
                on_step = bars[row.key][0]
                if on_step:
                    on_step(len(ws.store.done_cells(row.id)) + len(ran[row.id].failures))
        finally:
            for _, finish in bars.values():
                finish()
        for row, cells, build in work:
            done, failed = run_cascade(ws, row, [c for c in cells if c.cascade], build, claims)
            ran[row.id].extend(done)
            ran[row.id].failures.update(failed)
    for row, _, _ in work:
        recompute_flags(ws.store, row)
    return ran


def witness_after_black_box(
    ws: Workspace, work: list[tuple[Checkpoint, Callable[[], torch.nn.Module]]], executor=None
) -> dict[int, CellsRun]:
    """The witness cells for each checkpoint on which a black-box cell (Square, SPSA, a
    transfer) beat the strongest white-box one, as its stored flags say: admission alone
    decides from a few gradients, and a model can pass it and still hide its boundary from
    the gradient attacks. Run after every cell and transfer; the witness keys join the
    checkpoint's expected cells, so its worst case is complete only with them."""
    todo = []
    for row, build in work:
        # At each radius a black-box cell beat the white-box ones (a flag names one other
        # than the checkpoint's own, bench.science.flags).
        threat = get_spec(row.dataset).threat
        radii = {f.threat(row.threat) for f in ws.store.flags([row.id]) if f.name in CALLS_WITNESS}
        if radii:
            at = [threat if t == row.threat else threat.at(float(t.removeprefix("linf-"))) for t in sorted(radii)]
            todo.append((row, [make_cell(name, {}, t) for t in at for name in WITNESS], build))
    return attack_checkpoints(ws, todo, executor) if todo else {}
