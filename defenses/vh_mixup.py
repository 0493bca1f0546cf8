"""VH-mixup (Summers & Dinneen, "Improved mixed-example data augmentation", WACV 2019).

Each example x1 is paired with a random partner x2 of its minibatch. A vertical
concatenation (the top floor(lam1 H) rows of x1 over the rest of x2) and a horizontal
concatenation (the left floor(lam2 W) columns of x1 beside the rest of x2) are mixed by
mixup, lam3 * vertical + (1 - lam3) * horizontal; lam1, lam2, lam3 ~ Beta(alpha, alpha),
uniform at alpha = 1 as the authors used. The label is the same combination of the
labels, each concatenation weighted by the share of x1's pixels in it. It is the mixing
LRM uses on CIFAR-10/100 (`defenses._parts.vh_mixup` has the details).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plugin import register_defense
from defenses._parts import smoothed_targets, soft_cross_entropy, vh_mixup


@dataclass(frozen=True)
class VHMixup:
    mix_alpha: float = 1.0
    """alpha of Beta(alpha, alpha), the law of all three coefficients; 1 is uniform."""

    def __post_init__(self):
        if not self.mix_alpha > 0:
            raise ValueError(f"mix_alpha must be positive, got {self.mix_alpha}")


@register_defense("vh_mixup", config=VHMixup)
def loss(model, x, y, cfg: VHMixup, ctx):
    """Cross-entropy of VH-mixed examples against their mixed one-hot labels."""
    x_mix, targets = vh_mixup(x, smoothed_targets(y, ctx.num_classes, 0.0), cfg.mix_alpha, ctx.generator)
    return soft_cross_entropy(model(x_mix), targets)
