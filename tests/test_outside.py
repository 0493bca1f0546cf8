"""Outside models: `bench eval` and `bench.evaluate` on a user's own nn.Module."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cheats import Saturated
from safetensors.torch import save_file

import bench
from bench import cli
from bench.core.data import get_spec
from bench.core.matrix import load_matrix
from bench.science.admission import admit, count_autograd_calls
from bench.science.flags import compute_flags
from bench.store.db import Checkpoint, Store
from bench.store.factories import weights_hash

DIGITS = get_spec("digits")
MATRIX = """
[[cell]]
attack = "pgd"
steps = 10
"""
FACTORY = """
from bench.core.data import get_spec
from bench.core.models import build_model


def build():
    return build_model("digits_cnn", get_spec("digits"))


def not_a_model():
    return 42


def wrong_input():
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 10))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, natural_model):
    d = tmp_path_factory.mktemp("outside")
    (d / "my_models.py").write_text(FACTORY)
    (d / "tiny.toml").write_text(MATRIX)
    state = {k: v.contiguous() for k, v in natural_model.state_dict().items()}
    save_file(state, str(d / "natural.safetensors"))
    bias = sorted(k for k in state if k.endswith("bias"))[-1]
    changed = dict(state, **{bias: state[bias] + 0.5})
    save_file(changed, str(d / "changed.safetensors"))
    save_file({"nonsense": torch.zeros(3)}, str(d / "misfit.safetensors"))
    return d


def run_cli(args, monkeypatch, capsys, cwd):
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr()


def eval_args(results, model="my_models.py:build", name="mine", weights="natural.safetensors"):
    args = [
        "eval",
        "--model",
        model,
        "--name",
        name,
        "--matrix",
        "tiny.toml",
        "--results",
        str(results),
        "--device",
        "cpu",
    ]
    return args + (["--weights", weights] if weights else [])


def snapshot(folder: Path) -> dict:
    """The store's rows (a SQL dump) and every other file under the folder with its hash."""
    if not folder.exists():
        return {}
    files = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("bench.db")
    }
    with sqlite3.connect(folder / "bench.db") as db:
        files["bench.db"] = "\n".join(db.iterdump())
    return files


def test_eval_stores_by_name_and_hash_and_reruns_nothing(workdir, tmp_path, monkeypatch, capsys, natural_model):
    results = tmp_path / "results"
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["bench", *eval_args(results)])
    cli.main()
    first = capsys.readouterr()
    assert "mine [" in first.err and "added, 1 of 1 cells run" in first.err
    store = Store.for_results(results)
    (row,) = store.checkpoints()
    assert (row.defense, row.arch, row.preset) == ("mine", "outside", None)
    outside = row.meta["outside"]
    assert outside["factory"] == "my_models.py:build"
    assert outside["weights_sha256"] == weights_hash(natural_model)
    assert (Path(row.path) / "factory.py").read_text() == FACTORY
    assert "admission" in row.meta
    # The rerun builds and hashes the model, and evaluates nothing.
    before = snapshot(results)
    monkeypatch.setattr(sys, "argv", ["bench", *eval_args(results)])
    cli.main()
    assert "found, 0 of 1 cells run" in capsys.readouterr().err
    assert snapshot(results) == before
    # A changed model under the same name is a new entry; the old one is kept.
    monkeypatch.setattr(sys, "argv", ["bench", *eval_args(results, weights="changed.safetensors")])
    cli.main()
    capsys.readouterr()
    rows = store.checkpoints()
    assert [r.defense for r in rows] == ["mine", "mine"] and rows[0].key != rows[1].key
    assert len(store.evaluations([rows[0].id])) == 1 and len(store.evaluations([rows[1].id])) == 1


