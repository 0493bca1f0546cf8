"""PGD adversarial training (Madry et al., 2018), optionally mixed with clean examples
and with logit squeezing on top.

loss = a CE(f(x), y) + (1 - a) CE(f(x_adv), y)
       + squeeze_beta (a ||f(x)||^2 + (1 - a) ||f(x_adv)||^2)
with x_adv from L-inf PGD-k on cross-entropy from a random start and a = clean_weight:
a = 0 is Madry et al.'s adversarial-only training (Summers & Dinneen Sec. 5.2), a = 0.5
Kannan et al.'s mixed-minibatch M-PGD (Goodfellow et al.'s weighting, Summers & Dinneen
Eq. 1). The squeeze term is the "L2 regularization on the logits" Summers & Dinneen add
to adversarial training in Fig. 1, weighted over the examples the way their
cross-entropy is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import TrainingAdversary, logit_sq_norm, training_adversary


@dataclass(frozen=True)
class PGDAT(TrainingAdversary):
    clean_weight: float = 0.0
    """a: weight of the clean examples' loss; 0 adversarial-only, 0.5 mixed minibatch."""
    squeeze_beta: float = 0.0
    """Weight of the squared logit norm (logit squeezing); 0 turns it off."""

    def __post_init__(self):
        if not 0 <= self.clean_weight <= 1:
            raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
        if self.squeeze_beta < 0:
            raise ValueError(f"squeeze_beta must be non-negative, got {self.squeeze_beta}")
        super().__post_init__()


@register_defense("pgd_at", config=PGDAT)
def loss(model, x, y, cfg: PGDAT, ctx):
    """PGD-k adversarial training (Madry et al.), clean-mixed by clean_weight."""
    x_adv = training_adversary(model, x, y, cfg, ctx)
    a = cfg.clean_weight
    if a == 0:  # adversarial-only: the clean examples need no forward pass
        adv = model(x_adv)
        return F.cross_entropy(adv, y) + cfg.squeeze_beta * logit_sq_norm(adv)
    # One forward pass over the mixed minibatch, so batch norm sees it as one batch.
    clean, adv = model(torch.cat([x, x_adv])).split(len(x))
    ce = a * F.cross_entropy(clean, y) + (1 - a) * F.cross_entropy(adv, y)
    squeeze = a * logit_sq_norm(clean) + (1 - a) * logit_sq_norm(adv)
    return ce + cfg.squeeze_beta * squeeze
