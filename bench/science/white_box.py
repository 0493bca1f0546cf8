"""The white-box reference of the masking flags: the strongest gradient attack a
checkpoint has faced.

Every full-test-set cell of FGSM, PGD (any schedule, targeted or not), APGD-CE, APGD-T
and multi-targeted PGD in the checkpoint's own threat model, compared sample by sample
(their union) or by accuracy (the lowest). AutoAttack is not one of them: it runs Square
inside, a black-box attack. A black-box attack beating PGD-20 alone says little: on
honest adversarially trained models Square did, because PGD-20 is a weak reference, not
because the gradients were masked.
"""

from __future__ import annotations

import numpy as np

from bench.core.contract import hooks
from bench.core.kinds import Role
from bench.registry import ATTACKS
from bench.store.evidence import test_size_of
from bench.store.rows import CellRow

POINT = 0.01


def beyond(drop: float) -> bool:
    """More than a point. Accuracies are k/n stored through float32 means, so a drop of
    exactly one point can read as 0.0100000x; that is still one point, not more."""
    return drop - POINT > 1e-6


def acc_on(cell: CellRow, indices) -> float:
    """A full-set cell's robust accuracy on the given test-set indices (None: all)."""
    bits = cell.correct()
    return float(bits.mean()) if indices is None else float(bits[np.asarray(indices, dtype=np.int64)].mean())


def role_of(cell: CellRow) -> Role:
    """The role the cell's attack declares in its config (bench.core.kinds.Role); OTHER for
    an attack this installation does not have (a row stored by a plugin since removed)."""
    if cell.attack not in ATTACKS:
        return Role.OTHER
    return hooks(ATTACKS.get(cell.attack).config).role


WHITE_BOX = frozenset(r for r in Role if r.white_box)
"""Roles that follow the model's own gradients: the masking flags' reference. AutoAttack
is not one of them (Role.ENSEMBLE): it runs Square inside, a black-box attack."""
ITERATIVE = frozenset({Role.ITERATIVE})
"""The white-box roles that iterate (FGSM's one step is what they are compared with)."""


PGD_PARAMS = frozenset({"steps", "step_size", "restarts"})
"""What tells PGD among the iterative attacks: a step size, a step count and restarts
(APGD adapts its step; multi-targeted restarts over targets)."""


def is_pgd(cell: CellRow) -> bool:
    """An iterative white-box cell with PGD's settings (steps, step size, restarts)."""
    return role_of(cell) is Role.ITERATIVE and PGD_PARAMS <= cell.params.keys()


def of_role(cells: list[CellRow], threat: str, roles: frozenset[Role]) -> list[CellRow]:
    """The cells of the threat model whose attacks play one of `roles`."""
    return [c for c in cells if c.threat == threat and role_of(c) in roles]


def white_box(cells: list[CellRow], threat: str, roles: frozenset[Role] = WHITE_BOX) -> list[CellRow]:
    """Full-test-set white-box cells of the threat model."""
    return [c for c in of_role(cells, threat, roles) if c.indices is None]


def strongest_white_box_on(cells: list[CellRow], threat: str, indices) -> tuple[float, str] | None:
    """(accuracy, cell key) of the strongest white-box cell on these images."""
    scored = [(acc_on(c, indices), c.cell_key) for c in white_box(cells, threat)]
    return min(scored) if scored else None


BLACK_BOX = frozenset({Role.QUERY})
"""Query-based cells compared sample by sample with the white-box ones (SPSA and transfers
have flags of their own, compared by accuracy on the same images)."""


def broken_by(cell, size: int) -> np.ndarray:
    """A bool per test sample: broken by this cell (False where it did not run)."""
    out = np.zeros(size, dtype=bool)
    bits = cell.correct()
    if cell.indices is None:
        if len(bits) == size:
            out = ~bits
    else:
        out[np.asarray(cell.indices, dtype=np.int64)] = ~bits
    return out


def beyond_white_box(cells: list[CellRow], roles: frozenset[Role], name: str, threat: str) -> dict | None:
    """The numbers when cells of `roles` broke more than a point of samples no white-box
    cell broke, compared sample by sample over the full test set (a cell that ran on some
    of its images, a cascade's, breaks only those)."""
    white = of_role(cells, threat, WHITE_BOX)
    black = of_role(cells, threat, roles)
    if not white or not black:
        return None
    size = test_size_of(white)
    if not size:
        return None
    by_white = np.zeros(size, dtype=bool)
    for c in white:
        by_white |= broken_by(c, size)
    by_black = np.zeros(size, dtype=bool)
    for c in black:
        by_black |= broken_by(c, size)
    only = int((by_black & ~by_white).sum())
    if beyond(only / size):
        return {
            "numbers": {
                f"broken_only_by_{name}": only,
                "n": size,
                "share": only / size,
                "whitebox_broken": int(by_white.sum()),
                f"{name}_broken": int(by_black.sum()),
                "cells": sorted({c.cell_key for c in black}),
            }
        }
    return None
