"""The bracket around a worst case: what the verifier cells of a checkpoint prove.

The worst case (bench.store.db.worst_case) is an upper bound on the true robust
accuracy: an attack that fails proves nothing. Beside it:

- the certified floor: images proven robust, by a certify cell's sound bound or by the
  complete verifier; a lower bound;
- the exact robust accuracy, where the verifier decided every image of the test set;
- the images still in doubt: `unknown` (the verifier's time ran out) and never counted
  as robust or broken;
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

import numpy as np

from bench.core.kinds import CellKind
from bench.store.db import Checkpoint
from bench.store.rows import CellRow


def _cells_of(kind: CellKind, ck: Checkpoint, cells: list[CellRow], test_size: int) -> list[CellRow]:
    return [c for c in cells if c.kind == kind.value and c.threat == ck.threat and c.indices is None
            and c.n == test_size and c.proven_bits is not None]


def bracket(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], test_size: int) -> dict | None:
    """The bracket's numbers (fractions of the test set and counts), or None when the
    checkpoint has no verifier cell of its threat model over the whole test set. Where
    anything is unsound, `certified`, `exact` and `gap` are None and `withheld` is
    "unsound" (else None)."""
    verify = _cells_of(CellKind.VERIFY, ck, cells, test_size)
    certify = _cells_of(CellKind.CERTIFY, ck, cells, test_size)
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
    # What the attacks alone leave standing: every cell of the threat model but the verifier's.
    standing = np.ones(test_size, dtype=bool)
    for c in [*cells, *transfers]:
        if c.threat != ck.threat or c.kind != CellKind.ATTACK.value and c.kind != CellKind.TRANSFER.value:
            continue
        if c.indices is None:
            if c.n == test_size:
                standing &= c.correct()
        else:
            standing[np.asarray(c.indices, dtype=np.int64)] &= c.correct()
    missed = broken_by_verifier & standing
    # Proven robust, yet broken: by an attack, or by a counterexample of the verifier itself
    # (a certify cell, or another verify cell, against a verify cell).
    unsound = proven & (~standing | broken_by_verifier)
    withheld = "unsound" if unsound.any() else None
    exact = bool(verify) and bool(decided.all()) and withheld is None
    unknown = int((~decided).sum()) if verify else None
    floor = float(proven.mean())
    worst = float((standing & ~broken_by_verifier).mean())
    return {
        "certified": floor if withheld is None else None,
        "exact": floor if exact else None,
        "withheld": withheld,
        "unknown": unknown,
        "gap": round(100 * (worst - floor), 2) if withheld is None else None,
        "attacks_only": float(standing.mean()),
        "attacks_missed": int(missed.sum()),
        "missed_indices": np.flatnonzero(missed).tolist(),
        "unsound": int(unsound.sum()),
        "unsound_indices": np.flatnonzero(unsound).tolist(),
        "verified": bool(verify),
    }
