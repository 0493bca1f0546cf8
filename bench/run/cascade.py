"""A cascade's cells, in order, each on what the earlier ones left standing.

AutoAttack runs its four attacks so, and so does a cascade matrix (`schedule =
"cascade"`, the built-in `fast`): a cheap attack first breaks what it can, and the
costly ones spend their passes only on the images still standing. Each cell is stored
with the test-set indices it ran on, so the worst case is the same per-sample AND as
for any cell, and its key ends `,cascade=<matrix>`: its numbers are on a subset and are
never read as the whole-set cell's.

The cells run one after another in the driver's process (each needs the one before),
under the same claims as every cell, so two drivers sharing a store neither run one
twice nor disagree on what stood.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.core.cells import Cell
from bench.core.data import load_dataset
from bench.core.gate import Gate
from bench.core.kinds import Role
from bench.run.jobs import EvalJob, Failed
from bench.run.workspace import Workspace
from bench.science.white_box import role_of
from bench.store.claims import Claims, claimed, eval_claim
from bench.store.db import Checkpoint
from bench.store.rows import CellRow


def standing_after(rows: list[CellRow], test_size: int) -> np.ndarray:
    """Per test image: left standing by every one of these cells."""
    standing = np.ones(test_size, dtype=bool)
    for r in rows:
        if r.indices is None:
            standing &= r.correct()
        else:
            standing[np.asarray(r.indices, dtype=np.int64)] &= r.correct()
    return standing


def gate_open(when: Gate, earlier: list[CellRow]) -> bool:
    """Whether the cascade's earlier cells showed the sign a gated cell waits for
    (bench.core.gate): a query-based cell (Square) broke an image, one the cells before it
    had left standing. Broken: classified right clean, wrong under attack (the first cell
    also runs on the images the model gets wrong; its clean accuracy counts them)."""
    assert when is Gate.BLACK_BOX_WON
    return any(role_of(r) is Role.QUERY and round(r.clean_acc * r.n) > int(r.correct().sum()) for r in earlier)


def run_cascade(
    ws: Workspace, row: Checkpoint, cells: list[Cell], model: Callable[[], torch.nn.Module], claims: Claims
) -> tuple[list[str], dict[str, str]]:
    """Run the cascade cells the store lacks for one checkpoint, in order; (the keys run,
    the failures by key). A cell that fails ends the cascade there: what the later ones
    would run on is not known."""
    if not cells:
        return [], {}
    x, y = load_dataset(row.dataset, "test", ws.data_root)
    ran: list[str] = []
    built: list[torch.nn.Module] = []
    for i, cell in enumerate(cells):
        earlier = {c.key for c in cells[:i]}

        def done(c: Cell) -> bool:
            return c.key in ws.store.done_cells(row.id)

        for item in claimed([cell], claims, key=lambda c: eval_claim(row.key, c.key), done=done):
            if item is None:  # another driver holds it (claimed waited a poll): ask again
                continue
            stored = [r for r in ws.store.evaluations([row.id]) if r.cell_key in earlier]
            images = np.flatnonzero(standing_after(stored, len(y)))
            if cell.when is not None and not gate_open(cell.when, stored):
                images = images[:0]  # stored as a cell on no image: no passes, nothing broken
            if not built:
                built.append(model())
            job = EvalJob(
                built[0],
                cell,
                x,
                y,
                ws.device,
                ws.batch_size(row.dataset),
                fast=ws.fast,
                label=row.key,
                images=images,
                keep=Path(row.path),
            )
            try:
                outcome = job.run()
            # Any exception of the attack fails its cell, reported like every cell's (LocalExecutor).
            except Exception as exc:
                claims.release(eval_claim(row.key, cell.key))
                return ran, {cell.key: Failed.of(exc).reason}
            ws.commit_cell(row, outcome)
            claims.release(eval_claim(row.key, cell.key))
            ran.append(cell.key)
    return ran, {}
