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
    "f45a00fb3c2cd56db75e7982048c0763f7da6cf600498781a8de28159a457a20",
    "021f5151460c175c5fe4ee79cbaf9ea008cfecd76c118b8e1fda5f21940eb483",
}
"""`bench run --defense logit_squeeze --matrix full` then `bench transfer --source natural
--target all`, one digest per kind of machine it was recorded on: CPU kernels round the
last bits of fp32 differently from one processor to another (on the second machine, an
AMD EPYC, its AVX512 kernels give 021f5151..., its AVX2 ones 67dc8b3b...), so training
does too, and the same code gives a machine's own digest. The first was recorded on the
machine the layering was done on, the second on an AMD EPYC with AVX512, where the code
of the first (commit 1ab2f6b) gives it too. The layering left the digest recorded on the
flat package unchanged (5d5e46cc...); it changed only with two changes meant to change
numbers: L2 PGD's random start drawn as torchattacks' PGDL2 draws it (the L2 cell's bits)
and SPSA's sample count scaled with the input (`samples_per_dim` in its key; the same 128
samples on digits, the same bits)."""


def test_digits_store_digest_is_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "run", "--defense", "logit_squeeze", "--matrix", "full")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "transfer", "--source", "natural", "--target", "all")
    assert code == 0, err
    content = store_content(tmp_path / "results" / "bench.db")
    assert {k: len(v) for k, v in content.items()} == {"checkpoints": 3, "cells": 24, "transfers": 7, "flags": 1}
    assert store_digest(tmp_path / "results" / "bench.db") in RECORDED
