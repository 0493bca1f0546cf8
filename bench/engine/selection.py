"""Which test images a cell runs on: a fixed, seeded subset (`subset = N`), or, for a
cascade's cell, the share of the images standing before it nearest the boundary
(`nearest = F`, ranked at the clean images or after a probe: bench.core.nearest)."""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.core.cells import Cell, make_cell
from bench.engine.verdicts import predict


def subset_indices(n: int, subset: int) -> np.ndarray | None:
    """The fixed, seeded subset a cell runs on (the same for every checkpoint)."""
    if not subset or subset >= n:
        return None
    rng = np.random.default_rng(0)
    return np.sort(rng.permutation(n)[:subset])


def nearest_images(
    model, share: float, x: torch.Tensor, y: torch.Tensor, *, device: str, batch_size: int, channels_last: bool
) -> np.ndarray:
    """Positions in (x, y), ascending, of the ceil(share * len(x)) images with the smallest
    margin at x (the label's logit less the largest other): the clean images, or a probe's
    adversaries for them (`probe_cell`). A cascade's costly cell spends
    its passes there: on mnist5k's PGD-AT checkpoint, three of the four images AutoAttack
    broke beyond `fast` were in the lowest fifth of its survivors' margins (A3, Liu et al.
    2022, spends its budget by the same reasoning, with statistics taken during the attack).
    Ties keep test-set order, so the choice is deterministic."""
    logits = predict(model, x, device=device, batch_size=batch_size, channels_last=channels_last).double()
    label = logits.gather(1, y[:, None].to(logits.device)).squeeze(1)
    others = logits.scatter(1, y[:, None].to(logits.device), float("-inf")).amax(1)
    keep = math.ceil(share * len(x))
    order = torch.sort(label - others, stable=True).indices[:keep]
    return np.sort(order.cpu().numpy())


def probe_cell(cell: Cell) -> Cell:
    """The probe whose adversaries' margins rank the images of a cell with `probe = K`."""
    assert cell.nearest is not None and cell.nearest.probe
    near = cell.nearest
    return make_cell(near.probe_attack, near.probe_params(cell.config), None, where=f"{cell.key}: its probe")
