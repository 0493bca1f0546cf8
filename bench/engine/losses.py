"""Per-sample attack objectives on logits; an attack ascends them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def xent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: the best wrong logit minus the true logit (>0 = broken)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - true


LOSSES = {"xent": xent, "cw": cw_margin}
