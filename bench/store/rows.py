"""The one reader of stored cells: every evaluation and transfer row comes back as a
`CellRow`, read with a plain select (no ORM objects), whoever asks (results, the flags,
the site, the run layer).

`extra` comes as text and is parsed on first use: it holds the logit histograms and is
most of a row's bytes, and only a few readers need it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
from sqlalchemy import Text, null, select, type_coerce

from bench.core.kinds import CellKind
from bench.core.stats import interval
from bench.store.bits import unpack_bits


@dataclasses.dataclass(frozen=True)
class Verdicts:
    """A complete verifier cell's verdict on each of its images, as indices into them:
    proven robust, not robust (a counterexample the model misclassifies, or an image it
    already gets wrong) and unknown (the verifier's time ran out)."""

    robust: tuple[int, ...]
    not_robust: tuple[int, ...]
    unknown: tuple[int, ...]

    def counts(self) -> dict[str, int]:
        return {"robust": len(self.robust), "not_robust": len(self.not_robust), "unknown": len(self.unknown)}


@dataclasses.dataclass(slots=True)
class CellRow:
    """One stored cell: an evaluation of a checkpoint, or a transfer onto one."""

    id: int
    checkpoint_id: int
    """The attacked checkpoint (a transfer's target)."""
    source_id: int | None
    """A transfer's source checkpoint; None for a checkpoint's own cell."""
    cell_key: str
    kind: str
    """A CellKind value (`cell_kind` has the enum): what the bits say."""
    attack: str
    params: dict
    threat: str
    clean_acc: float
    robust_acc: float
    n: int
    test_size: int | None
    forward_passes: float | None
    """The model's forward passes per image while the cell crafted; None where not counted."""
    backward_passes: float | None
    seconds: float
    correct_bits: bytes
    proven_bits: bytes | None
    top5_bits: bytes | None
    """Per sample: the label still among the top five logits; None where not kept."""
    indices: list | None
    raw_extra: str | dict | None
    device: str
    created_at: str
    _extra: dict | None = None

    def __post_init__(self):
        # A complete verifier's robust accuracy is what it proved: an unknown image is not
        # robust. Its correct bits stay what it left standing (unknown images among them),
        # which is what it adds to the worst case. Rows written before this counted unknown
        # images as robust; the proven bits say how many were proven.
        if self.kind == CellKind.VERIFY.value and self.proven_bits is not None:
            self.robust_acc = float(self.proven().mean()) if self.n else 0.0

    @classmethod
    def build(
        cls,
        *,
        cell_key: str,
        attack: str,
        threat: str,
        n: int,
        correct_bits: bytes,
        kind: str | None = None,
        params: dict | None = None,
        checkpoint_id: int = 0,
        target_id: int | None = None,
        source_id: int | None = None,
        clean_acc: float = 1.0,
        robust_acc: float = 0.0,
        test_size: int | None = None,
        forward_passes: float | None = None,
        backward_passes: float | None = None,
        seconds: float = 0.0,
        proven_bits: bytes | None = None,
        top5_bits: bytes | None = None,
        indices: list | None = None,
        extra: dict | None = None,
        device: str = "cpu",
        id: int = 0,
    ) -> CellRow:
        """A row not read from a store (a cell just run, or one made by hand): the fields a
        stored row has, with those a store would add filled in."""
        transfer = source_id is not None
        kind = kind or (CellKind.TRANSFER if transfer else CellKind.ATTACK).value
        return cls(
            id,
            target_id if target_id is not None else checkpoint_id,
            source_id,
            cell_key,
            kind,
            attack,
            params or {},
            threat,
            clean_acc,
            robust_acc,
            n,
            test_size,
            forward_passes,
            backward_passes,
            seconds,
            correct_bits,
            proven_bits,
            top5_bits,
            indices,
            json.dumps(extra or {}),
            device,
            "",
        )

    @property
    def cell_kind(self) -> CellKind:
        return CellKind(self.kind)

    @property
    def target_id(self) -> int:
        return self.checkpoint_id

    def correct(self) -> np.ndarray:
        """Per sample (of the cell's images): left standing by the cell."""
        return unpack_bits(self.correct_bits, self.n)

    def interval(self) -> tuple[float, float]:
        """The 95% exact binomial interval of its robust accuracy, on the images it ran on
        (for a verifier cell, on the images it proved)."""
        proven = self.proven()
        return interval(int((self.correct() if proven is None else proven).sum()), self.n)

    def verdicts(self) -> Verdicts | None:
        """A complete verifier cell's per-image verdicts; None for any other cell."""
        proven = self.proven()
        if self.cell_kind is not CellKind.VERIFY or proven is None:
            return None
        standing = self.correct()
        images = None if self.indices is None else np.asarray(self.indices, dtype=np.int64)

        def where(bits: np.ndarray) -> tuple[int, ...]:
            """Test-set indices (a subset cell's bits are in its own images' order)."""
            at = np.flatnonzero(bits)
            return tuple((at if images is None else images[at]).tolist())

        return Verdicts(where(proven), where(~standing), where(standing & ~proven))

    def top5(self) -> np.ndarray | None:
        """Per sample: the true label still among the five largest logits; None where not kept."""
        return None if self.top5_bits is None else unpack_bits(self.top5_bits, self.n)

    @property
    def top5_acc(self) -> float | None:
        """The share of its images whose label stayed in the top five; None where not kept."""
        bits = self.top5()
        return None if bits is None else (float(bits.mean()) if self.n else 0.0)

    def proven(self) -> np.ndarray | None:
        """Per sample: proven robust by a verifier cell; None for an attack."""
        return None if self.proven_bits is None else unpack_bits(self.proven_bits, self.n)

    @property
    def extra(self) -> dict:
        if self._extra is None:
            raw = self.raw_extra
            # SQLite hands the column back as text; PostgreSQL's driver may hand back the
            # parsed JSON itself.
            self._extra = raw if isinstance(raw, dict) else (json.loads(raw) if raw else {})
        return self._extra

    @property
    def warnings(self) -> list[str]:
        # Most cells warn of nothing; seeing that in the text spares parsing the histograms.
        raw = self.raw_extra or ""
        if isinstance(raw, str) and ('"warnings"' not in raw or _NO_WARNINGS.search(raw)):
            return []
        return [str(w) for w in self.extra.get("warnings") or []]


_NO_WARNINGS = re.compile(r'"warnings"\s*:\s*\[\s*\]')


def cell_query(table, transfer: bool):
    """The select that reads `table` (Evaluation or Transfer) into CellRow's fields, in order."""
    target = table.target_id if transfer else table.checkpoint_id
    source = table.source_id if transfer else null()
    return select(
        table.id,
        target,
        source,
        table.cell_key,
        table.kind,
        table.attack,
        table.params,
        table.threat,
        table.clean_acc,
        table.robust_acc,
        table.n,
        table.test_size,
        table.forward_passes,
        table.backward_passes,
        table.seconds,
        table.correct_bits,
        table.proven_bits,
        table.top5_bits,
        table.indices,
        type_coerce(table.extra, Text),
        table.device,
        table.created_at,
    ).order_by(table.id)
