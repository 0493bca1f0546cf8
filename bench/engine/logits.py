"""What a cell keeps of the logits besides its verdicts: their summary statistics (the
quantities the seeds explain robustness by) and the histograms the checkpoint page draws."""

from __future__ import annotations

import numpy as np
import torch

from bench.engine.losses import cw_margin


def logit_stats(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Summary statistics of logits: the quantities the seeds explain robustness by."""
    return {
        "mean": float(logits.mean()),
        "variance": float(logits.var()),
        "dynamic_range": float((logits.amax(1) - logits.amin(1)).mean()),
        # The logit gap (true logit minus the best other) is the CW margin, negated.
        "mean_gap": float(-cw_margin(logits, y).mean()),
    }


def histogram(clean: torch.Tensor, adv: torch.Tensor, bins: int = 40) -> dict:
    lo = float(min(clean.min(), adv.min()))
    hi = float(max(clean.max(), adv.max()))
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    return {
        "edges": [round(e, 5) for e in edges.tolist()],
        "clean": np.histogram(clean.numpy().ravel(), edges)[0].tolist(),
        "adv": np.histogram(adv.numpy().ravel(), edges)[0].tolist(),
    }
