"""The cascade (`schedule = "cascade"`, the built-in `fast`): each cell on what the
earlier ones left standing, and the escalation to a fuller matrix when a model's
gradients say nothing."""

from __future__ import annotations

import numpy as np
import pytest
from cheats import Quantized

import bench
from bench.core.data import get_spec, load_dataset
from bench.core.matrix import load_matrix
from bench.store.db import Store

THREAT = get_spec("digits").threat

CASCADE = """
schedule = "cascade"
{escalate}

[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 10
"""

QUICK = """
[[cell]]
attack = "pgd"
steps = 5
"""


def _rows(tmp_path, model, name, escalate=""):
    matrix = tmp_path / "cascade.toml"
    matrix.write_text(CASCADE.format(escalate=escalate))
    rows = bench.evaluate(model, name=name, matrix=str(matrix), results=tmp_path / "r", device="cpu")
    store = Store.for_results(tmp_path / "r")
    return rows, store


def test_each_cell_runs_on_what_the_earlier_left_standing(natural_model, tmp_path):
    rows, store = _rows(tmp_path, natural_model, "mlp")
    (ck,) = store.checkpoints()
    cells = {r.attack: r for r in store.evaluations([ck.id])}
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert fgsm.cell_key.endswith(",cascade=cascade") and pgd.cell_key.endswith(",cascade=cascade")
    assert fgsm.indices == list(range(360))  # the first cell: every image
    assert pgd.indices == np.flatnonzero(fgsm.correct()).tolist()  # exactly what FGSM left standing
    assert pgd.n == int(fgsm.correct().sum()) < 360
    worst = next(r for r in rows if r["attack"] == "worst_case")
    standing = fgsm.correct().copy()
    standing[pgd.indices] &= pgd.correct()
    assert worst["robust_acc"] == pytest.approx(standing.mean()) and worst["complete"]
    # Its cost: FGSM on every image, PGD-10 on the few left (per test image).
    assert worst["forward_passes"] == pytest.approx(fgsm.forward_passes + pgd.forward_passes * pgd.n / 360)
    assert store.checkpoints()[0].meta.get("escalated") is None  # an honest model: no escalation


def test_the_fast_matrix_is_a_cascade_that_escalates_to_full():
    fast = load_matrix("fast")
    assert fast.cascade and fast.escalate == "full"
    keys = [c.key for c in fast.cells(THREAT)]
    assert [k.split(":")[0] for k in keys] == ["fgsm", "pgd", "apgd", "apgd_t", "apgd_t", "square"]
    assert all(k.endswith(",cascade=fast") for k in keys)


def test_a_zero_gradient_model_escalates(natural_model, tmp_path):
    quick = tmp_path / "small.toml"
    quick.write_text(QUICK)
    rows, store = _rows(tmp_path, Quantized(natural_model).eval(), "quantized", f'escalate = "{quick}"')
    (ck,) = store.checkpoints()
    assert "zero_gradients" in ck.meta["escalated"]
    keys = {r.cell_key for r in store.evaluations([ck.id])}
    assert any(k.startswith("pgd:") and "cascade" not in k and "steps=5" in k for k in keys)  # the fuller matrix
    assert any(k.startswith("distill:") for k in keys)  # and the witness
    # The witness, which does not follow the gradients, breaks what the cascade could not.
    _, y = load_dataset("digits", "test")
    worst = next(r for r in rows if r["attack"] == "worst_case" and r["threat"] == THREAT.name)
    cascade = [r for r in store.evaluations([ck.id]) if r.cell_key.endswith(",cascade=cascade")]
    standing = np.ones(len(y), dtype=bool)
    for r in cascade:
        standing[np.asarray(r.indices)] &= r.correct()
    assert worst["robust_acc"] < standing.mean() - 0.1
