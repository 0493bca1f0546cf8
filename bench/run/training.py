"""The training stage: the stored checkpoint of each recipe, trained first where missing.

Trainings run as jobs on the executor (in parallel where it runs several), each under a
claim, so that a second driver on the same store waits for a training and reads its row
instead of training it again. A checkpoint folder written by a run killed before it
recorded the row is adopted, not retrained. A recipe of several workers is one training
spread over a Ray cluster by Ray Train itself (bench.run.distributed), so those run from
this process, one after another, whatever the executor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from bench.core.data import train_size
from bench.engine.train import steps_per_epoch
from bench.errors import BenchError
from bench.run.executors import LocalExecutor
from bench.run.jobs import Failed, TrainJob
from bench.run.progress import progress_bar
from bench.run.recipe import Recipe
from bench.run.workspace import Workspace
from bench.store import checkpoints as ckpt
from bench.store.claims import Claims, claimed, train_claim
from bench.store.db import Checkpoint


def ensure_checkpoint(ws: Workspace, recipe: Recipe, executor=None) -> tuple[Checkpoint, bool]:
    """The stored checkpoint for a recipe, training it first if absent. (row, trained?)"""
    rows, trained = ensure_checkpoints(ws, [recipe], executor)
    return rows[0], recipe.key in trained


def ensure_checkpoints(ws: Workspace, recipes: list[Recipe], executor=None) -> tuple[list[Checkpoint], set[str]]:
    """The stored checkpoints of `recipes` (in their order) and the keys trained here.

    Missing ones are trained as jobs on the executor (in parallel where it runs several),
    each under a claim, so that a second driver on the same store waits for the training
    and reads its row instead of training it again.
    """
    unique = {r.key: r for r in recipes}
    # A data-parallel training holds many of the cluster's slots by itself; as a task of
    # the executor it would also wait for the slot its own task holds.
    if executor is None or any(r.workers > 1 for r in unique.values()):
        executor = LocalExecutor()
    trained: set[str] = set()
    failures: list[Failed] = []
    bars: dict[str, Callable[[], None]] = {}

    def directory(recipe: Recipe) -> Path:
        return ckpt.checkpoint_dir(ws.results, recipe.dataset.name, recipe.defense, recipe.key)

    with Claims(ws.store) as claims:

        def jobs():
            for recipe in claimed(
                unique.values(),
                claims,
                key=lambda r: train_claim(r.key),
                done=lambda r: ws.store.checkpoint(r.key) is not None,
            ):
                if recipe is None:
                    yield None
                    continue
                meta = ckpt.read_meta(directory(recipe))
                if meta is not None:  # written by a run killed before recording it: adopt it
                    record_checkpoint(ws, recipe, directory(recipe), meta)
                    claims.release(train_claim(recipe.key))
                    continue
                cfg = recipe.train_config
                steps = cfg.epochs * steps_per_epoch(
                    train_size(recipe.dataset.name, ws.data_root), cfg.batch_size, recipe.workers
                )
                on_step, bars[recipe.key] = progress_bar(ws, f"train {recipe.defense} [{recipe.key[:8]}]", steps)
                yield TrainJob(
                    recipe,
                    directory(recipe),
                    ws.device,
                    ws.data_root,
                    ws.batch_size(recipe.dataset.name),
                    precision=ws.precision,
                    channels_last=ws.channels_last,
                    on_step=on_step,
                )

        try:
            for job, meta in executor.map(jobs()):
                bars.pop(job.recipe.key, lambda: None)()
                if isinstance(meta, Failed):
                    failures.append(meta)
                else:
                    record_checkpoint(ws, job.recipe, job.directory, meta)
                    trained.add(job.recipe.key)
                claims.release(train_claim(job.recipe.key))
        finally:
            for done in bars.values():
                done()
    if failures:  # the other trainings are recorded; the first failure stops the run
        raise failures[0].error or BenchError(f"training failed: {failures[0].reason}")
    return [ws.store.checkpoint(r.key) for r in recipes], trained


def record_checkpoint(ws: Workspace, recipe: Recipe, directory: Path, meta: dict) -> Checkpoint:
    """Record a checkpoint folder in the store (idempotent: a row already there is kept)."""
    ds = recipe.dataset
    return ws.store.add_checkpoint(
        key=recipe.key,
        dataset=ds.name,
        defense=recipe.defense,
        preset=recipe.preset.name if recipe.preset else None,
        arch=recipe.arch,
        seed=recipe.seed,
        threat=ds.threat.name,
        config=meta["config"],
        train_config=meta["train"],
        path=str(directory),
        sha256=meta["sha256"],
        epochs=meta["epochs"],
        train_seconds=meta["train_seconds"],
        device=meta["device"],
        meta=meta,
    )


def load_model(row: Checkpoint, device: str) -> torch.nn.Module:
    meta = ckpt.read_meta(Path(row.path))
    if meta is None or meta["sha256"] != row.sha256:
        raise BenchError(
            f"checkpoint {row.key} at {row.path!r} is missing or altered; delete its row or restore the folder"
        )
    return ckpt.build_from_meta(meta, Path(row.path) / "model.safetensors", device)


def once(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """`build`, called at most once."""
    made: list[torch.nn.Module] = []

    def get() -> torch.nn.Module:
        if not made:
            made.append(build())
        return made[0]

    return get


def model_of(row: Checkpoint, device: str) -> Callable[[], torch.nn.Module]:
    """A builder of the checkpoint's model that loads it at most once, on first call."""
    return once(lambda: load_model(row, device))
