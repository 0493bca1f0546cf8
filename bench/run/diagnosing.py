"""The diagnostics stage: each checkpoint's linearized-robustness diagnostics
(bench.science.diagnostics), computed once from its weights and stored."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.core.data import get_spec, load_dataset
from bench.run.training import load_model
from bench.run.workspace import Workspace
from bench.science.diagnostics import diagnose
from bench.store.db import Checkpoint
from bench.store.select import select_checkpoints


def ensure_diagnostic(ws: Workspace, row: Checkpoint, model: Callable[[], torch.nn.Module]) -> bool:
    """Compute and store a checkpoint's diagnostics unless stored. True if computed."""
    if ws.store.diagnostics([row.id]):
        return False
    x, y = load_dataset(row.dataset, "test", ws.data_root)
    eps = get_spec(row.dataset).threat.eps
    start = time.perf_counter()
    found = diagnose(model(), x, y, eps, device=ws.device, batch_size=ws.batch_size(row.dataset))
    ws.store.add_diagnostic(
        row.id,
        eps=eps,
        n=len(y),
        summary=found["summary"],
        samples=found["samples"],
        landscape=found["landscape"],
        seconds=time.perf_counter() - start,
    )
    return True


def ensure_diagnostics(ws: Workspace, name: str, dataset: str | None = None) -> list[Checkpoint]:
    """The checkpoints `name` selects, each with its diagnostics stored."""
    chosen = select_checkpoints(ws.store, name, dataset)
    for ck in chosen:
        ensure_diagnostic(ws, ck, lambda ck=ck: load_model(ck, ws.device))
    return chosen
