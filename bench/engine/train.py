"""The one training loop every defense shares.

The data sits on the device as two tensors; each epoch draws a seeded permutation and
walks it in minibatches; the defense's `loss(model, x, y, cfg, ctx)` gives the scalar to
minimize. Schedule, optimizer and augmentation are the shared TrainConfig below, so two
defenses differ only in their loss. The same seed gives the same weights on the same
machine.

On a GPU the caller (the training job, bench.run.jobs, from the Workspace) turns on the fast path: channels-last
weights and inputs, and the loss (the training adversary included) under bf16 autocast,
with fp32 weights, optimizer and backward accumulation, so no loss scaling is needed.
Neither is on by default, and the CPU never uses them: its results stay bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.core.data import DatasetSpec, ThreatModel
from bench.core.models import build_model
from bench.engine.device import check_precision
from bench.validate import at_least, in_range, non_negative, one_of, positive


@dataclass(frozen=True)
class TrainConfig:
    """Schedule fields shared by every defense (defaults suit digits: seconds on a CPU)."""

    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 64
    """Minibatch size."""
    optimizer: str = "adam"
    """`sgd` (with momentum, Nesterov off) or `adam`."""
    lr: float = 0.003
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    schedule: str = "cosine"
    """`cosine` to zero, `step` (x0.1 at each milestone epoch) or `constant`."""
    milestones: tuple[int, ...] = ()
    """Epochs at which `step` divides the learning rate by 10."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 over this many epochs (Summers & Dinneen use 5)."""
    augment: str = "none"
    """`none`, `crop` (4-pixel pad and random crop) or `crop_flip` (plus horizontal flips)."""

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        one_of("optimizer", self.optimizer, ("sgd", "adam"))
        one_of("schedule", self.schedule, ("cosine", "step", "constant"))
        one_of("augment", self.augment, ("none", "crop", "crop_flip"))
        at_least("epochs", self.epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        positive("lr", self.lr)
        in_range("momentum", self.momentum, 0, 1, high_open=True)
        non_negative("weight_decay", self.weight_decay)
        non_negative("warmup_epochs", self.warmup_epochs)
        for m in self.milestones:
            at_least("each milestone", m, 1)


@dataclass
class TrainContext:
    """What a defense's loss may need besides the model and the batch."""

    num_classes: int
    threat: ThreatModel
    generator: torch.Generator
    """Seeded; draw every random number of a loss from it (noise, mixup, adversaries)."""
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    """Optimizer steps the whole training takes (set by `train`), for losses with schedules."""


@dataclass
class TrainResult:
    seconds: float
    losses: list[float] = field(default_factory=list)
    """Mean training loss per epoch."""
    epoch_seconds: list[float] = field(default_factory=list)
    """Wall time of each epoch (each ends by reading its loss, which waits for the device)."""


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at `progress` epochs into training (fractional)."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * 0.1 ** sum(progress >= m for m in cfg.milestones)
    return cfg.lr


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


def train(
    model: torch.nn.Module,
    loss_fn: Callable,
    cfg,
    train_cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: TrainContext,
    on_step: Callable[[int, int], None] | None = None,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
) -> TrainResult:
    """Minimize `loss_fn(model, xb, yb, cfg, ctx)` over (x, y) for train_cfg.epochs.

    `precision` `bf16` runs the loss under bf16 autocast; `channels_last` keeps weights
    and inputs NHWC while training (the weights are handed back in the default layout).
    """
    check_precision(precision)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if train_cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    n = len(x)
    per_epoch = math.ceil(n / train_cfg.batch_size)
    total = per_epoch * train_cfg.epochs
    ctx.total_steps = total
    result = TrainResult(seconds=0.0)
    start = time.perf_counter()
    model.train()
    for epoch in range(train_cfg.epochs):
        ctx.epoch = epoch
        epoch_start = time.perf_counter()
        order = torch.randperm(n, generator=ctx.generator, device=x.device)
        running = torch.zeros((), device=x.device)
        for i in range(per_epoch):
            idx = order[i * train_cfg.batch_size : (i + 1) * train_cfg.batch_size]
            xb = augment(x[idx], train_cfg.augment, ctx.generator)
            for group in opt.param_groups:
                group["lr"] = lr_at(train_cfg, epoch + i / per_epoch)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model, xb, y[idx], cfg, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            ctx.step += 1
            if on_step is not None:
                on_step(ctx.step, total)
        epoch_loss = float(running) / per_epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"training loss became {epoch_loss} in epoch {epoch + 1}")
        result.losses.append(epoch_loss)
        result.epoch_seconds.append(time.perf_counter() - epoch_start)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - start
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
    on_step: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[torch.nn.Module, TrainResult]:
    """The one way a training run opens: seed torch, build the architecture, seed the
    loss's generator, train on (x, y) moved to `device`. Returns the eval-mode model.

    The seed fixes the initialization (torch's global generator, drawn by the layers'
    constructors) and every random number of the loop (the context's generator)."""
    torch.manual_seed(seed)
    model = build_model(arch, spec).to(device)
    ctx = TrainContext(spec.num_classes, spec.threat, torch.Generator(device=device).manual_seed(seed))
    result = train(
        model,
        loss_fn,
        cfg,
        train_cfg,
        x.to(device),
        y.to(device),
        ctx,
        on_step=on_step,
        precision=precision,
        channels_last=channels_last,
    )
    return model.eval(), result
