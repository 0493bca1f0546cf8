"""One checkpoint trained data-parallel on Ray Train: N worker processes, one model.

Ray Train's TorchTrainer starts N workers (one GPU each on CUDA, `threads` CPUs each on
the CPU) and opens torch.distributed among them: NCCL on GPUs, gloo on CPUs. Each
worker runs the one training loop (bench.engine.train) as `Shard(rank, N)`: the same
seeded permutation on every worker, its own slice of each global batch of
batch_size * N images, the gradients averaged over the workers before every step, so
that the step is that of one process at the global batch, synchronously, as Kannan et
al. trained on 53 workers. Each worker's own random numbers (noise, crops, training
adversaries' starts) come from `worker_seed(seed, rank)`.

The gradients are averaged by the loop itself, with one all-reduce per step of all of
them, rather than by wrapping the model in DistributedDataParallel: a defense's loss is
handed the model itself, and some need it bare (IBP reads its layers, the training
adversary takes gradients of the inputs alone, which leaves DDP's reducer waiting for a
backward pass that never comes). The arithmetic is DDP's: the mean of the workers'
gradients. What it forgoes is DDP's overlap of communication with the backward pass.

At every epoch's end each worker hands Ray Train a checkpoint (rank 0: the weights,
the optimizer, the step and the losses; every rank: its generators), kept in a hidden
folder beside the checkpoint's, under the shared results folder. A worker that dies is
replaced (FailureConfig.max_failures) and every worker goes on from the last epoch's
end. The driver then writes rank 0's weights as an ordinary checkpoint (bench.run.jobs),
which the bench attacks like any other, and deletes the folder. A folder left by a
driver killed mid-training is deleted when the training starts again, from its first
epoch: Ray Train would otherwise go on from it, which nothing here has tested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core.data import DatasetSpec, train_size, training_set
from bench.core.models import build_model
from bench.core.provenance import source_digest
from bench.engine.train import Shard, TrainConfig, TrainResult, TrainState, steps_per_epoch, train_set_model
from bench.errors import BenchError

MAX_FAILURES = 3
"""Worker deaths a training survives: each restarts every worker from the last epoch's end."""
KEEP_CHECKPOINTS = 2
"""Epoch-end checkpoints Ray Train keeps (the last one is all a restart needs)."""
_STATE = "state.pt"
_EPOCH_DIR = "epoch-{:05d}"


@dataclass(frozen=True)
class DataParallelTraining:
    """One recipe's training as every worker runs it (handed to each by Ray Train)."""

    arch: str
    dataset: DatasetSpec
    loss_fn: Callable
    config: Any
    """The defense's config."""
    train_config: TrainConfig
    seed: int
    workers: int
    device: str
    """`cpu` or `cuda` (each worker is given one GPU of its own)."""
    data_root: str | None
    threads: int = 1
    """CPUs of each worker, and its torch threads."""
    precision: str = "fp32"
    channels_last: bool = False


def _ray_train():
    """ray and ray.train, imported on first use: Ray is an optional extra (`[ray]`, which
    brings Ray Train's own needs), so the bench imports, and trains in one process,
    without it."""
    try:
        import ray
        import ray.train
        import ray.train.torch  # a submodule ray.train does not import itself
    except ImportError as exc:
        raise BenchError("--workers N needs Ray Train: pip install 'robustness-bench[ray]'") from exc
    return ray, ray.train


@contextlib.contextmanager
def cluster(workers: int) -> Iterator[None]:
    """The span of a command that may train data-parallel: a local Ray cluster that a
    training in it started (`connect`) is stopped at its end; one that was running before
    (`--executor ray`, a test session) is left alone. Nothing at all for one worker, and
    no Ray until a training needs it: a checkpoint found in the store starts nothing."""
    if workers == 1:
        yield
        return
    ray, _ = _ray_train()
    running = ray.is_initialized()
    try:
        yield
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()


def connect(training: DataParallelTraining) -> None:
    """Join the Ray cluster this process uses, or start a local one with CPUs enough for
    every worker (logical CPUs: Ray's own count, which may exceed the cores), then check
    it can hold them all (Ray Train would wait for them forever)."""
    ray, _ = _ray_train()
    if not ray.is_initialized():
        try:
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, training.workers * training.threads),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BenchError(f"cannot start a local Ray cluster for --workers: {str(exc).splitlines()[0]}") from exc
    have = ray.cluster_resources()
    need = {"CPU": training.workers * training.threads}
    if training.device != "cpu":
        need["GPU"] = training.workers
    short = [f"{n:g} {k} (it has {have.get(k, 0):g})" for k, n in need.items() if have.get(k, 0) < n]
    if short:
        raise BenchError(
            f"--workers {training.workers} needs {' and '.join(short)} in the Ray cluster; "
            "lower --workers or --threads, or add nodes (`ray start --address HEAD:6379`)"
        )


