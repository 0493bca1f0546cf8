"""Jobs: the units of work the driver hands to an executor. Each has `run() -> result`.

A job is a plain dataclass that can be pickled to a worker. Two class attributes tell an
executor how to move it: `SHARED` names fields many jobs hold the same object in (a
model, the test set), which a distributed executor ships once and lets every job read;
`LOCAL` names fields that only make sense in the driver's process (progress callbacks),
which such an executor drops. Jobs never touch the database: they return what the driver
commits. What they write is files, each atomically, under the results folder (which
several machines must share): a TrainJob its checkpoint folder, an EvalJob the inputs
that broke its images, a CraftJob its examples, so that a set larger than memory never
passes back whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bench.core.cells import Cell
from bench.core.data import load_dataset, training_set
from bench.core.images import StoredImages
from bench.core.provenance import device_name, git_commit, package_version
from bench.engine.cell import crafted_batches, logit_stats, run_cell
from bench.engine.fast import PLAIN, FastPath
from bench.engine.outcome import CellOutcome
from bench.engine.passes import Passes, counting
from bench.engine.train import train_set_model
from bench.engine.verdicts import predict
from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.run.distributed import DataParallelTraining, train_data_parallel
from bench.run.recipe import Recipe
from bench.store import checkpoints as ckpt
from bench.store.streamed import Streamed, write_streamed


@dataclass
class AttackJob:
    """One cell on one model and a test set: what EvalJob and CraftJob share."""

    SHARED: ClassVar[tuple[str, ...]] = ("model", "x", "y")
    LOCAL: ClassVar[tuple[str, ...]] = ()

    model: torch.nn.Module
    cell: Cell
    x: torch.Tensor
    y: torch.Tensor
    device: str
    batch_size: int
    fast: FastPath = PLAIN
    """The fast path craft and run_cell take (see Workspace.fast)."""
    label: str = ""
    """What the driver knows the job by (the checkpoint key); not used to compute."""

    def on_device(self) -> torch.nn.Module:
        # In place and a no-op where the model is on the device already (the local executor).
        return self.model.to(self.device)


@dataclass
class EvalJob(AttackJob):
    """Attack one model with one cell on (x, y); returns its CellOutcome (the row the store keeps)."""

    seed: int | None = None
    """The attack's seed; unset, the cell's own (derived from its key)."""
    images: np.ndarray | None = None
    """Test-set indices to run on (a cascade's cell); unset, the cell's own images."""
    keep: Path | None = None
    """The checkpoint's folder, where a plain cell writes the inputs that broke an image as
    it judges them (bench.engine.judged); like a TrainJob's, with several machines it must
    be on a folder they all share. Unset, they come back in the outcome."""

    def run(self) -> CellOutcome:
        return run_cell(
            self.on_device(),
            self.cell,
            self.x,
            self.y,
            device=self.device,
            batch_size=self.batch_size,
            seed=self.seed,
            fast=self.fast,
            images=self.images,
            keep=self.keep,
        )


@dataclass(frozen=True)
class Examples:
    """Adversarial examples crafted on a source model for others, read from the file they
    were written to, with what crafting them cost on the source (None for examples cached
    before passes were counted)."""

    x_adv: StoredImages
    passes: Passes | None


EXAMPLES = "x_adv"
"""The tensor a crafted file holds its examples under."""


def examples_cost(passes: Passes) -> dict[str, str]:
    """A crafted file's metadata for what crafting it cost, per image."""
    return {"forward_passes": repr(passes.forward), "backward_passes": repr(passes.backward)}


def read_cost(metadata: dict[str, str]) -> Passes | None:
    """What crafting a file's examples cost, from its metadata (None for a file written
    before passes were counted)."""
    if "forward_passes" in metadata and "backward_passes" in metadata:
        return Passes(float(metadata["forward_passes"]), float(metadata["backward_passes"]))
    return None


@dataclass
class CraftJob(AttackJob):
    """Adversarial examples of one cell on one (source) model, written batch by batch to
    the safetensors file `into` as they are crafted (never whole in memory: ImageNet's are
    3 GB), atomically. Like a TrainJob's folder, `into` is the one thing it writes: with
    several machines it must be on a folder they all share. Returns the examples as read
    from that file."""

    into: Path | None = None

    def run(self) -> Examples:
        if self.into is None:
            raise ValueError("a CraftJob writes its examples to a file: give it `into`")
        model = self.on_device()
        n = len(self.x)
        with counting(model) as count:
            batches = crafted_batches(
                model,
                self.cell,
                self.x,
                self.y,
                device=self.device,
                batch_size=self.batch_size,
                fast=self.fast,
                count=count,
            )
            passes = Passes(0.0, 0.0)

            def cost() -> dict[str, str]:  # called once the last batch is written
                nonlocal passes
                passes = Passes.per_image(count, n)
                return {"cell": self.cell.key, "source": self.label, **examples_cost(passes)}

            crafted = Streamed(EXAMPLES, torch.float32, (n, *self.x.shape[1:]), (x_adv for _, x_adv in batches))
            write_streamed(self.into, [crafted], cost)
        return Examples(StoredImages(self.into, EXAMPLES), passes)


@dataclass
class TrainJob:
    """Train one recipe and write its checkpoint folder; returns the folder's meta.

    The folder is the only thing a worker writes (atomically, see
    bench.store.checkpoints.save_checkpoint), so with several machines it must be a folder they
    all share; the driver records the checkpoint in the store. A recipe of several workers
    trains on Ray Train (bench.run.distributed) from wherever this job runs, which is the
    driver (bench.run.training), and the checkpoint is written here as any other.
    """

    SHARED: ClassVar[tuple[str, ...]] = ()
    LOCAL: ClassVar[tuple[str, ...]] = ("on_step",)

    recipe: Recipe
    directory: Path
    device: str
    data_root: str | None
    batch_size: int
    """Evaluation batch size (for the clean accuracy recorded in the meta)."""
    precision: str = "fp32"
    channels_last: bool = False
    on_step: Callable[[int, int], None] | None = None
    """Progress callback of the training loop (driver-side only)."""

    @property
    def label(self) -> str:
        return self.recipe.key

    def run(self) -> dict:
        recipe, device = self.recipe, self.device
        ds = recipe.dataset
        entry = DEFENSES.get(recipe.defense)
        x_test, y_test = load_dataset(ds.name, "test", self.data_root)
        try:
            if recipe.workers == 1:
                model, result = train_set_model(
                    recipe.arch,
                    ds,
                    entry.fn,
                    recipe.config,
                    recipe.train_config,
                    training_set(ds.name, self.data_root, recipe.seed).to(device),
                    seed=recipe.seed,
                    device=device,
                    on_step=self.on_step,
                    precision=self.precision,
                    channels_last=self.channels_last,
                )
            else:
                training = DataParallelTraining(
                    recipe.arch,
                    ds,
                    entry.fn,
                    recipe.config,
                    recipe.train_config,
                    recipe.seed,
                    recipe.workers,
                    device,
                    # Ray Train moves each worker into a folder of its own: a relative path would miss.
                    os.path.abspath(self.data_root) if self.data_root else None,
                    threads=torch.get_num_threads(),
                    precision=self.precision,
                    channels_last=self.channels_last,
                )
                model, result = train_data_parallel(training, self.directory, self.on_step)
        except FloatingPointError as exc:
            raise BenchError(
                f"training {recipe.defense!r} diverged: {exc}; lower lr or the regularization weight with --set"
            ) from exc
        logits = predict(model, x_test, device=device, batch_size=self.batch_size)
        meta = {
            "key": recipe.key,
            "defense": recipe.defense,
            "config": dataclasses.asdict(recipe.config),
            "train": recipe.train_record(),
            "dataset": ds.name,
            "arch": recipe.arch,
            "seed": recipe.seed,
            "epochs": recipe.train_config.epochs,
            "train_seconds": result.seconds,
            "train_losses": result.losses,
            "device": device_name(device),
            "preset": recipe.preset.name if recipe.preset else None,
            "paper": recipe.preset.paper if recipe.preset else {},
            "paper_threat": recipe.paper_threat,
            "preset_description": recipe.preset.description if recipe.preset else "",
            "preset_source": recipe.preset.source if recipe.preset else "",
            # The intra-op thread count changes float summation order, hence the weights.
            "torch_threads": torch.get_num_threads(),
            "clean_acc": float((logits.argmax(1) == y_test).float().mean()),
            "logit_stats": logit_stats(logits, y_test),
            "package_version": package_version(),
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "precision": self.precision,
        }
        if recipe.workers > 1:  # absent for one process, so its meta stays what it was
            meta["workers"] = recipe.workers
        return ckpt.save_checkpoint(model, self.directory, meta)


@dataclass(frozen=True)
class Failed:
    """What an executor yields instead of a result when a job raised."""

    reason: str
    """One line: the exception's type and first line of its message."""
    error: BaseException | None = None
    """The exception itself, where it could be brought back to the driver."""

    @classmethod
    def of(cls, exc: BaseException) -> Failed:
        first = (str(exc).strip().splitlines() or [""])[0]
        return cls(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, exc)
