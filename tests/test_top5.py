"""Top-5 beside top-1: every attack cell stores whether each image's label stayed among
the five largest logits (before and after it), the worst case ANDs them, and results,
the table, the board and the checkpoint page show them where a dataset has more than ten
classes (Kannan et al.'s ImageNet tables report both)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks
from cli_run import run_bench

from bench.core.data import load_dataset
from bench.engine.verdicts import in_top5
from bench.store.checkpoints import load_checkpoint
from bench.store.db import Store

pytestmark = pytest.mark.xdist_group("top5")  # one module fixture, run once


def test_in_top5_by_hand():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0], [0.0, 1, 2, 3, 4, 5, 6], [1.0, 1, 1, 1, 1, 1, 2]])
    # Label 4 is fifth largest in row 0 (in), smallest in row 1 (out); with four classes, all are in.
    assert in_top5(logits, torch.tensor([4, 0, 6])).tolist() == [True, False, True]
    assert in_top5(logits[:, :5], torch.tensor([0, 0, 4])).tolist() == [True, True, True]


def _cifar100(root: Path, n: int = 48) -> Path:
    """A tiny CIFAR-100 folder in the published format: random pixels, labels over 100 classes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
            pickle.dump({"data": data, "fine_labels": [int(v) for v in rng.integers(0, 100, n)]}, f)
    return root


@pytest.fixture(scope="module")
def cifar100_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("top5")
    data, results = _cifar100(root / "data"), root / "res"
    run = run_bench(
        "run", "--defense", "natural", "--dataset", "cifar100", "--arch", "resnet8", "--set", "epochs=1",
        "--matrix", "quick", "--data-root", str(data), "--results", str(results),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return root, data, results, run.stdout


def test_a_cell_stores_top5_as_an_independent_fgsm_finds_it(cifar100_run):
    _, data, results, _ = cifar100_run
    store = Store.for_results(results)
    (ck,) = store.checkpoints()
    model = load_checkpoint(ck.path).eval()
    x, y = load_dataset("cifar100", "test", str(data))
    (fgsm,) = [c for c in store.evaluations([ck.id]) if c.attack == "fgsm"]
    # torchattacks' FGSM at the same eps: its adversarial images, judged top-5 by hand.
    x_adv = torchattacks.FGSM(model, eps=fgsm.params["eps"])(x, y)
    with torch.no_grad():
        clean, adv = model(x), model(x_adv)
    top5 = lambda z: (z.topk(5, dim=1).indices == y[:, None]).any(1)  # noqa: E731
    assert fgsm.top5().tolist() == (top5(clean) & top5(adv)).tolist()
    assert fgsm.extra["clean_top5"] == pytest.approx(float(top5(clean).float().mean()))


def test_results_the_table_the_board_and_the_page_show_top5(cifar100_run):
    _, _, results, table = cifar100_run
    assert "top-5 %" in table
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    (worst,) = [r for r in rows if r["attack"] == "worst_case"]
    cells = [r for r in rows if r["attack"] != "worst_case"]
    # A label that stays first stays in the top five: top-5 is never below top-1, per cell and ANDed.
    for r in [*cells, worst]:
        assert r["robust_top5"] is not None and r["robust_top5"] >= r["robust_acc"]
    assert worst["robust_top5"] <= min(r["robust_top5"] for r in cells)
    csv = run_bench("results", "--results", str(results), "--format", "csv").stdout
    assert csv.splitlines()[0].split(",").count("robust_top5") == 1
    site = results.parent / "site"
    assert run_bench("site", "--results", str(results), "--out", str(site)).returncode == 0
    assert "Worst top\u20115" in (site / "index.html").read_text()
    page = next((site / "ck").glob("*.html")).read_text()
    assert 'top-5 <strong class="top5">' in page


def test_ten_classes_show_no_top5_column(tmp_path):
    run = run_bench("run", "--defense", "natural", "--set", "epochs=1", "--matrix", "quick", "--results", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "top-5" not in run.stdout
