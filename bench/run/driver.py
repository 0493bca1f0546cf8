"""The driver: what is missing -> jobs -> an executor -> the store.

`run_defenses` resolves recipes, finds or trains their checkpoints (all trainings as jobs
on the executor), expands the matrix, and hands every cell the store lacks to the
executor (again all at once), committing each result in its own transaction as it
arrives. Only this driver writes to the store, and it claims each training and cell
before handing it out (bench.store.claims), so drivers sharing a store never compute one twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.store import checkpoints as ckpt
from bench.store.claims import Claims, claimed
from bench.core.data import load_dataset
from bench.reporting.diagnosis import ensure_diagnostic
from bench.run.bench import Bench
from bench.errors import BenchError
from bench.run.executors import LocalExecutor
from bench.run.jobs import EvalJob, Failed, TrainJob, package_version  # noqa: F401 (package_version: bench.reporting.site)
from bench.core.matrix import Cell, matrix_cells
from bench.run.recipe import Recipe, RunSpec, resolve
from bench.store.db import Checkpoint


def ensure_checkpoint(bench: Bench, recipe: Recipe, executor=None) -> tuple[Checkpoint, bool]:
    """The stored checkpoint for a recipe, training it first if absent. (row, trained?)"""
    rows, trained = ensure_checkpoints(bench, [recipe], executor)
    return rows[0], recipe.key in trained


def ensure_checkpoints(bench: Bench, recipes: list[Recipe], executor=None) -> tuple[list[Checkpoint], set[str]]:
    """The stored checkpoints of `recipes` (in their order) and the keys trained here.

    Missing ones are trained as jobs on the executor (in parallel where it runs several),
    each under a claim, so that a second driver on the same store waits for the training
    and reads its row instead of training it again.
    """
    executor = executor or LocalExecutor()
    unique = {r.key: r for r in recipes}
    trained: set[str] = set()
    failures: list[Failed] = []
    bars: dict[str, Callable[[], None]] = {}

    def directory(recipe: Recipe) -> Path:
        return ckpt.checkpoint_dir(bench.results, recipe.dataset.name, recipe.defense, recipe.key)

    with Claims(bench.store) as claims:
        def jobs():
            for recipe in claimed(unique.values(), claims, key=lambda r: f"train:{r.key}",
                                  done=lambda r: bench.store.checkpoint(r.key) is not None):
                if recipe is None:
                    yield None
                    continue
                meta = ckpt.read_meta(directory(recipe))
                if meta is not None:  # written by a run killed before recording it: adopt it
                    _record_checkpoint(bench, recipe, directory(recipe), meta)
                    claims.release(f"train:{recipe.key}")
                    continue
                steps = recipe.train_config.epochs * -(-_train_size(recipe, bench) // recipe.train_config.batch_size)
                on_step, bars[recipe.key] = _progress(bench, f"train {recipe.defense} [{recipe.key[:8]}]", steps)
                yield TrainJob(recipe, directory(recipe), bench.device, bench.data_root, bench.batch_size(),
                               precision=bench.precision, channels_last=bench.channels_last, on_step=on_step)

        try:
            for job, meta in executor.map(jobs()):
                bars.pop(job.recipe.key, lambda: None)()
                if isinstance(meta, Failed):
                    failures.append(meta)
                else:
                    _record_checkpoint(bench, job.recipe, job.directory, meta)
                    trained.add(job.recipe.key)
                claims.release(f"train:{job.recipe.key}")
        finally:
            for done in bars.values():
                done()
    if failures:  # the other trainings are recorded; the first failure stops the run
        raise failures[0].error or BenchError(f"training failed: {failures[0].reason}")
    return [bench.store.checkpoint(r.key) for r in recipes], trained


def _train_size(recipe: Recipe, bench: Bench) -> int:
    return len(load_dataset(recipe.dataset.name, "train", bench.data_root)[1])


def _record_checkpoint(bench: Bench, recipe: Recipe, directory: Path, meta: dict) -> Checkpoint:
    """Record a checkpoint folder in the store (idempotent: a row already there is kept)."""
    ds = recipe.dataset
    return bench.store.add_checkpoint(
        key=recipe.key, dataset=ds.name, defense=recipe.defense,
        preset=recipe.preset.name if recipe.preset else None, arch=recipe.arch, seed=recipe.seed,
        threat=ds.threat.name, config=meta["config"], train_config=meta["train"], path=str(directory),
        sha256=meta["sha256"], epochs=meta["epochs"], train_seconds=meta["train_seconds"],
        device=meta["device"], meta=meta)


def _progress(bench: Bench, label: str, total: int):
    """(on_step, done) callbacks driving one progress bar, or no-ops without a display."""
    if bench.progress is None:
        return None, lambda: None
    task = bench.progress.add_task(label, total=total)

    def on_step(step, *_):
        bench.progress.update(task, completed=step)

    return on_step, lambda: bench.progress.remove_task(task)


def load_model(row: Checkpoint, device: str) -> torch.nn.Module:
    meta = ckpt.read_meta(Path(row.path))
    if meta is None or meta["sha256"] != row.sha256:
        raise BenchError(f"checkpoint {row.key} at {row.path!r} is missing or altered; delete its "
                         "row or restore the folder")
    return ckpt.build_from_meta(meta, Path(row.path) / "model.safetensors", device)


def _once(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """`build`, called at most once."""
    made: list[torch.nn.Module] = []

    def get() -> torch.nn.Module:
        if not made:
            made.append(build())
        return made[0]

    return get


@dataclass
class RunReport:
    checkpoint: Checkpoint
    trained: bool
    cells_run: list[str]
    cells_total: int
    failures: dict[str, str] = field(default_factory=dict)
    """Cell key -> one-line reason, for each cell whose attack raised."""


class CellsRun(list):
    """The keys of the cells run (a list, in the order they finished), and the cells that
    failed: `failures`, cell key -> one-line reason."""

    def __init__(self):
        super().__init__()
        self.failures: dict[str, str] = {}


def plan_run(spec: RunSpec, matrix: str, data_root: str | None) -> tuple[Recipe, list[Cell]]:
    """The recipe and the matrix's cells with every value checked, subsets against the
    size of the dataset's test set, before anything trains or runs."""
    from bench.run.surrogates import check_transfer

    recipe = resolve(spec)
    test_size = len(load_dataset(recipe.dataset.name, "test", data_root)[1])
    cells = matrix_cells(matrix, recipe.dataset.threat, test_size=test_size)
    check_transfer(matrix, recipe.dataset)
    return recipe, cells


