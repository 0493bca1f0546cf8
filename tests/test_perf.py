"""The fast path stays honest on the CPU: early stop changes no result, bf16 is never the
CPU default, and `bench perf` runs in a tiny configuration with the figures it promises."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

from attacks.pgd import PGD, run_pgd
from bench.core.cells import make_cell
from bench.core.data import get_spec, load_dataset
from bench.core.models import build_model
from bench.engine.cell import craft
from bench.engine.device import default_precision, frozen
from bench.engine.fast import FastPath
from bench.errors import BenchError
from bench.run.workspace import Workspace

DIGITS = get_spec("digits")


@pytest.fixture(scope="module")
def small_model():
    """A digits_cnn trained for a few seconds: accurate enough that a small eps breaks
    some samples early, some late and some never."""
    x, y = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("digits_cnn", DIGITS)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "params",
    [
        {"restarts": 1},
        {"restarts": 3},
        {"restarts": 3, "loss": "cw"},
        {"restarts": 2, "norm": "l2", "eps": 0.6, "step_size": 0.15},
    ],
)
def test_early_stop_changes_no_result(small_model, digits_test, params):
    x, y = digits_test
    params = dict({"eps": 0.06, "step_size": 0.015, "steps": 8}, **params)
    out = {}
    with frozen(small_model):
        for early in (True, False):
            cfg = PGD(early_stop=early, **params).with_threat(DIGITS.threat)
            out[early] = run_pgd(small_model, x, y, cfg, torch.Generator().manual_seed(3))
    (adv_on, broken_on), (adv_off, broken_off) = out[True], out[False]
    assert 0.1 < float(broken_on.float().mean()) < 0.9  # a mix, so the comparison means something
    assert torch.equal(broken_on, broken_off)
    assert torch.equal(adv_on[broken_on], adv_off[broken_off])
    assert torch.equal(adv_on, adv_off)  # unbroken samples keep the same highest-loss iterate too
    with torch.no_grad():
        assert bool((small_model(adv_on[broken_on]).argmax(1) != y[broken_on]).all())
    assert float(adv_on.min()) >= 0 and float(adv_on.max()) <= 1
    if params.get("norm", "linf") == "linf":
        assert float((adv_on - x).abs().max()) <= params["eps"] + 1e-6
    else:
        assert float((adv_on - x).flatten(1).norm(dim=1).max()) <= params["eps"] + 1e-5


def test_craft_default_path_is_plain_fp32_pgd(small_model, digits_test):
    """craft's defaults are the plain path: the same x_adv as run_pgd called directly."""
    x, y = digits_test
    cell = make_cell("pgd", {"steps": 5}, DIGITS.threat)
    crafted = craft(small_model, cell, x, y, device="cpu", batch_size=128, seed=7)
    gen = torch.Generator().manual_seed(7)
    with frozen(small_model):
        direct = torch.cat(
            [run_pgd(small_model, x[i : i + 128], y[i : i + 128], cell.config, gen)[0] for i in range(0, len(x), 128)]
        )
    assert crafted.dtype == torch.float32 and torch.equal(crafted, direct)


def test_bf16_is_never_the_cpu_default(tmp_path):
    ws = Workspace.open(tmp_path, device="cpu")
    assert default_precision("cpu") == "fp32"
    assert ws.precision == "fp32" and ws.channels_last is False and ws.compile is False
    assert ws.fast == FastPath(
        precision="fp32", channels_last=False, fold_bn=False, compile=False, exact_rewrites=True
    )  # exact: changes no bit (tests/test_rewrite.py)
    assert Workspace.open(tmp_path, device="cpu", precision="bf16").precision == "bf16"  # only when asked
    with pytest.raises(BenchError):
        Workspace.open(tmp_path, device="cpu", precision="fp8")


def test_perf_tiny_runs_and_reports(tmp_path, monkeypatch):
    from bench.perf import run_perf

    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    report = run_perf(device="cpu", as_json=True, size="tiny", out=out, err=err)
    data = json.loads(out.getvalue())
    assert data["device"] == "cpu" and "gpu" not in data
    assert "race:" in err.getvalue()  # progress on stderr, figures on stdout
    race = data["race"]
    for k in ("torchattacks", "ours_equal_work", "ours_early_stop", "ours_equal_work_unrewritten"):
        assert race["seconds"][k] > 0 and race["images_steps_per_s"][k] > 0
        assert 0 <= race["robust_acc"][k] <= 1
    assert race["ratio_equal_work"] > 0 and race["ratio_early_stop"] > 0
    assert race["robust_acc"]["ours_equal_work"] == race["robust_acc"]["ours_early_stop"]
    assert race["robust_acc"]["ours_equal_work"] == race["robust_acc"]["ours_equal_work_unrewritten"]
    assert race["model"]["defense"] in ("pgd_at", "logit_squeeze")
    for key in ("images", "steps"):
        assert all(r["seconds"] > 0 for r in data["scaling"][key])
        assert set(data["scaling"][f"fit_{key}"]) >= {"slope_s", "intercept_s", "r2", "time_ratios"}
    m = data["matrix"]
    assert m["cells"] > 0 and m["attack_seconds"] > 0 and m["train_seconds"] > 0 and m["wall_seconds"] > 0
    assert data["precision"]["bench_default"] == "fp32" and data["precision"]["recommended"] == "fp32"
    assert report["race"]["ratio_equal_work"] == race["ratio_equal_work"]


def test_perf_command_rejects_a_bad_size():
    from typer.testing import CliRunner

    from bench import cli

    result = CliRunner().invoke(cli.app, ["perf", "--size", "huge"])
    assert isinstance(result.exception, BenchError) and "--size" in str(result.exception)