def test_an_eval_that_finds_every_cell_loads_no_data(workdir, tmp_path, monkeypatch, capsys):
    """The rerun checks the model's answers on a batch of the dataset's shape, not on test
    images: it imports no dataset reader (scikit-learn reads digits) and loads nothing."""
    results = tmp_path / "results"
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["bench", *eval_args(results)])
    cli.main()
    assert "added, 1 of 1 cells run" in capsys.readouterr().err
    code = (
        "import sys\nfrom bench import cli\n"
        f"sys.argv = ['bench', *{eval_args(results)!r}]\n"
        "cli.main()\n"
        "print(sorted(m for m in ('sklearn', 'mlxtend') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "found, 0 of 1 cells run" in proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_results_show_the_name_and_transfer_rebuilds_outside_models(workdir, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.chdir(workdir)
    for weights, name in (("natural.safetensors", "mine"), ("changed.safetensors", "theirs")):
        monkeypatch.setattr(sys, "argv", ["bench", *eval_args(results, name=name, weights=weights)])
        cli.main()
    capsys.readouterr()
    # Rebuilt from the store alone: the user's file may be gone.
    os.rename(workdir / "my_models.py", workdir / "my_models.py.away")
    try:
        monkeypatch.setattr(sys, "argv", ["bench", "results", "--format", "csv", "--results", str(results)])
        cli.main()
        csv = capsys.readouterr().out
        assert csv.count("\nmine,") == 2 and csv.count("\ntheirs,") == 2
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "bench",
                "transfer",
                "--source",
                "mine",
                "--target",
                "theirs",
                "--results",
                str(results),
                "--device",
                "cpu",
            ],
        )
        cli.main()
    finally:
        os.rename(workdir / "my_models.py.away", workdir / "my_models.py")
    out = capsys.readouterr()
    assert "evaluated 1 source/target pair" in out.err
    store = Store.for_results(results)
    (t,) = store.transfers()
    ids = {c.defense: c.id for c in store.checkpoints()}
    assert (t.source_id, t.target_id) == (ids["mine"], ids["theirs"])


@pytest.fixture(scope="module")
def stored(workdir, tmp_path_factory):
    """A results folder holding one outside model: bad input must leave it as it is."""
    results = tmp_path_factory.mktemp("stored") / "results"
    bench.evaluate(
        str(workdir / "my_models.py") + ":build",
        name="mine",
        matrix=str(workdir / "tiny.toml"),
        weights=str(workdir / "natural.safetensors"),
        results=results,
        device="cpu",
    )
    return results


BAD = [
    ({"model": "no_such_module_xyz:build"}, "does not import"),
    ({"model": "my_models.py:not_a_model"}, "returned a int, not a torch.nn.Module"),
    ({"model": "my_models.py:wrong_input", "weights": None}, "fails on a digits batch of shape (2, 1, 8, 8)"),
    ({"weights": "misfit.safetensors"}, "do not fit the model"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=["import", "not-a-module", "input-shape", "weights"])
def test_bad_outside_models_exit_2_with_one_line_and_leave_the_store(
    workdir, stored, monkeypatch, capsys, bad, message
):
    results = stored
    before = snapshot(results)
    kw = {"model": "my_models.py:build", "weights": "natural.safetensors", **bad}
    code, out = run_cli(
        eval_args(results, model=kw["model"], name="bad", weights=kw["weights"]), monkeypatch, capsys, workdir
    )
    assert code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert snapshot(results) == before
    # The installed script says the same.
    args = eval_args(results, model=kw["model"], name="bad", weights=kw["weights"])
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("bench")), *args], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert snapshot(results) == before


def test_python_api_evaluates_a_module_once(natural_model, tmp_path, workdir):
    rows = bench.evaluate(
        natural_model, name="api_model", matrix=str(workdir / "tiny.toml"), results=tmp_path, device="cpu"
    )
    assert [r["defense"] for r in rows] == ["api_model"] * 2 and rows[-1]["attack"] == "worst_case"
    store = Store.for_results(tmp_path)
    n = len(store.evaluations())
    again = bench.evaluate(
        natural_model, name="api_model", matrix=str(workdir / "tiny.toml"), results=tmp_path, device="cpu"
    )
    assert again == rows and len(store.evaluations()) == n and len(store.checkpoints()) == 1


