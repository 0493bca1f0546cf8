"""The verdicts of a verifier cell, held to what the model itself does.

Two kinds of cell return per-image verdicts besides their inputs (attacks/verify.py,
attacks/certify.py), each a record of bench.core.contract that the cell's kind names:

- a complete verifier: per image `robust` (no input of the ball changes the label),
  `not_robust` (with a counterexample, returned as the cell's adversarial input) or
  `unknown` (its time ran out). Its robust bits are the model's fp32 verdicts on those
  inputs, like any attack's: a counterexample that the model classifies correctly, or a
  misclassified image called robust, is a bug in the verifier, and fails the cell.
- a certified bound: per image whether a sound relaxation proves it robust. Its robust
  bits are the certified bits (a lower bound on the truth: the cell's kind keeps it out
  of the worst case).

Either way the images proven robust are the cell's proven bits, stored beside its
robust bits. The stored extra keeps the counts and the per-image cost, and the spread
of the fp32 tolerances the verifier's margins had to exceed (bench.verify.rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench.core.contract import CertifiedVerdicts, CompleteVerdicts
from bench.core.kinds import CellKind

STATUSES = ("robust", "not_robust", "unknown")


def _spread(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
        "total": float(values.sum()),
    }


def verified(
    kind: CellKind, parts: Sequence, clean: torch.Tensor, robust: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the cell's robust bits, its proven bits, its extra) from the verdicts a verifier
    cell of `kind` returned, batch by batch (`parts`), `clean` and `robust` being the
    model's fp32 verdicts on the clean and returned inputs."""
    if kind is CellKind.CERTIFY:
        return _certified(CertifiedVerdicts.concat(list(parts)), clean)
    return _complete(CompleteVerdicts.concat(list(parts)), robust)


def _certified(verdicts: CertifiedVerdicts, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    certified = verdicts.certified.bool()
    if bool((certified & ~clean).any()):
        raise RuntimeError("certify: an image the model misclassifies was certified robust")
    margin = verdicts.margin.double().numpy()
    extra = {
        "certified": {
            "count": int(certified.sum()),
            "n": len(certified),
            "margin_median": float(np.median(margin)) if len(margin) else None,
        }
    }
    return certified & clean, certified & clean, extra


def _complete(verdicts: CompleteVerdicts, robust: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    status = verdicts.status
    unknown_status = [s for s in set(status) if s not in STATUSES]
    if unknown_status:
        raise RuntimeError(f"verify: unknown verdict {unknown_status[0]!r}")
    is_ = {s: torch.tensor([v == s for v in status], dtype=torch.bool) for s in STATUSES}
    bad = (is_["not_robust"] & robust).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(
            f"verify: the counterexample of image {bad[0]} does not reproduce "
            f"(the model classifies it correctly in fp32); {len(bad)} such"
        )
    bad = (is_["robust"] & ~robust).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"verify: image {bad[0]} was verified robust but the model misclassifies its input")
    seconds = verdicts.seconds.double().numpy()
    unstable = verdicts.unstable.long().numpy()
    binaries = verdicts.binaries.long().numpy()
    tolerance = verdicts.tolerance.double().numpy()
    decided_by: dict[str, int] = {}
    for how in verdicts.decided_by:
        decided_by[how] = decided_by.get(how, 0) + 1
    counts = {s: int(is_[s].sum()) for s in STATUSES}
    extra = {
        "verify": {
            **counts,
            "n": len(status),
            "seconds": _spread(seconds),
            "per_image_seconds": [round(float(t), 3) for t in seconds],
            "unstable": _spread(unstable.astype(np.float64)),
            "per_image_unstable": unstable.tolist(),
            "binaries": _spread(binaries.astype(np.float64)),
            "decided_by": decided_by,
            "tolerance": _spread(tolerance[np.isfinite(tolerance)]),
        }
    }
    return robust, is_["robust"], extra
