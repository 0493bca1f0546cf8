"""Black-box transfer grids: craft on a source checkpoint, evaluate targets on it.

Adversarial examples are crafted once per (source checkpoint, cell) and cached as
safetensors under results/transfers/, so a rerun or a new target never recrafts. They are
written batch by batch as they are crafted and read back a batch at a time as they are
judged (bench.run.jobs.CraftJob, bench.core.images.StoredImages): an ImageNet set is
never whole in float32. Each
(source, target, cell) result is one row committed in its own transaction. The
diagonal of a grid is the source attacking itself, i.e. white-box, kept for reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.core.cells import Cell, transfer_cell
from bench.core.data import get_spec, load_dataset
from bench.core.images import StoredImages
from bench.engine.budget import BudgetError, check_budget
from bench.engine.verdicts import in_top5, majority_correct, predict
from bench.errors import BenchError
from bench.run.executors import LocalExecutor
from bench.run.jobs import EXAMPLES, CraftJob, Examples, Failed, read_cost
from bench.run.training import load_model
from bench.run.workspace import Workspace
from bench.science.adaptive import VOTES, adaptive_key
from bench.science.admission import ensure_admission
from bench.science.admitted import is_randomized
from bench.science.flags import recompute_flags
from bench.store.bits import pack_bits
from bench.store.claims import Claims, claimed, craft_claim
from bench.store.db import Checkpoint
from bench.store.examples import broken_by, transfer_examples_key, write_examples
from bench.store.select import select_checkpoints

DEFAULT_ATTACK = "pgd:steps=10"  # PGD-10, as Summers & Dinneen Table 2, run to its last iterate


@dataclass
class TransferReport:
    crafted: int = 0
    reused: int = 0
    evaluated: int = 0
    skipped: int = 0
    grid: list[dict] = field(default_factory=list)


def transfer_key(cell_key: str, randomized: bool) -> str:
    """A transfer row's key: the cell's, with the votes that judged a randomized target."""
    return adaptive_key(cell_key, 0, VOTES) if randomized else cell_key


def correct(model, x, y, ws: Workspace, randomized: bool, dataset: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sample, whether the target classifies it correctly (one pass, or the seeded
    majority of VOTES passes for a randomized target: the same passes as its cells'), and
    whether the label is among its five largest logits (None for a randomized target)."""
    if randomized:
        return majority_correct(model, x, y, VOTES, device=ws.device, batch_size=ws.batch_size(dataset)), None
    logits = predict(model, x, device=ws.device, batch_size=ws.batch_size(dataset))
    return logits.argmax(1) == y, in_top5(logits, y)


def top5_bits(adv: torch.Tensor | None, clean: torch.Tensor | None) -> bytes | None:
    """A transfer row's packed top-5 verdicts: the label in the top five before and after."""
    return None if adv is None or clean is None else pack_bits((adv & clean).numpy())


def cache_path(results: Path, source: Checkpoint, cell: Cell) -> Path:
    digest = hashlib.sha256(cell.key.encode()).hexdigest()[:16]
    return results / "transfers" / source.dataset / source.key / f"{digest}.safetensors"


BUDGET_ROWS = 64
"""Rows of a cached set held to the cell's ball at a time."""


def cached_examples(ws: Workspace, source: Checkpoint, cell: Cell, x) -> Examples | None:
    """The cached examples of (source, cell), read from their file a batch at a time and
    held to the cell's ball around x like any crafted batch: a file edited or written by
    other code is refused, never judged."""
    path = cache_path(ws.results, source, cell)
    if not path.is_file():
        return None
    stored = StoredImages(path, EXAMPLES)
    if stored.shape != x.shape:
        return None
    try:
        for i in range(0, len(x), BUDGET_ROWS):
            check_budget(cell, x[i : i + BUDGET_ROWS], stored[i : i + BUDGET_ROWS])
    except BudgetError as exc:
        raise BenchError(
            f"cached transfer examples {path} are outside the threat model ({exc}); delete the file to craft them again"
        ) from exc
    return Examples(stored, read_cost(stored.metadata))


def transfer_cost(examples: Examples) -> dict[str, float | None]:
    """A transfer row's passes: what crafting its examples cost on the source, per image
    (the target only judges them)."""
    passes = examples.passes
    return {
        "forward_passes": passes.forward if passes else None,
        "backward_passes": passes.backward if passes else None,
    }


def _craft_job(ws: Workspace, source: Checkpoint, cell: Cell, x, y) -> CraftJob:
    # Crafted on the fast path (bf16 on a GPU); targets are always judged in fp32.
    return CraftJob(
        load_model(source, ws.device),
        cell,
        x,
        y,
        ws.device,
        ws.batch_size(source.dataset),
        fast=ws.fast,
        label=source.key,
        into=cache_path(ws.results, source, cell),
    )


def crafted_examples(ws: Workspace, source: Checkpoint, cell: Cell, x, y) -> tuple[Examples, bool]:
    """(the examples, reused?) for a source and cell: from the cache, or crafted into it in
    this process (the matrix's surrogate transfers, which the driver runs itself)."""
    cached = cached_examples(ws, source, cell, x)
    if cached is not None:
        return cached, True
    return _craft_job(ws, source, cell, x, y).run(), False


