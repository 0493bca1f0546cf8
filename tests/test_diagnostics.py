"""Shafahi et al.'s linearized robustness (Eq. 4): exact on linear models, stored once,
printed by `bench diagnose`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_run import run_cli as _cli
from torch import nn

from bench import api
from bench.core.matrix import load_matrix
from bench.run.driver import run_defense
from bench.run.recipe import TrainRequest
from bench.run.workspace import Workspace
from bench.science.diagnostics import diagnose, landscape, logit_gradients, per_sample, predicted_accuracy, stored_eps_l


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        lin.bias.copy_(torch.tensor(bias))
    return nn.Sequential(nn.Flatten(), lin)


def _flip_size(model: nn.Module, x: torch.Tensor, y: int, direction: torch.Tensor, flipped) -> float:
    """The smallest t with flipped(z(x - t·direction)), by bisection (no clipping: the
    linear model is defined on all of R^n)."""
    lo, hi = 0.0, 1.0
    with torch.no_grad():
        while not flipped(model(x - hi * direction)[0]):
            hi *= 2
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if flipped(model(x - mid * direction)[0]) else (mid, hi)
    return hi


def test_linear_model_gaps_and_eps_l_are_the_hand_computed_values():
    # Three classes over four pixels; image x of class 0.
    w = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0], [-1.0, 0.0, 2.0, 0.0]])
    b = np.array([0.3, -0.2, 0.1])
    x = torch.tensor([[[[0.5, 0.25], [0.75, 0.5]]]], dtype=torch.float64)
    y = torch.tensor([0])
    model = _linear(w, b)
    z = w @ x.flatten().numpy() + b  # [2.175, 0.55, 1.1]
    assert z.argmax() == 0
    other = 2  # the strongest other class
    gap = z[0] - z[other]  # 1.075
    grad_gap = np.abs(w[0] - w[other]).sum()  # |2| + |-2| + |-1.5| + |3| = 8.5
    grads = logit_gradients(model, x, y)
    s = per_sample(grads, y)
    assert grads.other.tolist() == [other]
    np.testing.assert_allclose(grads.grad_true[0].numpy(), w[0])
    np.testing.assert_allclose(grads.grad_other[0].numpy(), w[other])
    assert (
        gap == pytest.approx(1.075)
        and s["logit_gap"][0] == pytest.approx(1.075)
        and grad_gap == pytest.approx(8.5)
        and s["grad_gap"][0] == pytest.approx(8.5)
    )
    assert s["eps_l"][0] == pytest.approx(1.075 / 8.5)
    cos = w[0] @ w[other] / np.linalg.norm(w[0]) / np.linalg.norm(w[other])
    assert s["coherence"][0] == pytest.approx(cos)
    assert s["grad_norm_true"][0] == pytest.approx(6.5) and s["grad_norm_adv"][0] == pytest.approx(3.0)

    # εL is the L-inf size of the smallest FGSM-form step on the margin direction after
    # which ȳ overtakes y: bisect it on the model itself.
    direction = torch.tensor(np.sign(w[0] - w[other])).reshape(x.shape)
    t = _flip_size(model, x, 0, direction, lambda zz: zz[other] >= zz[0])
    assert t == pytest.approx(s["eps_l"][0], rel=1e-9)
    assert float((t * direction).abs().max()) == pytest.approx(t)


def test_two_class_linear_model_eps_l_is_the_smallest_label_flip():
    # With two classes ȳ is the only other class, so εL is exactly where the label flips.
    gen = np.random.default_rng(0)
    w, b = gen.normal(size=(2, 16)), gen.normal(size=2)
    model = _linear(w, b)
    x = torch.tensor(gen.uniform(size=(5, 1, 4, 4)))
    with torch.no_grad():
        y = model(x).argmax(1)
    s = per_sample(logit_gradients(model, x, y), y)
    for i in range(len(x)):
        yi = int(y[i])
        direction = torch.tensor(np.sign(w[yi] - w[1 - yi])).reshape(1, 1, 4, 4)
        t = _flip_size(model, x[i : i + 1], yi, direction, lambda zz, yi=yi: int(zz.argmax()) != yi)
        assert t == pytest.approx(s["eps_l"][i], rel=1e-9)


def test_batched_gradients_match_one_image_at_a_time(natural_model, digits_test):
    x, y = digits_test[0][:24], digits_test[1][:24]
    grads = logit_gradients(natural_model, x, y, batch_size=10)
    for i in (0, 7, 23):
        xi = x[i : i + 1].clone().requires_grad_(True)
        z = natural_model(xi)[0]
        other = int(grads.other[i])
        masked = z.detach().clone()
        masked[y[i]] = -float("inf")
        assert other == int(masked.argmax())
        (gy,) = torch.autograd.grad(z[y[i]], xi, retain_graph=True)
        (go,) = torch.autograd.grad(z[other], xi)
        torch.testing.assert_close(grads.grad_true[i], gy.flatten(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads.grad_other[i], go.flatten(), rtol=1e-5, atol=1e-6)


def test_predicted_accuracy_is_the_direct_count(natural_model, digits_test):
    x, y = digits_test
    s = per_sample(logit_gradients(natural_model, x, y), y)
    with torch.no_grad():
        pred = natural_model(x).argmax(1)
    for eps in (0.0, 0.05, 0.1, 0.2):
        count = sum(1 for i in range(len(y)) if pred[i] == y[i] and s["eps_l"][i] > eps)
        assert predicted_accuracy(s["eps_l"], s["correct"], eps) == pytest.approx(count / len(y))
    # At eps 0 the prediction is the clean accuracy; it can only fall as eps grows.
    assert predicted_accuracy(s["eps_l"], s["correct"], 0.0) == pytest.approx(float((pred == y).float().mean()))


def test_landscape_centre_is_the_clean_loss_and_the_adversarial_axis_climbs(natural_model, digits_test):
    x, y = digits_test
    land = landscape(natural_model, x, y, 0.2, points=5)
    loss = np.array(land["loss"])
    assert loss.shape == (8, 5, 5) and land["values"][2] == 0.0
    with torch.no_grad():
        clean = F.cross_entropy(natural_model(x[:8]), y[:8], reduction="none").numpy()
    np.testing.assert_allclose(loss[:, 2, 2], clean, rtol=1e-4, atol=1e-6)
    # The step along sign(∇x xent) raises the loss of a natural model (first-order ascent).
    assert (loss[:, 4, 2] > loss[:, 2, 2]).mean() >= 0.75


def test_stored_infinities_round_trip():
    samples = {"logit_gap": [1.0, -2.0, 0.5], "eps_l": [None, None, 0.25]}
    np.testing.assert_array_equal(stored_eps_l(samples), [np.inf, -np.inf, 0.25])


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    """natural and pgd_at digits checkpoints (short schedules) with their quick matrix."""
    root = tmp_path_factory.mktemp("diag")
    b = Workspace.open(root)
    for defense, epochs in (("natural", 5), ("pgd_at", 3)):
        run_defense(b, TrainRequest(defense, overrides=(f"epochs={epochs}",)), load_matrix("quick"))
    return root


def test_run_stores_diagnostics_once_and_rows_join_the_measured_cells(small_results):
    b = Workspace.open(small_results)
    diags = b.store.diagnostics()
    assert len(diags) == 2 and all(d.n == 360 and d.eps == 0.2 for d in diags)
    created = [d.created_at for d in diags]
    where = api.Where(small_results)
    rows = api.diagnose("natural", where=where) + api.diagnose("pgd_at", where=where)
    assert [d.created_at for d in b.store.diagnostics()] == created  # not recomputed
    evals = {(e.checkpoint_id, e.cell_key): e.robust_acc for e in b.store.evaluations()}
    for row, ck in zip(rows, [b.store.checkpoints(defense=d)[0] for d in ("natural", "pgd_at")], strict=True):
        assert row["checkpoint"] == ck.key
        assert row["fgsm_acc"] == evals[(ck.id, "fgsm:eps=0.2,loss=xent")]
        pgd = [v for (cid, k), v in evals.items() if cid == ck.id and k.startswith("pgd:")]
        assert row["pgd_acc"] == min(pgd)
        # Recomputing from the weights gives the stored values.
        from bench.core.data import load_dataset
        from bench.run.training import load_model

        x, y = load_dataset("digits", "test")
        fresh = diagnose(load_model(ck, "cpu"), x, y, 0.2)["summary"]
        assert row["median_logit_gap"] == pytest.approx(fresh["logit_gap"]["median"], rel=1e-6)
        assert row["predicted_acc"] == fresh["predicted_acc"]
        assert 0 <= row["predicted_acc"] <= row["clean_acc"]


def test_diagnose_cli_table_and_json(small_results, monkeypatch, capsys):
    code, out, _ = _cli(
        monkeypatch, capsys, "diagnose", "--defense", "pgd_at", "--format", "json", "--results", str(small_results)
    )
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1 and rows[0]["defense"] == "pgd_at"
    key = rows[0]["checkpoint"]
    code, out, _ = _cli(monkeypatch, capsys, "diagnose", "--defense", key[:10], "--results", str(small_results))
    assert code == 0 and "pgd_at" in out and key[:8] in out
    assert f"{rows[0]['median_logit_gap']:.3g}" in out and f"{rows[0]['predicted_acc']:.3f}" in out
    code, out, _ = _cli(
        monkeypatch, capsys, "diagnose", "--defense", "all", "--format", "json", "--results", str(small_results)
    )
    assert code == 0 and [r["defense"] for r in json.loads(out)] == ["natural", "pgd_at"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--defense", "nothing_here"], "no stored checkpoint matches --defense 'nothing_here'"),
        (["--defense", "natural", "--dataset", "mnist"], "no stored checkpoint on mnist matches"),
        (["--defense", "natural", "--format", "xml"], "--format must be table or json"),
    ],
)
def test_diagnose_bad_input_exits_2_with_one_line(small_results, monkeypatch, capsys, args, message):
    code, _, err = _cli(monkeypatch, capsys, "diagnose", *args, "--results", str(small_results))
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    ws = str(Path(sys.executable).with_name("bench"))  # the installed script beside this Python
    proc = subprocess.run(
        [ws, "diagnose", *args, "--results", str(small_results)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
