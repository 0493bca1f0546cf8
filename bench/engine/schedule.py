"""What a training run is told beside its loss: the schedule fields every defense shares
(TrainConfig), the optimizer they name and the learning rate at each point of training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.validate import at_least, in_range, non_negative, one_of, positive


@dataclass(frozen=True)
class TrainConfig:
    """Schedule fields shared by every defense (defaults suit digits: seconds on a CPU)."""

    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 64
    """Minibatch size of each process: trained on N workers (`--workers N`), each step
    sees a global batch of batch_size * N images."""
    optimizer: str = "adam"
    """`sgd` (with momentum, Nesterov off), `adam`, or `rmsprop` (Kannan et al.'s ImageNet
    optimizer: decay 0.9 and epsilon 1.0, `momentum` as for SGD)."""
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
        one_of("optimizer", self.optimizer, ("sgd", "adam", "rmsprop"))
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


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at `progress` epochs into training (fractional)."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * 0.1 ** sum(progress >= m for m in cfg.milestones)
    return cfg.lr


def optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `params`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        # The seed names RMSProp and no setting of it; decay 0.9 and epsilon 1.0 are the
        # InceptionV3 reference recipe's (Szegedy et al. 2016), which Kannan et al. trained.
        return torch.optim.RMSprop(
            params,
            lr=cfg.lr,
            alpha=0.9,
            eps=1.0,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
