"""The one training loop every defense shares.

The data sits on the device as two tensors, or streams to it from disk
(bench.core.trainsets); each epoch draws a seeded permutation and walks it in
minibatches; the defense's `loss(model, x, y, cfg, ctx)` gives the scalar to minimize.
Schedule, optimizer and augmentation are the shared TrainConfig (bench.engine.schedule),
so two defenses differ only in their loss. The same seed gives the same weights on the same
machine.

On a GPU the caller (the training job, bench.run.jobs, from the Workspace) turns on the fast path: channels-last
weights and inputs, and the loss (the training adversary included) under bf16 autocast,
with fp32 weights, optimizer and backward accumulation, so no loss scaling is needed.
Neither is on by default, and the CPU never uses them: its results stay bit for bit.

Data-parallel training (bench.run.distributed starts the processes) runs this same loop
in each of `workers` processes, synchronously, like Kannan et al.'s 53 workers: every
process draws the same seeded permutation, takes its slice of each global batch of
`batch_size * workers` images, and the gradients are averaged over the processes
before each step, so the step is that of one process at the global batch (up to the
order of float sums). One process is the default and is the loop above, bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bench.core.data import DatasetSpec, ThreatModel
from bench.core.models import build_model
from bench.core.trainsets import InMemory, TrainSet
from bench.engine.device import check_precision
from bench.engine.schedule import TrainConfig, lr_at, optimizer
from bench.validate import at_least, in_range


@dataclass(frozen=True)
class Shard:
    """Which process of a data-parallel training this is (the default: the only one)."""

    rank: int = 0
    """This process's place among the workers, 0 to workers - 1; rank 0's weights are kept."""
    workers: int = 1
    """Processes training one model together; each global batch is split among them."""

    def __post_init__(self):
        at_least("workers", self.workers, 1)
        in_range("rank", self.rank, 0, self.workers, high_open=True)


SINGLE = Shard()


def worker_seed(seed: int, rank: int) -> int:
    """The seed of one worker's own random numbers (noise, crops, training adversaries'
    starts): derived from (seed, rank) so that workers draw independent numbers and a
    rerun draws the same ones. The permutation of the data is not among them: every
    worker draws that from `seed` itself, so they agree on each global batch."""
    return int.from_bytes(hashlib.sha256(f"bench-worker:{seed}:{rank}".encode()).digest()[:8], "little") >> 1


def steps_per_epoch(n: int, batch_size: int, workers: int = 1) -> int:
    """Optimizer steps in an epoch over n images at `batch_size` per worker. A last global
    batch too small to give every worker an image is dropped (no worker may step on
    nothing while the others wait on it); a single process drops nothing."""
    full, rest = divmod(n, batch_size * workers)
    return full + (rest >= workers)


@dataclass
class TrainContext:
    """What a defense's loss may need besides the model and the batch."""

    num_classes: int
    threat: ThreatModel
    generator: torch.Generator
    """Seeded; draw every random number of a loss from it (noise, mixup, adversaries)."""
    order: torch.Generator | None = None
    """The generator of each epoch's permutation, where it is not `generator`: a
    data-parallel worker's, seeded alike on every worker while `generator` is its own.
    A single process draws both from `generator`, as every checkpoint before did."""
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    """Optimizer steps the whole training takes (set by `train`), for losses with schedules."""


@dataclass(frozen=True)
class TrainState:
    """Where a training stands at the end of an epoch: enough to go on from there and
    compute what an unbroken run computes. The tensors are the live ones (save them
    before the next step changes them)."""

    epochs_done: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor
    """The state of the context's generator (a data-parallel worker's own)."""
    order: torch.Tensor | None
    """The state of the permutation's generator, where it is its own."""
    losses: tuple[float, ...]
    epoch_seconds: tuple[float, ...]