def test_weights_hash_covers_buffers_and_ignores_order():
    a = torch.nn.BatchNorm1d(3)
    b = torch.nn.BatchNorm1d(3)
    assert weights_hash(a) == weights_hash(b)
    b.running_mean += 1  # a buffer, not a parameter
    assert weights_hash(a) != weights_hash(b)


class Probabilities(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


class InnerOptimizer(torch.nn.Module):
    """Takes one gradient step on its input inside forward (a test-time defense)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.net(z).logsumexp(1).sum(), z)
        return self.net((x + 0.01 * g.sign()).clamp(0, 1))


def flags_of(model, digits_test) -> dict:
    x, y = digits_test
    ck = Checkpoint(id=1, threat=DIGITS.threat.name, meta={"admission": admit(model, x, y, DIGITS.threat.eps)})
    return {f["name"]: f["numbers"] for f in compute_flags(ck, [], [])}


def test_admission_flags_carry_their_numbers(natural_model, digits_test):
    assert set(flags_of(natural_model, digits_test)) <= {"attack_not_converged"}
    probs = flags_of(Probabilities(natural_model), digits_test)["outputs_probabilities"]
    assert probs["min"] >= 0 and probs["max"] <= 1 and probs["max_row_sum_error"] < 1e-5
    inner = flags_of(InnerOptimizer(natural_model), digits_test)
    assert inner["autograd_in_forward"]["autograd_calls_per_forward"] == 1
    x, _ = digits_test
    assert count_autograd_calls(natural_model, x[:4]) == 0


TRANSFER_MATRIX = """
[[cell]]
attack = "fgsm"

[transfer]
surrogates = ["natural"]
cells = ["pgd:steps=5"]
"""


def test_matrix_transfer_cells_come_from_surrogates_the_bench_trains(natural_model, tmp_path):
    from bench.run.driver import run_defense
    from bench.run.recipe import TrainRequest
    from bench.run.workspace import Workspace

    matrix = tmp_path / "t.toml"
    matrix.write_text(TRANSFER_MATRIX)
    results = tmp_path / "results"
    rows = bench.evaluate(Saturated(natural_model), name="sat", matrix=str(matrix), results=results, device="cpu")
    store = Store.for_results(results)
    ids = {c.defense: c.id for c in store.checkpoints()}
    assert set(ids) == {"sat", "natural"}  # the surrogate: the natural recipe's own checkpoint
    (t,) = store.transfers()
    assert (t.source_id, t.target_id, t.extra["surrogate"]) == (ids["natural"], ids["sat"], "natural")
    assert t.cell_key.startswith("pgd:") and "steps=5" in t.cell_key
    (wc,) = [r for r in rows if r["attack"] == "worst_case"]
    # fgsm, the transfer, and the distill witness its zero gradients call for
    assert wc["cells"] == 3 and wc["robust_acc"] <= t.robust_acc
    # A rerun crafts and judges nothing; the surrogate is never its own transfer target.
    bench.evaluate(Saturated(natural_model), name="sat", matrix=str(matrix), results=results, device="cpu")
    report = run_defense(Workspace.open(results, device="cpu"), TrainRequest("natural"), load_matrix(str(matrix)))
    assert not report.trained and len(store.transfers()) == 1


def test_boards_tell_override_variants_apart():
    from bench.reporting.site.load import override_labels

    def ck(id_, beta, epochs=30, preset="logit_squeeze_digits"):
        return Checkpoint(
            id=id_,
            dataset="digits",
            defense="logit_squeeze",
            preset=preset,
            config={"beta": beta, "sigma": 0.5},
            train_config={"epochs": epochs, "lr": 0.1},
        )

    labels = override_labels([ck(1, 0.5), ck(2, 1.0), ck(3, 1.0, epochs=5), ck(4, 0.5, preset=None)])
    assert labels == {1: "beta=0.5, epochs=30", 2: "beta=1, epochs=30", 3: "beta=1, epochs=5"}
