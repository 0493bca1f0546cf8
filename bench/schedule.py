"""The driver: what is missing -> jobs -> an executor -> the store.

`run_defense` resolves a recipe, finds or trains its checkpoint, expands the matrix, and
hands the cells the store lacks to an executor, committing each result in its own
transaction as it arrives. Only this driver writes to the store.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import checkpoint as ckpt
from bench.data import load_dataset
from bench.env import Bench
from bench.errors import BenchError
from bench.executors import LocalExecutor
from bench.fastpath import logit_stats, predict
from bench.jobs import EvalJob
from bench.matrix import Cell, matrix_cells
from bench.models import build_model
from bench.recipe import Recipe, RunSpec, resolve
from bench.registry import DEFENSES
from bench.store import Checkpoint
from bench.train import TrainContext, train


def package_version() -> str:
    try:
        return importlib.metadata.version("robustness-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ensure_checkpoint(bench: Bench, recipe: Recipe) -> tuple[Checkpoint, bool]:
    """The stored checkpoint for a recipe, training it first if absent. (row, trained?)"""
    key = recipe.key
    row = bench.store.checkpoint(key)
    if row is not None:
        return row, False
    ds = recipe.dataset
    directory = ckpt.checkpoint_dir(bench.results, ds.name, recipe.defense, key)
    meta = ckpt.read_meta(directory)
    trained = meta is None
    if trained:  # not on disk either (a run killed after writing adopts its file instead)
        meta = train_checkpoint(bench, recipe, directory)
    row = bench.store.add_checkpoint(
        key=key, dataset=ds.name, defense=recipe.defense,
        preset=recipe.preset.name if recipe.preset else None, arch=recipe.arch, seed=recipe.seed,
        threat=ds.threat.name, config=meta["config"], train_config=meta["train"], path=str(directory),
        sha256=meta["sha256"], epochs=meta["epochs"], train_seconds=meta["train_seconds"],
        device=meta["device"], meta=meta)
    return row, trained


def train_checkpoint(bench: Bench, recipe: Recipe, directory: Path) -> dict:
    ds = recipe.dataset
    entry = DEFENSES.get(recipe.defense)
    x, y = load_dataset(ds.name, "train", bench.data_root)
    x_test, y_test = load_dataset(ds.name, "test", bench.data_root)
    device = bench.device
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.arch, ds).to(device)
    ctx = TrainContext(ds.num_classes, ds.threat, torch.Generator(device=device).manual_seed(recipe.seed))
    on_step, done = _progress(bench, f"train {recipe.defense} [{recipe.key[:8]}]",
                              recipe.train_config.epochs * -(-len(x) // recipe.train_config.batch_size))
    try:
        result = train(model, entry.fn, recipe.config, recipe.train_config, x.to(device), y.to(device),
                       ctx, on_step=on_step, precision=bench.precision, channels_last=bench.channels_last)
    except FloatingPointError as exc:
        raise BenchError(f"training {recipe.defense!r} diverged: {exc}; lower lr or the "
                         "regularization weight with --set") from exc
    finally:
        done()
    logits = predict(model, x_test, device=device, batch_size=bench.batch_size())
    meta = {
        "key": recipe.key, "defense": recipe.defense, "config": dataclasses.asdict(recipe.config),
        "train": dataclasses.asdict(recipe.train_config), "dataset": ds.name, "arch": recipe.arch,
        "seed": recipe.seed, "epochs": recipe.train_config.epochs, "train_seconds": result.seconds,
        "train_losses": result.losses, "device": _device_name(device),
        "preset": recipe.preset.name if recipe.preset else None,
        "paper": recipe.preset.paper if recipe.preset else {},
        "preset_description": recipe.preset.description if recipe.preset else "",
        "preset_source": recipe.preset.source if recipe.preset else "",
        # The intra-op thread count changes float summation order, hence the weights.
        "torch_threads": torch.get_num_threads(),
        "clean_acc": float((logits.argmax(1) == y_test).float().mean()),
        "logit_stats": logit_stats(logits, y_test),
        "package_version": package_version(), "git_commit": ckpt.git_commit(),
        "torch_version": torch.__version__, "precision": bench.precision,
    }
    return ckpt.save_checkpoint(model, directory, meta)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


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


def run_defense(bench: Bench, spec: RunSpec, matrix: str, executor=None) -> RunReport:
    from bench.surrogates import check_transfer, transfer_cells

    recipe = resolve(spec)
    cells = matrix_cells(matrix, recipe.dataset.threat)  # a bad matrix fails before training
    check_transfer(matrix, recipe.dataset)
    row, trained = ensure_checkpoint(bench, recipe)
    build = _once(lambda: load_model(row, bench.device))
    ran = attack_checkpoint(bench, row, cells, build, executor)
    transfers, transfer_total = transfer_cells(bench, row, matrix, build)
    return RunReport(row, trained, ran + transfers, len(cells) + transfer_total)


def attack_checkpoint(bench: Bench, row: Checkpoint, cells: list[Cell],
                      model: Callable[[], torch.nn.Module], executor=None) -> list[str]:
    """Run the cells the store lacks for one stored checkpoint, commit each result as it
    arrives, and recompute the checkpoint's flags. `model` builds the model, and is only
    called (once) when a cell or the admission checks are missing. The checks choose how
    the cells run (bench.adaptive.adapt_cells). Returns the keys of the cells run."""
    from bench.adaptive import adapt_cells
    from bench.admission import ensure_admission
    from bench.flags import recompute_flags

    model = _once(model)
    # What the model does (randomness, zero gradients, ...) chooses how it is attacked.
    cells = adapt_cells(cells, ensure_admission(bench, row, model))
    done = bench.store.done_cells(row.id)
    missing = [c for c in cells if c.key not in done]
    ran: list[str] = []
    if missing:
        x, y = load_dataset(row.dataset, "test", bench.data_root)
        net = model()
        executor = executor or LocalExecutor()
        jobs = [EvalJob(net, c, x, y, bench.device, bench.batch_size(), fast=bench.fast) for c in missing]
        on_step, finish = _progress(bench, f"attack {row.defense} [{row.key[:8]}]", len(jobs))
        try:
            for i, (job, result) in enumerate(executor.map(jobs), 1):
                bench.store.add_evaluation(row.id, **result)
                ran.append(job.cell.key)
                if on_step:
                    on_step(i)
        finally:
            finish()
    recompute_flags(bench.store, row)
    return ran
