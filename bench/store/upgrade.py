"""Bringing a store written by an older bench up to the current schema, in place.

A store made before cells carried their kind, their test-set size, their proven bits and
their passes gets the columns; the first three are filled from what the old rows said
another way (the passes of an old row were never counted and stay NULL):

- a verifier cell was known by its attack's name and kept its proven bits as hex in
  its `extra` (`verify.robust_bits`); a certify cell counted toward a threat of its own,
  `certified-<threat>`;
- the test-set size was the `n` of the checkpoint's whole-set cells.

This module is the one place that reads those old spellings: everything else reads the
columns. It runs inside the schema transaction (bench.store.db._create_schema), so two
drivers opening one old store upgrade it once.
"""

from __future__ import annotations

import json

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from bench.core.kinds import CellKind

_COLUMNS = {
    "kind": "VARCHAR(16)",
    "test_size": "INTEGER",
    "proven_bits": "{blob}",
    "forward_passes": "DOUBLE PRECISION",
    "backward_passes": "DOUBLE PRECISION",
    "top5_bits": "{blob}",
}
"""Columns added since the first schema, with their SQL types; the passes and top-5 bits of
an old row stay NULL (not counted or not kept, shown as a dash), the others are filled from
what the row said."""
_FILLED = ("kind", "test_size", "proven_bits")
_OLD_CERTIFIED = "certified-"


def upgrade(conn: Connection) -> None:
    """Add and fill the columns an old store lacks; a current store is left untouched."""
    tables = {"evaluations": "checkpoint_id", "transfers": "target_id"}
    blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
    for table, owner in tables.items():
        have = {c["name"] for c in inspect(conn).get_columns(table)}
        missing = [c for c in _COLUMNS if c not in have]
        if not missing:
            continue
        for column in missing:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {_COLUMNS[column].format(blob=blob)}"))
        if any(c in missing for c in _FILLED):
            _fill(conn, table, owner)


def _fill(conn: Connection, table: str, owner: str) -> None:
    rows = conn.execute(text(f"SELECT id, {owner}, attack, threat, n, indices, correct_bits, extra FROM {table}")).all()
    sizes: dict[int, int] = {}
    for row in rows:
        if row.indices is None:
            sizes[row[1]] = max(sizes.get(row[1], 0), row.n)
    for row in rows:
        extra = row.extra if isinstance(row.extra, dict) else json.loads(row.extra or "{}")
        kind, threat, proven = CellKind.TRANSFER if table == "transfers" else CellKind.ATTACK, row.threat, None
        if table == "evaluations" and row.threat.startswith(_OLD_CERTIFIED):
            kind, threat, proven = CellKind.CERTIFY, row.threat[len(_OLD_CERTIFIED) :], row.correct_bits
        elif table == "evaluations" and isinstance((extra or {}).get("verify"), dict):
            kind, proven = CellKind.VERIFY, bytes.fromhex(extra["verify"]["robust_bits"])
        conn.execute(
            text(
                f"UPDATE {table} SET kind = :kind, threat = :threat, test_size = :size, "
                "proven_bits = :proven WHERE id = :id"
            ),
            {"kind": kind.value, "threat": threat, "size": sizes.get(row[1]), "proven": proven, "id": row.id},
        )
