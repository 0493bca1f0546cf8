"""The worst case's adversarial inputs as one tensor, index-aligned with the test set: the
layout RobustBench asks of an outside evaluation (a `.pt` file of the adversarial images,
image i of the file standing for test image i).

Each image the worst case counts as broken gets an input that broke it, from the kept
examples of the cells it ANDs (bench.store.examples), in the worst case's order; an image
the model already misclassifies, and an image every cell left standing, is its clean
image. Judged by the model in fp32, the file gives back the worst case's robust accuracy
(a randomized model's verdicts are majorities of passes: one pass may differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.core.images import Images, as_tensor
from bench.errors import BenchError
from bench.store.evidence import Evidence
from bench.store.examples import read_examples, transfer_examples_key


@dataclass(frozen=True)
class Export:
    """The worst case's inputs and what they are."""

    inputs: torch.Tensor
    """(N, C, H, W) float32 in [0, 1], index-aligned with the test set."""
    threat: str
    robust_acc: float
    """The worst case's robust accuracy, which the model should give back on `inputs`."""
    replaced: int
    """Images whose input is an adversarial one (the rest are clean)."""


def worst_case_inputs(ev: Evidence, x: Images, source_keys: dict[int, str], threat: str | None = None) -> Export:
    """The export of the checkpoint's worst case at `threat` (unset: its own radius, or the
    one radius its cells ran at), given its clean test images `x` and the keys of the
    checkpoints transfers onto it came from."""
    if threat is None and ev.own is None:  # no cell at its own radius: the one radius it has
        others = [t for t in ev.radii if ev.worst_case(t) is not None]
        if len(others) > 1:
            raise BenchError(
                f"checkpoint {ev.checkpoint.key[:8]} has worst cases at {', '.join(others)}: choose one with --threat"
            )
        threat = others[0] if others else None
    wc = ev.worst_case(threat)
    if wc is None:
        raise BenchError(
            f"checkpoint {ev.checkpoint.key[:8]} has no worst case at {threat or ev.threat}: run a matrix on it first"
        )
    if len(x) != wc.n:
        raise BenchError(f"the test set has {len(x)} images but the worst case was measured on {wc.n}")
    out = as_tensor(x).detach().float().clone()
    broken = ~wc.bits
    filled = np.zeros(wc.n, dtype=bool)
    unkept = []
    for c in ev.rows(wc.threat):
        if not c.cell_kind.breaks:
            continue
        name = c.cell_key if c.source_id is None else transfer_examples_key(source_keys[c.source_id], c.cell_key)
        kept = read_examples(ev.checkpoint.path, name)
        if kept is None:
            unkept.append(name)
            continue
        at = kept.indices.numpy()
        take = broken[at] & ~filled[at]
        out[torch.from_numpy(at[take])] = kept.inputs[torch.from_numpy(take)]
        filled[at[take]] = True
    if unkept:
        raise BenchError(
            f"{len(unkept)} cell(s) of the worst case kept no examples (stored by an older bench), "
            f"e.g. {unkept[0]!r}: their breaks cannot be exported; run the matrix into a fresh --results folder"
        )
    return Export(out, wc.threat, wc.robust_acc, int(filled.sum()))