@dataclass
class TrainResult:
    seconds: float
    losses: list[float] = field(default_factory=list)
    """Mean training loss per epoch."""
    epoch_seconds: list[float] = field(default_factory=list)
    """Wall time of each epoch (each ends by reading its loss, which waits for the device)."""


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops (and flips) done on the whole batch at once."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=generator, device=x.device)
    dy = torch.randint(0, 9, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    if kind == "crop_flip":
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _average_gradients(params: list[torch.nn.Parameter], workers: int) -> None:
    """The mean of every gradient over the workers, with one all-reduce of all of them
    (what DistributedDataParallel computes; see bench.run.distributed for why the loop
    does it itself). Every worker runs the same loss on the same model, so the same
    parameters have gradients on each."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= workers
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train(
    model: torch.nn.Module,
    loss_fn: Callable,
    cfg,
    train_cfg: TrainConfig,
    data: TrainSet,
    ctx: TrainContext,
    on_step: Callable[[int, int], None] | None = None,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    shard: Shard = SINGLE,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Minimize `loss_fn(model, xb, yb, cfg, ctx)` over `data` for train_cfg.epochs.

    `precision` `bf16` runs the loss under bf16 autocast; `channels_last` keeps weights
    and inputs NHWC while training (the weights are handed back in the default layout).
    `shard` makes this one worker of a data-parallel training (torch.distributed's
    process group open). `resume` goes on from an epoch's end; `on_epoch` is handed
    each epoch's end.
    """
    check_precision(precision)
    if data.augments and train_cfg.augment != "none":
        raise ValueError(
            f"augment={train_cfg.augment!r}: this training set crops and flips its images as it decodes them; "
            "leave augment at 'none'"
        )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, train_cfg)

    n, workers = len(data), shard.workers
    global_batch = train_cfg.batch_size * workers
    per_epoch = steps_per_epoch(n, train_cfg.batch_size, workers)
    total = per_epoch * train_cfg.epochs
    ctx.total_steps = total
    order_generator = ctx.order or ctx.generator
    result = TrainResult(seconds=0.0)
    if resume is not None:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        ctx.generator.set_state(resume.generator)
        if resume.order is not None:
            order_generator.set_state(resume.order)
        ctx.step = resume.step
        result.losses, result.epoch_seconds = list(resume.losses), list(resume.epoch_seconds)
    start = time.perf_counter()
    model.train()
    for epoch in range(len(result.losses), train_cfg.epochs):
        ctx.epoch = epoch
        epoch_start = time.perf_counter()
        order = torch.randperm(n, generator=order_generator, device=device)
        running = torch.zeros((), device=device)
        batches = [order[i * global_batch : (i + 1) * global_batch] for i in range(per_epoch)]
        # As even as can be; a short last batch leaves some workers one image fewer.
        shards = batches if workers == 1 else [b.tensor_split(workers)[shard.rank] for b in batches]
        for i, (xb, yb) in enumerate(data.batches(shards, epoch, device)):
            xb = augment(xb, train_cfg.augment, ctx.generator)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(train_cfg, epoch + i / per_epoch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model, xb, yb, cfg, ctx)
            # The loss is a mean over this worker's images; weighted by its share of the
            # global batch, the workers' mean gradient is that of the global batch's mean.
            share = len(yb) * workers / len(batches[i])
            if share != 1:
                loss = loss * share
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if workers > 1:
                _average_gradients(params, workers)
            opt.step()
            running += loss.detach()
            ctx.step += 1
            if on_step is not None:
                on_step(ctx.step, total)
        if workers > 1:  # the epoch's loss is that of all workers' images
            dist.all_reduce(running)
            running /= workers
        epoch_loss = float(running) / per_epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"training loss became {epoch_loss} in epoch {epoch + 1}")
        result.losses.append(epoch_loss)
        result.epoch_seconds.append(time.perf_counter() - epoch_start)
        if on_epoch is not None:
            on_epoch(
                TrainState(
                    epoch + 1,
                    ctx.step,
                    model.state_dict(),
                    opt.state_dict(),
                    ctx.generator.get_state(),
                    ctx.order.get_state() if ctx.order is not None else None,
                    tuple(result.losses),
                    tuple(result.epoch_seconds),
                )
            )
    model.eval()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    # A resumed training counts the epochs before the restart too.
    result.seconds = time.perf_counter() - start + sum(result.epoch_seconds[: len(resume.losses) if resume else 0])
    return result


def train_model(
    arch: str,
    spec: DatasetSpec,
    loss_fn: Callable,
    cfg,
    train_cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    device: str = "cpu",
    **kw,
) -> tuple[torch.nn.Module, TrainResult]:
    """`train_set_model` on images held in memory: (x, y) moved to `device` once."""
    return train_set_model(
        arch, spec, loss_fn, cfg, train_cfg, InMemory(x, y).to(device), seed=seed, device=device, **kw
    )


def train_set_model(
    arch: str,
    spec: DatasetSpec,
    loss_fn: Callable,
    cfg,
    train_cfg: TrainConfig,
    data: TrainSet,
    *,
    seed: int,
    device: str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    shard: Shard = SINGLE,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """The one way a training run opens: seed torch, build the architecture, seed the
    loss's generator, train on `data` (in memory on `device`, or streamed to it). Returns
    the eval-mode model.

    The seed fixes the initialization (torch's global generator, drawn by the layers'
    constructors) and every random number of the loop (the context's generator). A
    data-parallel worker (`shard`) builds the same initial weights and permutations from
    the seed, and draws its own random numbers from `worker_seed(seed, rank)`."""
    torch.manual_seed(seed)
    model = build_model(arch, spec).to(device)
    if shard.workers == 1:
        ctx = TrainContext(spec.num_classes, spec.threat, torch.Generator(device=device).manual_seed(seed))
    else:
        ctx = TrainContext(
            spec.num_classes,
            spec.threat,
            torch.Generator(device=device).manual_seed(worker_seed(seed, shard.rank)),
            order=torch.Generator(device=device).manual_seed(seed),
        )
    result = train(
        model,
        loss_fn,
        cfg,
        train_cfg,
        data,
        ctx,
        on_step=on_step,
        precision=precision,
        channels_last=channels_last,
        shard=shard,
        resume=resume,
        on_epoch=on_epoch,
    )
    return model.eval(), result
