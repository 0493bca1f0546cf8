"""Natural training: plain cross-entropy on clean examples."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.plugin import register_defense


@dataclass(frozen=True)
class Natural:
    """No hyperparameters of its own."""


@register_defense("natural", config=Natural)
def loss(model, x, y, cfg: Natural, ctx):
    """Cross-entropy on clean examples."""
    return F.cross_entropy(model(x), y)
