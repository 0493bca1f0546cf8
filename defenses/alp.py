"""Adversarial logit pairing (Kannan et al., 2018; Summers & Dinneen Eq. 2).

loss = a CE(f(x), y) + (1 - a) CE(f(x_adv), y) + lambda * L(f(x), f(x_adv))
       + squeeze_beta (a ||f(x)||^2 + (1 - a) ||f(x_adv)||^2)
L is the L2 pairing loss (`defenses._parts.logit_pairing`: the mean squared difference
of the two logit batches), x_adv comes from L-inf PGD-k from a random start, a =
clean_weight (Kannan et al. pair on top of mixed-minibatch M-PGD, a = 0.5; Summers &
Dinneen's baselines train on adversarial examples only, a = 0, yet still pair them with
their clean logits). The squeeze term is Summers & Dinneen's Fig. 1 experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import TrainingAdversary, logit_pairing, logit_sq_norm, training_adversary


@dataclass(frozen=True)
class ALP(TrainingAdversary):
    clean_weight: float = 0.5
    """a: weight of the clean examples' cross-entropy; 0.5 is M-PGD, 0 adversarial-only."""
    pair_weight: float = 0.5
    """lambda: weight of the clean-adversarial logit pairing loss."""
    squeeze_beta: float = 0.0
    """Weight of the squared logit norm (logit squeezing); 0 turns it off."""

    def __post_init__(self):
        if not 0 <= self.clean_weight <= 1:
            raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
        if self.pair_weight < 0 or self.squeeze_beta < 0:
            raise ValueError(
                f"pair_weight and squeeze_beta must be non-negative, got {self.pair_weight} and {self.squeeze_beta}"
            )
        super().__post_init__()


@register_defense("alp", config=ALP)
def loss(model, x, y, cfg: ALP, ctx):
    """M-PGD plus lambda times the L2 loss between clean and adversarial logits."""
    x_adv = training_adversary(model, x, y, cfg, ctx)
    clean, adv = model(torch.cat([x, x_adv])).split(len(x))
    a = cfg.clean_weight
    ce = a * F.cross_entropy(clean, y) + (1 - a) * F.cross_entropy(adv, y)
    squeeze = a * logit_sq_norm(clean) + (1 - a) * logit_sq_norm(adv)
    return ce + cfg.pair_weight * logit_pairing(clean, adv) + cfg.squeeze_beta * squeeze
