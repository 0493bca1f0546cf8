"""mixup (Zhang et al., "mixup: Beyond empirical risk minimization", ICLR 2018).

Train on lam x_i + (1 - lam) x_j against lam y_i + (1 - lam) y_j, lam ~ Beta(alpha,
alpha), each example paired with a random partner of its minibatch. Summers & Dinneen
report it lifts FGSM accuracy but not PGD accuracy; it is LRM's mixing on SVHN.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plugin import register_defense
from defenses._parts import mixup, smoothed_targets, soft_cross_entropy


@dataclass(frozen=True)
class Mixup:
    mix_alpha: float = 1.0
    """alpha of Beta(alpha, alpha), the law of the mixing weight; 1 is uniform."""

    def __post_init__(self):
        if not self.mix_alpha > 0:
            raise ValueError(f"mix_alpha must be positive, got {self.mix_alpha}")


@register_defense("mixup", config=Mixup)
def loss(model, x, y, cfg: Mixup, ctx):
    """Cross-entropy of mixed examples against their mixed one-hot labels."""
    x_mix, targets = mixup(x, smoothed_targets(y, ctx.num_classes, 0.0), cfg.mix_alpha, ctx.generator)
    return soft_cross_entropy(model(x_mix), targets)
