"""Counterexamples kept: every cell that breaks images keeps the inputs that broke them
beside its checkpoint (safetensors, with the cell's key), and `bench export` writes the
worst case's as one tensor index-aligned with the test set, which a fresh load of the
model judges back to the worst case's robust accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from cli_run import run_bench
from safetensors import safe_open

from bench.core.data import load_dataset
from bench.store.checkpoints import load_checkpoint
from bench.store.db import Store
from bench.store.examples import examples_path, read_examples

pytestmark = pytest.mark.xdist_group("examples")  # one module fixture, run once
EPS = 0.1
MATRIX = """
[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 10

[[cell]]
attack = "verify"
time_limit = 1.0
subset = 24
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    (root / "m.toml").write_text(MATRIX)
    results = root / "res"
    run = run_bench(
        "run", "--defense", "natural", "--arch", "digits_mlp", "--set", "epochs=5",
        "--matrix", str(root / "m.toml"), "--eps", str(EPS), "--results", str(results),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    store = Store.for_results(results)
    (ck,) = store.checkpoints()
    return root, results, store, ck


def _judge(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).argmax(1)


def test_each_cell_keeps_the_inputs_that_broke_its_images(stored):
    _, _, store, ck = stored
    model = load_checkpoint(ck.path).eval()
    x, y = load_dataset("digits", "test")
    for cell in store.evaluations([ck.id]):
        kept = read_examples(ck.path, cell.cell_key)
        assert kept is not None, cell.cell_key
        with safe_open(str(examples_path(ck.path, cell.cell_key)), framework="pt") as f:
            assert set(f.keys()) == {"indices", "inputs"}
            assert f.metadata() == {"cell_key": cell.cell_key, "threat": f"linf-{EPS:g}"}
        at = kept.indices
        images = torch.arange(len(x)) if cell.indices is None else torch.tensor(cell.indices)
        standing = torch.from_numpy(cell.correct())
        clean_right = _judge(model, x[images]) == y[images]
        # Exactly the images it broke (right when clean, wrong after), each input in the
        # ball and misclassified by the model: a verifier's counterexamples as an attack's.
        assert sorted(at.tolist()) == sorted(images[clean_right & ~standing].tolist())
        assert (kept.inputs - x[at]).abs().max() <= EPS + 1e-6
        assert kept.inputs.min() >= 0 and kept.inputs.max() <= 1
        assert bool((_judge(model, kept.inputs) != y[at]).all())
    verify = next(c for c in store.evaluations([ck.id]) if c.attack == "verify")
    assert len(verify.verdicts().not_robust) > 0  # some counterexamples were checked above


def test_an_exported_worst_case_is_judged_back_by_a_fresh_load(stored):
    root, results, _store, ck = stored
    out = root / "adv.pt"
    done = run_bench("export", "--checkpoint", ck.key[:8], "--out", str(out), "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert "adversarial inputs; worst case linf-0.1" in done.stdout
    inputs = torch.load(out)
    x, y = load_dataset("digits", "test")
    assert inputs.shape == x.shape and inputs.dtype == torch.float32
    assert (inputs - x).abs().max() <= EPS + 1e-6
    model = load_checkpoint(ck.path).eval()  # a fresh load of the weights
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    (worst,) = [r for r in rows if r["attack"] == "worst_case"]
    assert float((_judge(model, inputs) == y).float().mean()) == pytest.approx(worst["robust_acc"])


def test_export_refuses_what_it_cannot_write_in_one_line(stored):
    root, results, _, ck = stored
    for args, message in (
        (["--checkpoint", "zzzz", "--out", str(root / "a.pt")], "--checkpoint 'zzzz' must name one stored checkpoint"),
        (["--checkpoint", ck.key[:8], "--out", str(root / "a.npy")], "must be a .pt file in an existing folder"),
        (
            ["--checkpoint", ck.key[:8], "--out", str(root / "a.pt"), "--threat", "linf-0.3"],
            "has no worst case at linf-0.3",
        ),
    ):
        proc = run_bench("export", *args, "--results", str(results))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not (root / "a.pt").exists()
