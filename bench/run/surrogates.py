"""Black-box transfer cells of a matrix: every model faces examples crafted on surrogates.

A matrix's `[transfer]` table names surrogate defenses and the cells crafted on them.
Each surrogate is the bench's own checkpoint of that defense's default recipe for the
dataset (trained on first use, then found like any checkpoint, and the very checkpoint
`bench run --defense NAME` gives). Its adversarial examples are crafted once and cached
(bench.run.transfer), then judged on the model under test and stored as transfer rows,
which the worst case and the flags read like any cell. A surrogate is not its own
transfer target (that would be white-box).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.core.data import get_spec, load_dataset
from bench.core.matrix import Matrix
from bench.run.attacking import expect
from bench.run.recipe import TrainRequest, resolve
from bench.run.training import ensure_checkpoint
from bench.run.transfer import correct, crafted_examples, top5_bits, transfer_cost, transfer_key
from bench.run.workspace import Workspace
from bench.science.adaptive import VOTES
from bench.science.admitted import is_randomized
from bench.science.flags import recompute_flags
from bench.store.bits import pack_bits
from bench.store.db import Checkpoint
from bench.store.examples import broken_by, transfer_examples_key, write_examples
from bench.store.meta import transfer_name


@dataclass
class TransferCells:
    """What `transfer_cells` did for one checkpoint."""

    ran: list[str] = field(default_factory=list)
    """The 'surrogate|cell' keys run."""
    total: int = 0
    """How many transfer cells the checkpoint has in all."""
    surrogates: list[Checkpoint] = field(default_factory=list)
    """The surrogates' checkpoints."""
    trained: list[str] = field(default_factory=list)
    """The surrogates trained by this call (the first run on a dataset trains them)."""


def mark_surrogate(ws: Workspace, source: Checkpoint) -> None:
    """Mark a checkpoint in its meta as a matrix surrogate, so boards can say why it is there."""
    if not (source.meta or {}).get("surrogate"):
        ws.store.update_meta(source, surrogate=True)


def transfer_cells(
    ws: Workspace, row: Checkpoint, matrix: Matrix, model: Callable[[], torch.nn.Module]
) -> TransferCells:
    """Run the matrix's transfer cells the store lacks for `row`."""
    surrogates = matrix.transfer.surrogates
    done = TransferCells()
    if not surrogates:
        return done

    cells = matrix.transfer_cells(get_spec(row.dataset).threat)
    randomized = is_randomized(row.admission)
    x = y = clean = clean5 = None
    ran = done.ran
    for name in surrogates:
        # The bench's own checkpoint of the surrogate's default recipe (trained on first use).
        source, trained = ensure_checkpoint(ws, resolve(TrainRequest(name, row.dataset)))
        if source.id == row.id:
            continue
        mark_surrogate(ws, source)
        done.surrogates.append(source)
        if trained:
            done.trained.append(name)
        done.total += len(cells)
        expect(ws, row, [transfer_name(name, transfer_key(c.key, randomized)) for c in cells])
        for cell in cells:
            key = transfer_key(cell.key, randomized)
            if row.id in ws.store.done_transfers(source.id, key):
                continue
            if x is None:
                x, y = load_dataset(row.dataset, "test", ws.data_root)
                clean, clean5 = correct(model(), x, y, ws, randomized, row.dataset)
            examples, _ = crafted_examples(ws, source, cell, x, y)
            x_adv = examples.x_adv
            after, after5 = correct(model(), x_adv, y, ws, randomized, row.dataset)
            robust = after & clean
            kept = broken_by(robust, clean, x_adv)
            write_examples(row.path, transfer_examples_key(source.key, key), cell.threat, kept)
            ws.store.add_transfer(
                source.id,
                row.id,
                cell_key=key,
                attack=cell.attack,
                params=dict(vars(cell.config)),
                threat=cell.threat,
                clean_acc=float(clean.float().mean()),
                robust_acc=float(robust.float().mean()),
                n=len(y),
                test_size=len(y),
                **transfer_cost(examples),
                seconds=0.0,
                correct_bits=pack_bits(robust.numpy()),
                top5_bits=top5_bits(after5, clean5),
                indices=None,
                extra={"surrogate": name, "votes": VOTES if randomized else 1},
                device=ws.device,
            )
            ran.append(transfer_name(name, key))
    if ran:
        recompute_flags(ws.store, row)
    return done
