"""A plain cell's crafted batches judged as they come, and the inputs that broke an image
kept or written batch by batch.

A plain cell (one pass per verdict, no verifier) never needs its adversarial set whole:
each batch is judged when it is crafted and only the inputs that broke an image are kept.
Where the caller gives the checkpoint's folder, even those are written there as they come
(bench.store.examples), so a cell that breaks most of ImageNet's 5,000 images does not
hold their 3 GB of float32 either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.core.cells import Cell
from bench.core.images import Images, StoredImages
from bench.engine.passes import PassCount
from bench.engine.verdicts import predict
from bench.store.examples import INPUTS, Breaks, stream_examples


@dataclass(frozen=True)
class Judged:
    """What judging a plain cell's batches gave: the clean and adversarial logits of the
    whole set, the breaks, and the seconds judging took (kept out of the attack's time)."""

    clean_logits: torch.Tensor
    adv_logits: torch.Tensor
    breaks: Breaks | None
    seconds: float


@dataclass
class _Running:
    # The whole set's logits are one tensor each, filled batch by batch: kept batch by batch
    # between the large temporaries an attack frees, small tensors pinned glibc's heap, which
    # grew by 1.9 GB over a cell on 5,000 ImageNet images (benchmarks/imagenet_io.py memory --breaks).
    clean: torch.Tensor
    adv: torch.Tensor
    broke: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


def judge_plain(
    model,
    cell: Cell,
    batches: Iterator[tuple[int, torch.Tensor]],
    x: Images,
    y: torch.Tensor,
    *,
    device: str,
    channels_last: bool,
    count: PassCount,
    idx: np.ndarray | None,
    keep: Path | None,
) -> Judged:
    """Each crafted batch judged as it comes, on the rows a whole-set `predict` in batches
    of the same size would have given it, so the verdicts are the same bits. The passes
    are not the attack's: they are kept out of its count. The breaks' test-set indices go
    through `idx` (the rows the cell ran on); with `keep` (a checkpoint folder) they are
    written there batch by batch, otherwise kept in memory. A cell of a kind that breaks
    nothing keeps none."""
    running = _Running(torch.empty(0), torch.empty(0))
    inputs = _broken_inputs(model, batches, x, y, device=device, channels_last=channels_last, count=count, into=running)

    def indices() -> torch.Tensor:
        broke = torch.cat(running.broke) if running.broke else torch.zeros(0, dtype=torch.long)
        return broke if idx is None else torch.as_tensor(idx, dtype=torch.long)[broke]

    breaks = None
    if not cell.kind.breaks:
        for _ in inputs:
            pass
    elif keep is not None:
        path = stream_examples(keep, cell.key, cell.threat, tuple(x.shape[1:]), inputs, indices)
        breaks = Breaks(indices(), StoredImages(path, INPUTS), kept=path)
    else:
        kept = list(inputs)
        breaks = Breaks(indices(), torch.cat(kept) if kept else torch.zeros(0, *x.shape[1:]))
    return Judged(running.clean, running.adv, breaks, running.seconds)


def _broken_inputs(
    model, batches, x: Images, y, *, device: str, channels_last: bool, count: PassCount, into: _Running
) -> Iterator[torch.Tensor]:
    """Per crafted batch, the inputs that broke an image of it (its rows recorded in
    `into`, with both logits and the seconds judging took)."""
    for i, x_adv in batches:
        start = time.perf_counter()
        n = len(x_adv)
        with count.pause():
            zc = predict(model, x[i : i + n], device=device, batch_size=n, channels_last=channels_last)
            za = predict(model, x_adv, device=device, batch_size=n, channels_last=channels_last)
        yb = y[i : i + n]
        broke = ((zc.argmax(1) == yb) & (za.argmax(1) != yb)).nonzero().squeeze(1)
        if i == 0:
            into.clean, into.adv = torch.empty(len(x), *zc.shape[1:]), torch.empty(len(x), *za.shape[1:])
        into.clean[i : i + n], into.adv[i : i + n] = zc, za
        into.broke.append(broke + i)
        inputs = x_adv[broke.to(x_adv.device)].detach().float().cpu()
        into.seconds += time.perf_counter() - start
        yield inputs
