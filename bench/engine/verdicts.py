"""Verdicts: a model's logits on a set, and the seeded majority of passes that judges a
randomized model; EOT, the mean-logit view of a randomized model that gradient attacks
see (Expectation over Transformation)."""

from __future__ import annotations

import contextlib

import torch

from bench.core.images import Images
from bench.engine.device import autocast, frozen, full_fp32, memory_format, on_device, seeded_noise


@torch.no_grad()
def predict(
    model, x: Images, *, device: str, batch_size: int, precision: str = "fp32", channels_last: bool = False
) -> torch.Tensor:
    """Logits (fp32, on the CPU) for x, in batches on `device`; the model's mode is restored.
    In fp32 they are true fp32 (no TF32 on CUDA), as every verdict must be. A tensor moves
    to the device whole, held images (bench.core.images) a batch at a time."""
    xd = on_device(x, device, channels_last) if isinstance(x, torch.Tensor) else x
    arithmetic = full_fp32() if precision == "fp32" else contextlib.nullcontext()
    logits: torch.Tensor | None = None
    with frozen(model), memory_format(model, channels_last), autocast(device, precision), arithmetic:
        for i in range(0, len(x), batch_size):
            z = model(on_device(xd[i : i + batch_size], device, channels_last)).float()
            if logits is None:  # one tensor for the set, filled batch by batch (bench.engine.judged says why)
                logits = torch.empty(len(x), *z.shape[1:], device=z.device)
            logits[i : i + len(z)] = z
    return torch.empty(0, 0) if logits is None else logits.cpu()


def in_top5(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, whether the label is among the five largest logits (all of them, with
    five classes or fewer): the top-5 verdict of Kannan et al.'s ImageNet tables."""
    k = min(5, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1)


class EOT(torch.nn.Module):
    """The mean logits of `passes` forward passes of a randomized model."""

    def __init__(self, model: torch.nn.Module, passes: int):
        super().__init__()
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        self.model, self.passes = model, passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.passes)]).mean(0)


@torch.no_grad()
def majority_correct(
    model, x: Images, y: torch.Tensor, votes: int, *, device: str, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """Per sample: more than half of `votes` forward passes classify it correctly (on the CPU).

    The passes draw from torch's generators seeded with `seed` (restored afterwards), so
    every verdict on the same batch uses the same noise: the clean verdict is the same
    in every cell, and an input an attack barely moved gets the verdict its clean input
    got, instead of a fresh coin flip per cell that the per-sample AND would pile up.
    """
    hits = torch.zeros(len(y), dtype=torch.int64)
    with seeded_noise(device, seed):
        for _ in range(votes):
            hits += (predict(model, x, device=device, batch_size=batch_size).argmax(1) == y).long()
    return 2 * hits > votes
