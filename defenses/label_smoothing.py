"""Label smoothing, optionally with Gaussian input noise.

Summers & Dinneen (Eq. 8) train on soft targets: 1 - s on the true class and s / (C - 1)
on every other. Shafahi et al. write the same family as y_warm = y_hot - alpha (y_hot -
1/C), which is s = alpha (C - 1) / C (`defenses._parts.alpha_to_smoothing`; presets
taken from Shafahi et al.'s tables convert with it), and find it robust only together
with Gaussian noise on the inputs, hence `sigma`.

loss = H(targets_s, softmax(f(x + n))), n ~ N(0, sigma^2).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plugin import register_defense
from defenses._parts import gaussian_noise, smoothed_targets, soft_cross_entropy


@dataclass(frozen=True)
class LabelSmoothing:
    smoothing: float = 0.1
    """s: probability mass moved off the true class, spread evenly over the others."""
    sigma: float = 0.0
    """Std of Gaussian input noise in [0, 1] pixel units; 0 turns it off."""

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not 0 <= self.sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1] pixel units (20/255 = 0.078), got {self.sigma}")


@register_defense("label_smoothing", config=LabelSmoothing)
def loss(model, x, y, cfg: LabelSmoothing, ctx):
    """Cross-entropy against smoothed labels, on inputs with Gaussian noise."""
    logits = model(gaussian_noise(x, cfg.sigma, ctx.generator))
    return soft_cross_entropy(logits, smoothed_targets(y, ctx.num_classes, cfg.smoothing))
