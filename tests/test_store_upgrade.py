"""A store written before cells carried their kind, test-set size, proven bits and passes
opens as a current one: the columns are added and filled from what the old rows said."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from bench.store.bits import pack_bits
from bench.store.db import Store

NEW = ("kind", "test_size", "proven_bits", "forward_passes", "backward_passes")


def _old_store(tmp_path) -> str:
    """A store of the previous schema: made now, its new columns dropped, old-style rows in."""
    path = tmp_path / "bench.db"
    store = Store(f"sqlite:///{path}")
    store.add_checkpoint(
        key="k" * 64,
        dataset="digits",
        defense="natural",
        preset=None,
        arch="digits_mlp",
        seed=0,
        threat="linf-0.2",
        config={},
        train_config={},
        path=str(tmp_path),
        sha256="0" * 64,
        epochs=1,
        train_seconds=0.0,
        device="cpu",
        meta={},
    )
    store.engine.dispose()
    con = sqlite3.connect(path)
    for table in ("evaluations", "transfers"):
        for column in NEW:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    robust = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    unknown = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    rows = [
        ("pgd:steps=20", "pgd", "linf-0.2", np.array([1, 1, 1, 1, 0, 0, 0, 0], bool), None, {}),
        ("spsa:subset=4", "spsa", "linf-0.2", np.array([1, 0, 1, 1], bool), [0, 2, 4, 6], {}),
        (
            "verify:eps=0.2",
            "verify",
            "linf-0.2",
            robust | unknown,
            None,
            {"verify": {"robust_bits": pack_bits(robust).hex(), "unknown_bits": pack_bits(unknown).hex()}},
        ),
        ("certify:eps=0.2", "certify", "certified-linf-0.2", np.array([1, 0, 0, 0, 0, 0, 0, 0], bool), None, {}),
    ]
    for key, attack, threat, bits, indices, extra in rows:
        con.execute(
            "INSERT INTO evaluations (checkpoint_id, cell_key, attack, params, threat, clean_acc, robust_acc, n, "
            "seconds, correct_bits, indices, extra, device, created_at) VALUES (1, ?, ?, '{}', ?, 1.0, ?, ?, 0.0, ?, ?, "
            "?, 'cpu', '')",
            (
                key,
                attack,
                threat,
                float(bits.mean()),
                len(bits),
                pack_bits(bits),
                None if indices is None else json.dumps(indices),
                json.dumps(extra),
            ),
        )
    con.commit()
    con.close()
    return f"sqlite:///{path}"


def test_an_old_store_is_upgraded_in_place(tmp_path):
    url = _old_store(tmp_path)
    rows = {r.attack: r for r in Store(url).evaluations()}
    assert {a: r.kind for a, r in rows.items()} == {
        "pgd": "attack",
        "spsa": "attack",
        "verify": "verify",
        "certify": "certify",
    }
    assert rows["certify"].threat == "linf-0.2"  # its kind, not a threat of its own, keeps it out of the worst case
    assert {r.test_size for r in rows.values()} == {8}  # the subset cell's too, from the whole-set cells
    assert rows["verify"].proven().tolist() == [True, True] + [False] * 6
    assert rows["certify"].proven().tolist() == [True] + [False] * 7
    assert rows["pgd"].proven() is None
    assert rows["pgd"].forward_passes is None and rows["pgd"].backward_passes is None  # never counted: a dash
    # Opening it again changes nothing.
    again = {r.attack: r for r in Store(url).evaluations()}
    assert [(r.kind, r.threat, r.test_size) for r in again.values()] == [
        (r.kind, r.threat, r.test_size) for r in rows.values()
    ]
