"""What one cell on one model comes to: the fields of its stored row, as one value.

The engine returns it (bench.engine.cell), a job carries it back from a worker (it
pickles like any frozen dataclass), and the driver hands `row_fields()` to the store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.core.kinds import CellKind
from bench.store.examples import Breaks


@dataclass(frozen=True)
class CellOutcome:
    cell_key: str
    """The cell's canonical key (bench.core.cells.cell_key), with any adaptive suffix."""
    kind: CellKind
    """What `correct_bits` and `proven_bits` say."""
    attack: str
    threat: str
    """The threat model the cell counts toward, e.g. linf-0.2."""
    params: dict[str, Any]
    """The attack config's fields, every budget filled in."""
    clean_acc: float
    robust_acc: float
    n: int
    """Images the cell ran on (the subset's size for a subset cell)."""
    seconds: float
    """Wall time of the craft (and of the extra rounds of a randomized model)."""
    correct_bits: bytes
    """Packed per-image verdicts: still correct after the attack (bench.store.bits)."""
    proven_bits: bytes | None
    """A verifier cell's images proven robust, packed; None for an attack."""
    indices: list[int] | None
    """Test-set indices of a subset cell; None: the whole test set in order."""
    test_size: int
    """Images of the test set the cell was drawn from."""
    forward_passes: float | None
    """The model's forward passes per image while the cell crafted (bench.engine.passes)."""
    backward_passes: float | None
    """Its backward passes per image."""
    extra: dict[str, Any]
    """Histograms, logit statistics, warnings, precision and a verifier's counts."""
    device: str
    top5_bits: bytes | None = None
    """Packed per-image top-5 verdicts (the label among the five largest logits, before and
    after the cell); None for a verifier's and a randomized model's cells."""
    breaks: Breaks | None = field(default=None, repr=False, compare=False)
    """The inputs that broke the images it broke, kept beside the checkpoint (bench.store.examples)."""

    def row_fields(self) -> dict[str, Any]:
        """The store row's fields (bench.store.db.Evaluation), the kind as its database string."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "breaks"}
        fields["kind"] = self.kind.value
        return fields