def train_data_parallel(
    training: DataParallelTraining, directory: Path, on_step: Callable[[int, int], None] | None = None
) -> tuple[torch.nn.Module, TrainResult]:
    """Train on `training.workers` Ray Train workers; rank 0's model (eval mode, on
    `training.device`) and its losses. `directory` is the checkpoint folder to be: Ray Train's epoch
    checkpoints go beside it, and are removed once the training is done. `on_step`
    advances a progress bar at each epoch's end."""
    _, train = _ray_train()
    connect(training)
    storage = directory.resolve().parent
    name = f".train-{directory.name}"
    run_dir = storage / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a killed driver's (see the module's docstring)
    trainer = train.torch.TorchTrainer(
        _worker,
        train_loop_config={"training": training, "digest": source_digest()},
        scaling_config=train.ScalingConfig(
            num_workers=training.workers,
            use_gpu=training.device.startswith("cuda"),
            resources_per_worker={"CPU": training.threads, **({"GPU": 1} if training.device != "cpu" else {})},
        ),
        run_config=train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=train.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    with _epoch_progress(run_dir, training, on_step):
        try:
            result = trainer.fit()
        except train.TrainingFailedError as exc:
            raise BenchError(
                f"data-parallel training on {training.workers} workers failed "
                f"(after up to {MAX_FAILURES} restarts): {_first_line(exc)}"
            ) from exc
    if "diverged" in result.metrics:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise FloatingPointError(result.metrics["diverged"])
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / _STATE, map_location="cpu", weights_only=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # the stored checkpoint replaces it
    model = build_model(training.arch, training.dataset)
    model.load_state_dict(state["model"])
    seconds = list(state["epoch_seconds"])
    return model.to(training.device).eval(), TrainResult(
        seconds=sum(seconds), losses=list(state["losses"]), epoch_seconds=seconds
    )


def _first_line(exc: BaseException) -> str:
    """The first line of the worker's own error where Ray kept it, else of Ray's."""
    failures = getattr(exc, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _epoch_progress(
    run_dir: Path, training: DataParallelTraining, on_step: Callable[[int, int], None] | None
) -> Iterator[None]:
    """Advance `on_step` as epoch checkpoints appear in Ray Train's run folder (the driver
    sees no step of the workers; it sees what they report)."""
    if on_step is None:
        yield
        return
    cfg = training.train_config
    per_epoch = steps_per_epoch(train_size(training.dataset.name, training.data_root), cfg.batch_size, training.workers)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):  # the older folders are deleted: the newest tells the epoch
            done = max((int(p.name.removeprefix("epoch-")) for p in run_dir.glob("epoch-*")), default=0)
            on_step(min(done, cfg.epochs) * per_epoch, cfg.epochs * per_epoch)

    watcher = threading.Thread(target=poll, name="bench-epoch-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


# --- in each worker -----------------------------------------------------------------------
def _worker(loop_config: dict) -> None:
    """The body of every Ray Train worker: resume where the last epoch ended, train as
    this worker's shard, hand Ray Train a checkpoint at each epoch's end."""
    _, train = _ray_train()
    training: DataParallelTraining = loop_config["training"]
    if source_digest() != loop_config["digest"]:
        raise BenchError(
            "this Ray worker runs other bench code than the driver; restart the run with one version everywhere"
        )
    context = train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    torch.set_num_threads(training.threads)
    device = str(train.torch.get_device()) if training.device != "cpu" else "cpu"
    data = training_set(training.dataset.name, training.data_root, training.seed).to(device)
    if steps_per_epoch(len(data), training.train_config.batch_size, shard.workers) == 0:
        raise BenchError(f"{len(data)} training images cannot be shared among {shard.workers} workers")

    def on_epoch(state: TrainState) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"generator": state.generator, "order": state.order}, Path(folder) / f"rank-{shard.rank}.pt")
            if shard.rank == 0:
                torch.save(
                    {
                        "epochs_done": state.epochs_done,
                        "step": state.step,
                        "model": state.model,
                        "optimizer": state.optimizer,
                        "losses": list(state.losses),
                        "epoch_seconds": list(state.epoch_seconds),
                    },
                    Path(folder) / _STATE,
                )
            # Every worker reports into the same folder name, so their files meet in one checkpoint.
            train.report(
                {"epoch": state.epochs_done, "loss": state.losses[-1]},
                checkpoint=train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=_EPOCH_DIR.format(state.epochs_done),
            )

    try:
        train_set_model(
            training.arch,
            training.dataset,
            training.loss_fn,
            training.config,
            training.train_config,
            data,
            seed=training.seed,
            device=device,
            precision=training.precision,
            channels_last=training.channels_last,
            shard=shard,
            resume=_resume_state(train.get_checkpoint(), shard.rank, device),
            on_epoch=on_epoch,
        )
    except FloatingPointError as exc:
        # Every worker sees the same all-reduced loss and stops at the same epoch; a
        # restart would diverge again, so it is reported, not raised.
        train.report({"diverged": str(exc)})


def _resume_state(checkpoint: Any, rank: int, device: str) -> TrainState | None:
    """The TrainState of Ray Train's last checkpoint for this rank, or None at the start."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        common = torch.load(Path(folder) / _STATE, map_location=device, weights_only=True)
        own = torch.load(Path(folder) / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
    return TrainState(
        common["epochs_done"],
        common["step"],
        common["model"],
        common["optimizer"],
        own["generator"],
        own["order"],
        tuple(common["losses"]),
        tuple(common["epoch_seconds"]),
    )
