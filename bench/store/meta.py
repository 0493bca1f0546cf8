"""A checkpoint's meta, as a typed record: the keys the bench writes are declared here, once.

The meta is the checkpoint's JSON sidecar plus what later runs measured on it. Every
reader asks `CheckpointMeta.of(checkpoint)` for a field; every writer goes through
`Store.update_meta`, which refuses a key that is not declared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class CheckpointMeta:
    """The declared keys of a checkpoint's meta (each None or empty where not recorded)."""

    clean_acc: float | None = None
    """Clean accuracy on the test set (a majority of passes on a randomized model)."""
    clean_votes: int | None = None
    """Passes the clean accuracy's majority took, on a randomized model."""
    expected_cells: tuple[str, ...] = ()
    """The cells the checkpoint's matrices asked for: cell keys, and transfer cells as
    `<surrogate defense>|<cell key>` (`transfer_name`)."""
    cell_threats: Mapping[str, str] = field(default_factory=dict)
    """The threat model of each expected cell; a cell absent here counts toward the
    checkpoint's own."""
    not_verifiable: str | None = None
    """Why the verifier does not take the model, where it does not (its cells are skipped)."""
    surrogate: bool = False
    """Trained as the source of the full matrix's transfer cells."""
    escalated: str | None = None
    """Why a cascade (the `fast` matrix) escalated to the full matrix on this checkpoint:
    the masking flags that called for it. None where it did not."""
    eval_set: Mapping[str, Any] | None = None
    """Which images its cells judge, where the test set is a seeded subset of a folder
    (ImageNet's val/): `size`, the `sha256` of their ids in order, and the file beside the
    checkpoint that lists them (`ids`, eval_ids.json)."""
    admission: Mapping[str, Any] | None = None
    """The admission checks measured before the first attack (bench.science.admission)."""
    outside: Mapping[str, Any] | None = None
    """An outside model's factory, weights file and weights hash."""
    paper: Mapping[str, float] = field(default_factory=dict)
    """The paper's numbers a preset quotes, by cell label (`<label>_top5` for top-5)."""
    paper_threat: str | None = None
    """The threat model the paper's numbers are at, where it is not the checkpoint's own
    (a preset's `paper_eps`)."""
    preset_description: str | None = None
    preset_source: str | None = None
    train_losses: tuple[float, ...] = ()
    logit_stats: Mapping[str, float] = field(default_factory=dict)
    package_version: str | None = None
    torch_version: str | None = None
    git_commit: str | None = None

    @classmethod
    def of(cls, checkpoint: Any) -> CheckpointMeta:
        """The record of a checkpoint row (or of a meta dict)."""
        meta = checkpoint if isinstance(checkpoint, Mapping) else (checkpoint.meta or {})
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in meta.items() if k in known}
        for name in ("expected_cells", "train_losses"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)


META_KEYS = frozenset(f.name for f in fields(CheckpointMeta))
"""The keys a run may add to a checkpoint's meta after training."""


def transfer_name(source_defense: str, cell_key: str) -> str:
    """How a checkpoint's expected cells name a transfer from a surrogate: `<defense>|<key>`."""
    return f"{source_defense}|{cell_key}"
