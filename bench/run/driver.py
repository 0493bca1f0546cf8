"""The driver: what is missing -> jobs -> an executor -> the store.

`run_defenses` resolves recipes, finds or trains their checkpoints (bench.run.training),
hands every cell the store lacks to the executor (bench.run.attacking), then runs the
matrix's surrogate transfers (bench.run.surrogates) and the diagnostics
(bench.run.diagnosing). Only the driver's process writes to the store, and it claims
each training and cell before handing it out (bench.store.claims), so drivers sharing a
store never compute one twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.core.cells import Cell
from bench.core.matrix import Matrix
from bench.run.attacking import attack_checkpoints, witness_after_black_box
from bench.run.diagnosing import ensure_diagnostic
from bench.run.escalation import escalate
from bench.run.plan import checked_cells
from bench.run.recipe import Recipe, TrainRequest, resolve
from bench.run.surrogates import transfer_cells
from bench.run.training import ensure_checkpoints, model_of
from bench.run.workspace import Workspace
from bench.store.db import Checkpoint


@dataclass
class RunReport:
    checkpoint: Checkpoint
    trained: bool
    cells_run: list[str]
    cells_total: int
    failures: dict[str, str] = field(default_factory=dict)
    """Cell key -> one-line reason, for each cell whose attack raised."""
    surrogates_trained: list[str] = field(default_factory=list)
    """The matrix's transfer surrogates this run trained (once per dataset)."""


@dataclass(frozen=True)
class Plan:
    """One defense's run, checked: its recipe and the matrix's cells on its dataset."""

    recipe: Recipe
    cells: tuple[Cell, ...]


def plan_run(spec: TrainRequest, matrix: Matrix, data_root: str | None) -> Plan:
    """The recipe and the matrix's cells with every value checked, subsets against the
    size of the dataset's test set, before anything trains or runs."""
    recipe = resolve(spec)
    return Plan(recipe, tuple(checked_cells(matrix, recipe.dataset, data_root)))


def run_defense(ws: Workspace, spec: TrainRequest, matrix: Matrix, executor=None) -> RunReport:
    return run_defenses(ws, [plan_run(spec, matrix, ws.data_root)], matrix, executor)[0]


def run_defenses(ws: Workspace, plans: list[Plan], matrix: Matrix, executor=None) -> list[RunReport]:
    """Train what is missing (all trainings first, in parallel on a parallel executor),
    then run every missing cell of every checkpoint (again in parallel), then the
    matrix's transfer cells from the workspace's surrogates, then the diagnostics. The plans
    are checked already (`plan_run`), so bad input failed before the store was opened."""
    recipes = [plan.recipe for plan in plans]
    cells = {plan.recipe.key: list(plan.cells) for plan in plans}
    rows, trained = ensure_checkpoints(ws, recipes, executor)
    unique = list({row.key: row for row in rows}.values())
    builds = {row.key: model_of(row, ws.device) for row in unique}
    ran = attack_checkpoints(ws, [(row, cells[row.key], builds[row.key]) for row in unique], executor)
    transfers = {row.key: transfer_cells(ws, row, matrix, builds[row.key]) for row in unique}
    for row_id, extra in witness_after_black_box(ws, [(row, builds[row.key]) for row in unique], executor).items():
        ran[row_id].extend(extra)
        ran[row_id].failures.update(extra.failures)
    full = matrix.escalation()
    if full is not None:
        for row in unique:
            escalated = escalate(ws, row, full, builds[row.key], executor)
            if escalated is not None:
                ran[row.id].extend(escalated)
                ran[row.id].failures.update(escalated.failures)
                cells[row.key] += escalated.cells
    # The surrogates get their diagnostics too: the checkpoint pages and the compare page
    # draw every defense against natural training on the same dataset.
    surrogates = {s.key: s for t in transfers.values() for s in t.surrogates if s.key not in builds}
    for row in [*unique, *surrogates.values()]:
        ensure_diagnostic(ws, row, builds.get(row.key) or model_of(row, ws.device))
    trained_surrogates = sorted({n for t in transfers.values() for n in t.trained})
    return [
        RunReport(
            row,
            row.key in trained,
            [*ran[row.id], *transfers[row.key].ran],
            len(cells[row.key]) + transfers[row.key].total,
            ran[row.id].failures,
            trained_surrogates,
        )
        for row in rows
    ]