def run_transfers(
    ws: Workspace, source: str, target: str, attack: str | None, dataset: str = "digits", executor=None
) -> TransferReport:
    """Craft on each source (as jobs on the executor, each under a claim, cached on disk),
    then judge every target on each source's examples here, committing row by row."""
    spec = get_spec(dataset)
    cell = transfer_cell(attack or DEFAULT_ATTACK, spec.threat)
    if cell.subset:
        raise BenchError("transfer cells run on the whole test set; drop subset= from --attack")
    checkpoints = ws.store.checkpoints(dataset=dataset)
    sources = select_checkpoints(ws.store, source, dataset, option="--source")
    targets = select_checkpoints(ws.store, target, dataset, option="--target")
    x, y = load_dataset(dataset, "test", ws.data_root)
    executor = executor or LocalExecutor()
    report = TransferReport()
    models: dict[int, torch.nn.Module] = {}
    clean: dict[int, torch.Tensor] = {}
    clean5: dict[int, torch.Tensor | None] = {}
    touched: set[int] = set()
    task = ws.progress.add_task("transfer", total=len(sources) * len(targets)) if ws.progress else None

    # A randomized target is judged by the seeded majority of passes, as in every cell,
    # and its row's key says so (`...,votes=21`).
    randomized = {t.id: is_randomized(ensure_admission(ws, t, lambda t=t: load_model(t, ws.device))) for t in targets}
    keys = {t.id: transfer_key(cell.key, randomized[t.id]) for t in targets}

    def todo(src: Checkpoint) -> list[Checkpoint]:
        done = {k: ws.store.done_transfers(src.id, k) for k in set(keys.values())}
        return [t for t in targets if t.id not in done[keys[t.id]]]

    def judge(src: Checkpoint, examples: Examples) -> None:
        x_adv = examples.x_adv
        for tgt in todo(src):
            if tgt.id not in models:
                models[tgt.id] = load_model(tgt, ws.device)
                clean[tgt.id], clean5[tgt.id] = correct(models[tgt.id], x, y, ws, randomized[tgt.id], dataset)
            after, after5 = correct(models[tgt.id], x_adv, y, ws, randomized[tgt.id], dataset)
            robust = after & clean[tgt.id]
            kept = broken_by(robust, clean[tgt.id], x_adv)
            write_examples(tgt.path, transfer_examples_key(src.key, keys[tgt.id]), cell.threat, kept)
            report.evaluated += ws.store.add_transfer(
                src.id,
                tgt.id,
                cell_key=keys[tgt.id],
                attack=cell.attack,
                params=dict(vars(cell.config)),
                threat=cell.threat,
                clean_acc=float(clean[tgt.id].float().mean()),
                robust_acc=float(robust.float().mean()),
                n=len(y),
                test_size=len(y),
                **transfer_cost(examples),
                seconds=0.0,
                correct_bits=pack_bits(robust.numpy()),
                top5_bits=top5_bits(after5, clean5[tgt.id]),
                indices=None,
                extra={"votes": VOTES if randomized[tgt.id] else 1},
                device=ws.device,
            )
            touched.add(tgt.id)
        if task is not None:
            ws.progress.advance(task, len(targets))

    pending = []
    for src in sources:
        if not todo(src):
            report.skipped += len(targets)
            if task is not None:
                ws.progress.advance(task, len(targets))
            continue
        report.skipped += len(targets) - len(todo(src))
        cached = cached_examples(ws, src, cell, x)
        if cached is None:
            pending.append(src)
        else:
            report.reused += 1
            judge(src, cached)
    by_key = {src.key: src for src in pending}
    with Claims(ws.store) as claims:
        # A source another driver is crafting is waited for, then read from the cache.
        def ready(src: Checkpoint) -> bool:
            return not todo(src) or cache_path(ws.results, src, cell).is_file()

        def jobs():
            for src in claimed(pending, claims, key=lambda s: craft_claim(s.key, cell.key), done=ready):
                yield None if src is None else _craft_job(ws, src, cell, x, y)

        for job, examples in executor.map(jobs()):
            src = by_key[job.label]
            if isinstance(examples, Failed):
                claims.release(craft_claim(src.key, cell.key))
                raise BenchError(f"crafting {cell.key} on {src.defense} [{src.key[:8]}] failed: {examples.reason}")
            claims.release(craft_claim(src.key, cell.key))
            report.crafted += 1
            judge(src, examples)
    for src in pending:  # crafted by another driver meanwhile
        if todo(src):
            examples = cached_examples(ws, src, cell, x)
            if examples is not None:
                report.reused += 1
                judge(src, examples)
    for ck in targets:
        if ck.id in touched:
            recompute_flags(ws.store, ck)
    # A defense's name alone where it has one checkpoint here; with its key where several.
    counts = {d: sum(c.defense == d for c in checkpoints) for d in {c.defense for c in checkpoints}}
    names = {c.id: c.defense if counts[c.defense] == 1 else f"{c.defense}[{c.key[:6]}]" for c in checkpoints}
    wanted_src, wanted_tgt = {c.id for c in sources}, {c.id for c in targets}
    report.grid = [
        {"source": names[t.source_id], "target": names[t.target_id], "robust_acc": t.robust_acc, "cell": t.cell_key}
        for t in ws.store.transfers(wanted_tgt)
        if t.cell_key == keys.get(t.target_id) and t.source_id in wanted_src and t.target_id in wanted_tgt
    ]
    return report
