"""A distilled-surrogate attack: the witness for models whose gradients say nothing.

A model that rounds its input, or hides behind a custom backward, or adds noise at every
pass, gives gradient attacks nothing to follow; averaging zero gradients over passes (EOT)
still gives zero. This attack needs no gradient from the model at all. It queries the
model's answers, by a majority of passes so that its noise averages out, on the images
under attack and on random points of their threat balls; trains a small differentiable
network to give the same answers there (Papernot et al. 2017's black-box substitute,
queried where the substitute must agree with the model: inside the balls the attack
searches); attacks that network with PGD on cross-entropy and on the margin; and keeps,
per image, the candidate the model itself misclassifies in most of its passes.

The surrogate is trained on the queries about the batch it is given, not on a training
set: what the model does inside these balls is all it has to learn, and an attack plugin
sees no other data. Written here rather than taken from a library because none ships a
substitute trained on a model's answers inside a threat model's balls; the PGD is the
bench's own (`attacks.pgd.plain_pgd`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import PGD, plain_pgd
from bench.plugin import NORMS, Crafted, Role, at_least, one_of, radius, register_attack, seed_from


@dataclass(frozen=True)
class Distill:
    role: ClassVar[Role] = Role.WITNESS
    """The masking witness: a surrogate distilled from the model's answers."""
    queries_only: ClassVar[bool] = True
    """Reads only the model's outputs: on a randomized model it takes the noise as it
    comes (majorities of passes), with no EOT wrapper around the model."""
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    copies: int = 15
    """Random points of each image's ball queried besides the image itself."""
    label_votes: int = 3
    """Passes of the model whose majority labels each query (odd)."""
    epochs: int = 20
    """Passes of the surrogate's training over the queries."""
    steps: int = 50
    """PGD steps on the surrogate per candidate."""
    restarts: int = 2
    """Random starts per loss (cross-entropy and margin): 2 * restarts candidates."""
    judge_votes: int = 5
    """Passes of the model judging each candidate; the one it misclassifies most is kept."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        radius("eps", self.eps, self.norm)
        for name in ("copies", "epochs", "steps", "restarts"):
            at_least(name, getattr(self, name), 1)
        for name in ("label_votes", "judge_votes"):
            at_least(name, getattr(self, name), 1)

    def with_threat(self, threat) -> Distill:
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"


def surrogate_net(shape: tuple[int, int, int], classes: int) -> nn.Module:
    """A small CNN for any (C, H, W) input: two stride-2 convolutions, then two layers."""
    c, h, w = shape
    side = ((h + 3) // 4) * ((w + 3) // 4)
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def in_ball(x: torch.Tensor, cfg: Distill, generator) -> torch.Tensor:
    """A uniform point of each L-inf box, or of each L2 ball's surface scaled by a uniform
    radius, clipped to [0, 1]."""
    if cfg.norm == "linf":
        noise = (2 * torch.rand(x.shape, generator=generator, device=x.device) - 1) * cfg.eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        noise = d * cfg.eps * torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
    return (x + noise).clamp(0, 1)


@torch.no_grad()
def vote(model, x: torch.Tensor, votes: int, classes: int, batch: int = 4096) -> torch.Tensor:
    """Per input, how many of `votes` passes give each class: (n, classes)."""
    counts = torch.zeros(len(x), classes, device=x.device)
    for _ in range(votes):
        for i in range(0, len(x), batch):
            pred = model(x[i : i + batch]).argmax(1)
            counts[i : i + batch].scatter_add_(1, pred[:, None], torch.ones(len(pred), 1, device=x.device))
    return counts


def fit(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, epochs: int, generator) -> nn.Module:
    """Train `net` to give `labels` on `x` (Adam, batches of 128, shuffled by the generator)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator, device=x.device)
            for i in range(0, len(x), 128):
                idx = order[i : i + 128]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[idx]), labels[idx]).backward()
                opt.step()
    return net.eval().requires_grad_(False)


@register_attack("distill", config=Distill)
def perturb(model, x, y, cfg: Distill, *, generator=None) -> Crafted:
    """PGD on a surrogate distilled from the model's majority answers in the balls of x."""
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    queries = torch.cat([x] + [in_ball(x, cfg, generator) for _ in range(cfg.copies)])
    labels = vote(model, queries, cfg.label_votes, classes).argmax(1)
    # The surrogate's initial weights come from the cell's generator, through a forked
    # global generator (nn.init draws from it), so the cell is reproducible.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_from(generator))
        net = surrogate_net(tuple(x.shape[1:]), classes).to(x.device)
    fit(net, queries, labels, cfg.epochs, generator)
    best, best_miss = x.clone(), vote(model, x, cfg.judge_votes, classes).gather(1, y[:, None]).squeeze(1)
    best_miss = cfg.judge_votes - best_miss  # passes that misclassify
    step = cfg.eps / 8  # long strides: a candidate deep in the surrogate's wrong class transfers best
    for loss in ("xent", "cw"):
        pgd = PGD(eps=cfg.eps, steps=cfg.steps, step_size=step, loss=loss, norm=cfg.norm)
        for _ in range(cfg.restarts):
            candidate = plain_pgd(net, x, y, pgd, generator)
            miss = cfg.judge_votes - vote(model, candidate, cfg.judge_votes, classes).gather(1, y[:, None]).squeeze(1)
            better = miss > best_miss
            best[better], best_miss[better] = candidate[better], miss[better]
    return Crafted(best.detach())
