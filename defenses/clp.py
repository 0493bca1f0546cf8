"""Clean logit pairing (Kannan et al., 2018), with Gaussian input noise.

loss = CE(f(x + n), y) + lambda * 2/m * sum_{i <= m/2} L(f(x_i + n_i), f(x_{i+m/2} + n_{i+m/2}))
Each example of the first half of the minibatch is paired with the one m/2 places on;
the training loop shuffles every epoch, so these are random pairs of clean examples,
mostly of different classes. L is the L2 pairing loss of `alp`. Kannan et al. add
Gaussian noise before pairing; with an odd batch the last example goes unpaired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import gaussian_noise, logit_pairing


@dataclass(frozen=True)
class CLP:
    pair_weight: float = 0.5
    """lambda: weight of the logit pairing loss between random pairs of clean examples."""
    sigma: float = 0.5
    """Std of Gaussian input noise in [0, 1] pixel units; 0 turns it off."""

    def __post_init__(self):
        if self.pair_weight < 0:
            raise ValueError(f"pair_weight must be non-negative, got {self.pair_weight}")
        if not 0 <= self.sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1] pixel units (20/255 = 0.078), got {self.sigma}")


@register_defense("clp", config=CLP)
def loss(model, x, y, cfg: CLP, ctx):
    """Cross-entropy on noisy inputs plus lambda times the L2 loss between random pairs."""
    logits = model(gaussian_noise(x, cfg.sigma, ctx.generator))
    ce = F.cross_entropy(logits, y)
    half = len(x) // 2
    if half == 0:  # a one-example batch has nothing to pair
        return ce
    return ce + cfg.pair_weight * logit_pairing(logits[:half], logits[half : 2 * half])
