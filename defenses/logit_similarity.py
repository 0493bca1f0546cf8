"""Batch-wise logit similarity (Shafahi et al.'s poster), with Gaussian input noise.

loss = CE(f(x + n), y) + beta' / b * ||Z - gamma||_F, where Z is the b x C matrix of the
batch's logits on noisy inputs. It clusters every logit around the scalar gamma; gamma =
0 is batch-wise logit squeezing (`logit_squeeze` with form = "batch"). The poster's
CIFAR-10 rows use gamma = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import gaussian_noise, logit_norm_per_batch


@dataclass(frozen=True)
class LogitSimilarity:
    beta: float = 0.5
    """beta': weight of the penalty ||Z - gamma||_F / batch size."""
    gamma: float = 1.0
    """The scalar every logit is pulled toward."""
    sigma: float = 0.5
    """Std of Gaussian input noise in [0, 1] pixel units; 0 turns it off."""

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")
        if not 0 <= self.sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1] pixel units (20/255 = 0.078), got {self.sigma}")


@register_defense("logit_similarity", config=LogitSimilarity)
def loss(model, x, y, cfg: LogitSimilarity, ctx):
    """Cross-entropy on noisy inputs plus beta' / b times ||Z - gamma||_F."""
    logits = model(gaussian_noise(x, cfg.sigma, ctx.generator))
    return F.cross_entropy(logits, y) + cfg.beta * logit_norm_per_batch(logits, cfg.gamma)
