"""The digest of a results store's content, read with sqlite3 alone (no bench code, so
that no change to the package can change how it is computed): every checkpoint key,
every cell key with its per-sample bits, every transfer row and every flag name."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path


def store_content(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        keys = dict(con.execute("SELECT id, key FROM checkpoints"))
        return {
            "checkpoints": sorted(
                [k, d, s] for k, d, s in con.execute("SELECT key, defense, dataset FROM checkpoints")
            ),
            "cells": sorted(
                [keys[c], k, n, bits.hex()]
                for c, k, n, bits in con.execute("SELECT checkpoint_id, cell_key, n, correct_bits FROM evaluations")
            ),
            "transfers": sorted(
                [keys[s], keys[t], k, n, bits.hex()]
                for s, t, k, n, bits in con.execute(
                    "SELECT source_id, target_id, cell_key, n, correct_bits FROM transfers"
                )
            ),
            "flags": sorted([keys[c], name] for c, name in con.execute("SELECT checkpoint_id, name FROM flags")),
        }
    finally:
        con.close()


def store_digest(db: Path) -> str:
    payload = json.dumps(store_content(db), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


if __name__ == "__main__":
    import sys

    content = store_content(Path(sys.argv[1]))
    print({k: len(v) for k, v in content.items()})
    print(store_digest(Path(sys.argv[1])))
