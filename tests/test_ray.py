"""The Ray executor on a real local Ray cluster (2 CPUs, shared by the session): the same
numbers as the local executor bit for bit, transfer grids, a killed worker, a failing attack."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

# Under pytest-xdist every Ray test runs on one worker, so one local cluster starts, not
# one per worker on the same two cores.
pytestmark = pytest.mark.xdist_group("ray")

# E402 is silenced below: the imports follow importorskip, so a machine without Ray
# skips this module before the Ray executor is imported.
from servers import read_log  # noqa: E402

from bench.core.cells import make_cell  # noqa: E402
from bench.core.matrix import load_matrix  # noqa: E402
from bench.core.provenance import source_digest  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.run.attacking import attack_checkpoint  # noqa: E402
from bench.run.driver import plan_run, run_defenses  # noqa: E402
from bench.run.executors.ray import RayExecutor, _run_job  # noqa: E402
from bench.run.recipe import TrainRequest, resolve  # noqa: E402
from bench.run.training import ensure_checkpoint, load_model  # noqa: E402
from bench.run.transfer import run_transfers  # noqa: E402
from bench.run.workspace import Workspace  # noqa: E402

MATRIX = """
[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 5

[[cell]]
attack = "logged_bim"
steps = 7
"""


def _numbers(ws: Workspace) -> tuple[dict, dict, dict]:
    """Everything a run computes, keyed by checkpoint key (ids differ between stores)."""
    cks = {c.id: c for c in ws.store.checkpoints()}
    weights = {c.key: c.sha256 for c in cks.values()}
    cells = {
        (cks[e.checkpoint_id].key, e.cell_key): (e.clean_acc, e.robust_acc, e.n, e.correct_bits)
        for e in ws.store.evaluations()
    }
    transfers = {
        (cks[t.source_id].key, cks[t.target_id].key, t.cell_key): (t.robust_acc, t.correct_bits)
        for t in ws.store.transfers()
    }
    return weights, cells, transfers


def test_a_ray_run_stores_the_same_numbers_as_a_local_run_bit_for_bit(
    ray_cluster, registered_plugins, tmp_path, monkeypatch
):
    matrix = tmp_path / "small.toml"
    matrix.write_text(MATRIX)
    specs = [TrainRequest("natural", overrides=("epochs=2",)), TrainRequest("logit_squeeze", overrides=("epochs=2",))]
    local = Workspace.open(tmp_path / "local")
    parsed = load_matrix(str(matrix))
    run_defenses(local, [plan_run(s, parsed, None) for s in specs], parsed)
    run_transfers(local, "all", "all", "pgd:steps=5")

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value: puts.append(type(value).__name__) or real_put(value))
    remote = Workspace.open(tmp_path / "ray")
    with RayExecutor() as executor:
        reports = run_defenses(remote, [plan_run(s, parsed, None) for s in specs], parsed, executor)
        assert not executor.started  # joined the session's cluster instead of starting one
        # Each model travels once for all its cells; the test set once for everything.
        assert puts.count("Tensor") == 2 and len(puts) == 4  # two models, x and y
        puts.clear()
        grid = run_transfers(remote, "all", "all", "pgd:steps=5", executor=executor)
    assert all(r.trained and len(r.cells_run) == 3 and not r.failures for r in reports)
    assert grid.crafted == 2 and grid.evaluated == 4 and len(puts) == 4  # 2 source models, x, y

    weights, cells, transfers = _numbers(remote)
    assert len(weights) == 2 and len(cells) == 6 and len(transfers) == 4
    assert (weights, cells, transfers) == _numbers(local)  # trained weights too: equal sha256


def test_a_worker_killed_mid_cell_is_retried_and_the_cell_committed_once(ray_cluster, registered_plugins, tmp_path):
    ws = Workspace.open(tmp_path / "res")
    row, _ = ensure_checkpoint(ws, resolve(TrainRequest("natural", overrides=("epochs=1",))))
    threat = resolve(TrainRequest("natural")).dataset.threat
    marker = tmp_path / "killed-once"
    killer = make_cell("killer_bim", {"steps": 3, "marker": str(marker)}, threat)
    cells = [killer, make_cell("fgsm", {}, threat)]
    with RayExecutor() as executor:
        ran = attack_checkpoint(ws, row, cells, lambda: load_model(row, ws.device), executor)
    assert marker.exists()  # the first attempt killed its worker
    assert sorted(ran) == sorted(c.key for c in cells) and not ran.failures
    rows = Counter(e.cell_key for e in ws.store.evaluations())
    assert rows == Counter({c.key: 1 for c in cells})
    assert read_log(ray_cluster).count("cell killer_bim steps=3") == 2  # killed, then retried
    # The retried cell holds the numbers the same attack gives when nothing is killed.
    again = Workspace.open(tmp_path / "again")
    row2, _ = ensure_checkpoint(again, resolve(TrainRequest("natural", overrides=("epochs=1",))))
    attack_checkpoint(again, row2, [killer], lambda: load_model(row2, again.device))
    first = {e.cell_key: e for e in ws.store.evaluations()}[killer.key]
    assert again.store.evaluations()[0].correct_bits == first.correct_bits


def test_a_failing_attack_fails_its_own_cell_on_ray(ray_cluster, registered_plugins, tmp_path):
    ws = Workspace.open(tmp_path / "res")
    row, _ = ensure_checkpoint(ws, resolve(TrainRequest("natural", overrides=("epochs=1",))))
    threat = resolve(TrainRequest("natural")).dataset.threat
    failing, fgsm = make_cell("failing", {}, threat), make_cell("fgsm", {}, threat)
    with RayExecutor() as executor:
        ran = attack_checkpoint(ws, row, [failing, fgsm], lambda: load_model(row, ws.device), executor)
    assert list(ran) == [fgsm.key]
    assert ran.failures == {failing.key: "RuntimeError: this attack always fails"}
    assert [e.cell_key for e in ws.store.evaluations()] == [fgsm.key]


def test_bench_run_and_transfer_take_executor_ray(ray_cluster, tmp_path, monkeypatch, capsys):
    import json
    import sys

    from bench import cli

    def bench_cli(*args):
        monkeypatch.setattr(sys, "argv", ["bench", *args, "--results", str(tmp_path)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
            raise SystemExit(0)
        return exc.value.code

    monkeypatch.setenv("BENCH_EXECUTOR", "ray")
    assert bench_cli("run", "--defense", "natural", "--set", "epochs=1", "--matrix", "quick") == 0
    assert bench_cli("train", "--defense", "natural", "--set", "epochs=2") == 0
    assert bench_cli("transfer", "--source", "all", "--target", "all", "--attack", "fgsm") == 0
    capsys.readouterr()
    assert bench_cli("results", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    # 3 cells of the run's checkpoint, and a 2 x 2 transfer grid over both checkpoints
    assert sum(r["attack"] != "worst_case" for r in rows) == 3 + 4 and ray.is_initialized()


MODEL_FILE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def build():
    torch.manual_seed(0)
    return Tiny()
"""


def test_bench_eval_of_a_py_file_model_on_ray_equals_local(ray_cluster, tmp_path, monkeypatch):
    """A model whose class lives in a .py file no worker can import by name travels with
    its code (bench.run.executors.ray), and its cells equal a local run bit for bit."""
    import sys

    from bench import cli
    from bench.store.db import Store

    (tmp_path / "my_models.py").write_text(MODEL_FILE)
    # The verifier's cells run as jobs like any other (its verdicts, fixed by the bounds,
    # the seeded search and the MILP well inside the limit, equal too).
    (tmp_path / "m.toml").write_text(
        '[[cell]]\nattack = "fgsm"\n\n[[cell]]\nattack = "pgd"\nsteps = [5, 10]\n\n'
        '[[cell]]\nattack = "verify"\ntime_limit = 60.0\n\n[[cell]]\nattack = "certify"\n'
    )
    stored = {}
    for executor in ("local", "ray"):
        results = tmp_path / executor
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "bench",
                "eval",
                "--model",
                str(tmp_path / "my_models.py:build"),
                "--name",
                "tiny",
                "--matrix",
                str(tmp_path / "m.toml"),
                "--results",
                str(results),
                "--executor",
                executor,
            ],
        )
        with pytest.raises(SystemExit) as exc:
            cli.main()
            raise SystemExit(0)
        assert exc.value.code == 0
        store = Store(f"sqlite:///{results / 'bench.db'}")
        stored[executor] = {e.cell_key: (e.robust_acc, e.correct_bits, e.proven_bits) for e in store.evaluations()}
    assert len(stored["local"]) == 5 and stored["ray"] == stored["local"]


@dataclasses.dataclass
class _Job:
    def run(self):
        return "ran"


def test_a_worker_running_other_code_than_the_driver_refuses_its_job():
    Job = _Job

    assert _run_job(Job(), (), 1, [], source_digest()) == "ran"
    with pytest.raises(BenchError, match="runs other bench code than the driver"):
        _run_job(Job(), (), 1, [], "0" * 64)