def run_defense(bench: Bench, spec: RunSpec, matrix: str, executor=None) -> RunReport:
    return run_defenses(bench, [spec], matrix, executor)[0]


def run_defenses(bench: Bench, specs: list[RunSpec], matrix: str, executor=None) -> list[RunReport]:
    """Train what is missing (all trainings first, in parallel on a parallel executor),
    then run every missing cell of every checkpoint (again in parallel), then the
    matrix's transfer cells from the bench's surrogates, then the diagnostics."""
    from bench.run.surrogates import transfer_cells

    plans = [plan_run(s, matrix, bench.data_root) for s in specs]  # bad input fails before training
    recipes = [recipe for recipe, _ in plans]
    cells = {recipe.key: c for recipe, c in plans}
    rows, trained = ensure_checkpoints(bench, recipes, executor)
    unique = list({row.key: row for row in rows}.values())
    builds = {row.key: _once(_loader(row, bench.device)) for row in unique}
    ran = attack_checkpoints(bench, [(row, cells[row.key], builds[row.key]) for row in unique], executor)
    transfers = {row.key: transfer_cells(bench, row, matrix, builds[row.key]) for row in unique}
    for row in unique:
        ensure_diagnostic(bench, row, builds[row.key])
    return [RunReport(row, row.key in trained, [*ran[row.id], *transfers[row.key][0]],
                      len(cells[row.key]) + transfers[row.key][1], ran[row.id].failures)
            for row in rows]


def _loader(row: Checkpoint, device: str) -> Callable[[], torch.nn.Module]:
    return lambda: load_model(row, device)


def attack_checkpoint(bench: Bench, row: Checkpoint, cells: list[Cell],
                      model: Callable[[], torch.nn.Module], executor=None) -> list[str]:
    """Run the cells the store lacks for one stored checkpoint, commit each result as it
    arrives, and recompute the checkpoint's flags. `model` builds the model, and is only
    called (once) when a cell or the admission checks are missing. The checks choose how
    the cells run (bench.science.adaptive.adapt_cells). Returns the keys of the cells run (a
    CellsRun, whose `failures` names the cells whose attack raised)."""
    return attack_checkpoints(bench, [(row, cells, model)], executor)[row.id]


def attack_checkpoints(bench: Bench, work: list[tuple[Checkpoint, list[Cell], Callable[[], torch.nn.Module]]],
                       executor=None) -> dict[int, CellsRun]:
    """`attack_checkpoint` for several checkpoints as one stream of jobs, so a parallel
    executor attacks them all at once. Each cell runs under a claim: a second driver on
    the same store waits for it and reads the row instead of running it again."""
    from bench.science.adaptive import adapt_cells
    from bench.science.admission import ensure_admission
    from bench.science.flags import recompute_flags

    # What each model does (randomness, zero gradients, ...) chooses how it is attacked.
    work = [(row, adapt_cells(cells, ensure_admission(bench, row, build)), build)
            for row, cells, build in ((r, c, _once(b)) for r, c, b in work)]
    executor = executor or LocalExecutor()
    ran = {row.id: CellsRun() for row, _, _ in work}
    rows = {row.key: row for row, _, _ in work}
    models: dict[str, torch.nn.Module] = {}
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bars: dict[str, tuple] = {}

    def claim_key(item) -> str:
        return f"eval:{item[0].key}:{item[1].key}"

    def missing():
        for row, cells, build in work:
            done = bench.store.done_cells(row.id)
            yield from ((row, c, build) for c in cells if c.key not in done)

    with Claims(bench.store) as claims:
        def jobs():
            for item in claimed(missing(), claims, key=claim_key,
                                done=lambda it: it[1].key in bench.store.done_cells(it[0].id)):
                if item is None:
                    yield None
                    continue
                row, cell, build = item
                if row.key not in models:  # built once, on the first cell this driver runs
                    models[row.key] = build()
                    data.setdefault(row.dataset, load_dataset(row.dataset, "test", bench.data_root))
                    bars[row.key] = _progress(bench, f"attack {row.defense} [{row.key[:8]}]",
                                              sum(len(c) for r, c, _ in work if r.key == row.key))
                x, y = data[row.dataset]
                yield EvalJob(models[row.key], cell, x, y, bench.device, bench.batch_size(), fast=bench.fast,
                              label=row.key)

        try:
            for job, result in executor.map(jobs()):
                row = rows[job.label]
                if isinstance(result, Failed):
                    ran[row.id].failures[job.cell.key] = result.reason
                else:
                    bench.store.add_evaluation(row.id, **result)
                    ran[row.id].append(job.cell.key)
                claims.release(f"eval:{row.key}:{job.cell.key}")
                on_step = bars[row.key][0]
                if on_step:
                    on_step(len(bench.store.done_cells(row.id)) + len(ran[row.id].failures))
        finally:
            for _, finish in bars.values():
                finish()
    for row, _, _ in work:
        recompute_flags(bench.store, row)
    return ran
