"""Logit squeezing with Gaussian noise (Kannan et al.; Shafahi et al. Eq. 5; the poster).

loss = CE(f(x + n), y) + beta * penalty(f(x + n)), n ~ N(0, sigma^2), where the penalty
is each example's logit norm averaged over the batch (`form = "example"`, Kannan et
al.) or the Frobenius norm of the batch's logits divided by the batch size
(`form = "batch"`, the poster's batch-wise squeezing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.plugin import register_defense
from defenses._parts import gaussian_noise, logit_norm_per_batch, logit_norm_per_example


@dataclass(frozen=True)
class LogitSqueeze:
    beta: float = 0.5
    """Weight of the logit-norm penalty."""
    sigma: float = 0.5
    """Std of Gaussian input noise in [0, 1] pixel units; 0 turns it off."""
    form: str = "batch"
    """`example`: mean per-example norm; `batch`: ||Z||_F / batch size."""

    def __post_init__(self):
        if self.form not in ("example", "batch"):
            raise ValueError(f"form must be 'example' or 'batch', got {self.form!r}")
        if self.beta < 0 or self.sigma < 0:
            raise ValueError("beta and sigma must be non-negative")


def squeeze_penalty(logits, form: str):
    return logit_norm_per_batch(logits) if form == "batch" else logit_norm_per_example(logits)


@register_defense("logit_squeeze", config=LogitSqueeze)
def loss(model, x, y, cfg: LogitSqueeze, ctx):
    """Cross-entropy on noisy inputs plus beta times the logit norm."""
    logits = model(gaussian_noise(x, cfg.sigma, ctx.generator))
    return F.cross_entropy(logits, y) + cfg.beta * squeeze_penalty(logits, cfg.form)
