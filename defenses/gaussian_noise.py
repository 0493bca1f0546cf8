"""Gaussian data augmentation: cross-entropy on x + N(0, sigma^2).

Shafahi et al.'s rows with alpha = beta = 0. Their CIFAR-10 sigma is in 0-255 units;
here sigma is always in [0, 1] pixel units (a CIFAR preset's 20 is 20/255).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import gaussian_noise


@dataclass(frozen=True)
class GaussianNoise:
    sigma: float = 0.5
    """Std of Gaussian input noise in [0, 1] pixel units; 0 is natural training."""

    def __post_init__(self):
        if not 0 <= self.sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1] pixel units (20/255 = 0.078), got {self.sigma}")


@register_defense("gaussian_noise", config=GaussianNoise)
def loss(model, x, y, cfg: GaussianNoise, ctx):
    """Cross-entropy on inputs with Gaussian noise."""
    return F.cross_entropy(model(gaussian_noise(x, cfg.sigma, ctx.generator)), y)
