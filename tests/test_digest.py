"""Behaviour is unchanged by moving code: the digits store's content after the README's
first command and a transfer grid hashes to the digest recorded before `bench/` was
split into layers (every checkpoint key, cell key, per-sample bit vector and flag; see
tests/store_digest.py, which reads the database with sqlite3 alone).

The digest changes only with a change that is meant to change numbers; such a change
records the new digest here and says why in its commit.
"""

from __future__ import annotations

from cli_run import run_cli
from store_digest import store_content, store_digest

RECORDED = {
    "ffb6afa8262633d72a2d919f15f2279b686a4977f3cbb12aa6f8b5097097483b",  # AMD EPYC, AVX512
    "687fbd74b2aac4d763fe481586466a21a96e2f70c2ea474551e74b19979cd181",  # Intel Xeon, AVX512 with FP16
}
"""`bench run --defense logit_squeeze --matrix full` then `bench transfer --source natural
--target all`, one digest per kind of machine it was recorded on: CPU kernels round the
last bits of fp32 differently from one processor to another, so training does too, and
the same code gives a machine's own digest. Recorded on an AMD EPYC with AVX512 (twice,
from two empty stores), and on an Intel Xeon whose AVX512 has the FP16 and BF16
instructions (twice, from two empty stores, at the same commit). It changed, on purpose,
with the columns made as strong as their names: every cell draws from a seed derived from its key instead of seed 0, transfer
cells run to their final iterate (`keep=last` in their keys), and `full` gained the
cosine-schedule PGD-50/200/1000, targeted PGD-20, APGD-CE, APGD-T, multi-targeted PGD and
AutoAttack's L2 version (29 cells, and `pgd_still_falling` beside `restarts_matter`).
Earlier digests: f45a00fb... on the layering's machine, 021f5151... on this one; before
them the digest changed only with L2 PGD's random start and SPSA's scaled sample count."""


def test_digits_store_digest_is_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "run", "--defense", "logit_squeeze", "--matrix", "full")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "transfer", "--source", "natural", "--target", "all")
    assert code == 0, err
    content = store_content(tmp_path / "results" / "bench.db")
    assert {k: len(v) for k, v in content.items()} == {"checkpoints": 3, "cells": 29, "transfers": 7, "flags": 2}
    assert store_digest(tmp_path / "results" / "bench.db") in RECORDED
