"""The bracket around a worst case: what the verifier cells of a checkpoint prove.

The worst case (bench.store.evidence) is an upper bound on the true robust
accuracy: an attack that fails proves nothing. Beside it:

- the certified floor: images proven robust, by a certify cell's sound bound or by the
  complete verifier; a lower bound;
- the exact robust accuracy, where the verifier decided every image of the test set;
- the images still in doubt: `unknown` (the verifier's time ran out and no attack broke
  them either) and never counted as robust or broken;
- `attacks_missed`: images the verifier broke (with a counterexample that reproduced)
  that every attack cell left standing;
- `unsound`: images proven robust (certified, or verified) that some attack cell broke,
  or that the complete verifier broke with a counterexample the model reproduced: a
  contradiction only a bug in a verifier or an attack can give.

A bracket with anything unsound publishes no proven figure: `certified`, `exact` and
`gap` are None and `withheld` says why ("unsound"), so every reader (results, CSV, JSON,
the board, the checkpoint page, the flags) shows the contradiction instead of a number
that one of its two sides says is false.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.core.kinds import CellKind
from bench.store.rows import CellRow


@dataclass(frozen=True)
class Bracket:
    """What a checkpoint's verifier cells prove beside its worst case (fractions of the
    test set, and counts of images)."""

    certified: float | None
    """The floor: images proven robust; None where withheld."""
    exact: float | None
    """The exact robust accuracy, where the complete verifier and the attacks together
    decided every image."""
    withheld: str | None
    """Why certified, exact and gap are None where a verifier cell did run ("unsound")."""
    unknown: int | None
    """Images the complete verifier left undecided and no attack broke; None without a
    complete verifier."""
    unknown_indices: tuple[int, ...] = field(repr=False)
    gap: float | None
    """Worst case minus floor, in points."""
    attacks_only: float
    """What the attack cells alone leave standing."""
    attacks_missed: int
    missed_indices: tuple[int, ...] = field(repr=False)
    unsound: int
    unsound_indices: tuple[int, ...] = field(repr=False)
    verified: bool
    """Whether a complete verifier cell is among them."""


def _cells_of(kind: CellKind, threat: str, cells, test_size: int) -> list[CellRow]:
    return [
        c
        for c in cells
        if c.cell_kind is kind
        and c.threat == threat
        and c.indices is None
        and c.n == test_size
        and c.proven_bits is not None
    ]


def bracket(threat: str, cells: tuple[CellRow, ...], transfers: tuple[CellRow, ...], test_size: int) -> Bracket | None:
    """The bracket of the cells of `threat`, or None when no verifier cell of it ran
    over the whole test set."""
    verify = _cells_of(CellKind.VERIFY, threat, cells, test_size)
    certify = _cells_of(CellKind.CERTIFY, threat, cells, test_size)
    if not (verify or certify):
        return None
    proven = np.zeros(test_size, dtype=bool)
    for c in certify:
        proven |= c.proven()
    broken_by_verifier = np.zeros(test_size, dtype=bool)
    decided = np.zeros(test_size, dtype=bool)
    for c in verify:
        # Left standing but not proven: the verifier's time ran out (unknown).
        robust, standing = c.proven(), c.correct()
        proven |= robust
        broken_by_verifier |= ~standing
        decided |= robust | ~standing
    # What the attacks alone leave standing: every attack and transfer cell of the threat model.
    standing = np.ones(test_size, dtype=bool)
    for c in (*cells, *transfers):
        if c.threat != threat or c.cell_kind not in (CellKind.ATTACK, CellKind.TRANSFER):
            continue
        if c.indices is None:
            if c.n == test_size:
                standing &= c.correct()
        else:
            standing[np.asarray(c.indices, dtype=np.int64)] &= c.correct()
    missed = broken_by_verifier & standing
    # An image an attack broke is decided, not robust, whatever the verifier said: its time
    # may have run out on it (or it proved it robust, which `unsound` below reports).
    decided |= ~standing
    # Proven robust, yet broken: by an attack, or by a counterexample of the verifier itself
    # (a certify cell, or another verify cell, against a verify cell).
    unsound = proven & (~standing | broken_by_verifier)
    withheld = "unsound" if unsound.any() else None
    exact = bool(verify) and bool(decided.all()) and withheld is None
    floor = float(proven.mean())
    worst = float((standing & ~broken_by_verifier).mean())
    return Bracket(
        certified=floor if withheld is None else None,
        exact=floor if exact else None,
        withheld=withheld,
        unknown=int((~decided).sum()) if verify else None,
        unknown_indices=tuple(np.flatnonzero(~decided).tolist()) if verify else (),
        gap=round(100 * (worst - floor), 2) if withheld is None else None,
        attacks_only=float(standing.mean()),
        attacks_missed=int(missed.sum()),
        missed_indices=tuple(np.flatnonzero(missed).tolist()),
        unsound=int(unsound.sum()),
        unsound_indices=tuple(np.flatnonzero(unsound).tolist()),
        verified=bool(verify),
    )
