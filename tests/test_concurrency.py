"""The store on SQLite and on a real PostgreSQL server: idempotent writes, claims with
leases, and two `bench run` drivers side by side on one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from servers import plugin_env, read_log
from sqlalchemy import func, select

from bench.store.claims import Claims, craft_claim, eval_claim, train_claim
from bench.store.db import Checkpoint, Claim, Evaluation, Store, Transfer

CHECKPOINT = dict(
    key="k" * 16,
    dataset="digits",
    defense="natural",
    preset=None,
    arch="digits_cnn",
    seed=0,
    threat="linf-0.2",
    config={"a": 1},
    train_config={},
    path="/nowhere",
    sha256="s" * 64,
    epochs=1,
    train_seconds=1.5,
    device="cpu",
    meta={"clean_acc": 0.9},
)
CELL = dict(
    cell_key="fgsm:eps=0.2,loss=xent",
    attack="fgsm",
    params={"eps": 0.2},
    threat="linf-0.2",
    clean_acc=0.9,
    robust_acc=0.5,
    n=3,
    seconds=0.1,
    correct_bits=b"\xa0",
    indices=None,
)


def _count(store: Store, model) -> int:
    with store.Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_writes_are_idempotent(store_url):
    store = Store(store_url)
    first = store.add_checkpoint(**CHECKPOINT)
    again = store.add_checkpoint(**dict(CHECKPOINT, sha256="t" * 64, train_seconds=9.0))
    assert again.id == first.id and again.sha256 == "s" * 64  # the first writer's row is kept
    other = store.add_checkpoint(**dict(CHECKPOINT, key="o" * 16))
    assert store.add_evaluation(first.id, **CELL) is True
    assert store.add_evaluation(first.id, **dict(CELL, robust_acc=0.1)) is False
    assert store.add_transfer(other.id, first.id, **CELL) is True
    assert store.add_transfer(other.id, first.id, **CELL) is False
    assert (_count(store, Checkpoint), _count(store, Evaluation), _count(store, Transfer)) == (2, 1, 1)
    row = store.evaluations()[0]
    assert row.robust_acc == 0.5 and row.correct_bits == b"\xa0" and row.extra == {}
    store.replace_flags(first.id, [{"name": "f", "message": "m", "numbers": {"x": 1}}])
    store.replace_flags(first.id, [{"name": "f", "message": "m", "numbers": {"x": 2}}])
    assert [f.numbers for f in store.flags()] == [{"x": 2}]


def test_claim_keys_are_spelled_as_the_claims_table_keeps_them():
    # Drivers of different versions sharing a store must spell a key alike.
    assert train_claim("abc") == "train:abc"
    assert eval_claim("abc", "pgd:eps=0.2,steps=10") == "eval:abc:pgd:eps=0.2,steps=10"
    assert craft_claim("abc", "pgd:keep=last") == "craft:abc:pgd:keep=last"


def test_a_claim_is_held_by_one_driver_until_released_or_expired(store_url):
    store = Store(store_url)
    a, b = Claims(store, lease=1.5), Claims(store, lease=1.5)
    assert a.acquire("train:x") and not b.acquire("train:x")
    a.renew()
    assert not b.acquire("train:x")
    time.sleep(1.8)  # a stopped renewing, as a dead driver on another host would
    assert b.acquire("train:x") and not a.acquire("train:x")
    b.release("train:x")
    assert a.acquire("train:x")
    with store.Session() as s:
        assert s.scalar(select(Claim.owner).where(Claim.key == "train:x")) == a.owner


def test_a_dead_driver_on_this_host_loses_its_claims_at_once(store_url):
    store = Store(store_url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = Claims(store, lease=3600, owner=f"{socket.gethostname()}:{int(dead.stdout)}:deadbeef")
    assert ghost.acquire("eval:k:c")
    alive = Claims(store, lease=3600, owner=f"{socket.gethostname()}:{os.getppid()}:cafebabe")
    assert alive.acquire("eval:k:d")
    mine = Claims(store)
    assert mine.acquire("eval:k:c")  # the owner's process is gone: taken over without waiting
    assert not mine.acquire("eval:k:d")  # the owner is alive and its lease runs


def test_renewing_keeps_a_claim_alive_past_its_lease(store_url):
    store = Store(store_url)
    with Claims(store, lease=1.5) as a:
        assert a.acquire("train:y")
        time.sleep(2.5)  # the background thread renews every 0.5 s
        assert not Claims(store, lease=1.5).acquire("train:y")
    assert _count(store, Claim) == 0  # closing released it


MATRIX = """
[[cell]]
attack = "logged_bim"
steps = [2, 3, 4]

[[cell]]
attack = "fgsm"
"""


def _drivers(argvs: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for argv in argvs
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]


def test_three_drivers_side_by_side_never_crash_duplicate_or_compute_twice(store_url, bench_plugins, tmp_path):
    """Two drivers with the same recipe and a third with another, started together."""
    matrix = tmp_path / "tiny.toml"
    matrix.write_text(MATRIX)
    log = tmp_path / "computed.log"
    argv = [
        shutil_which_bench(),
        "run",
        "--defense",
        "logged_natural",
        "--set",
        "epochs=2",
        "--matrix",
        str(matrix),
        "--results",
        str(tmp_path / "res"),
        "--db",
        store_url,
    ]
    other = [*argv[:5], "epochs=3", *argv[6:]]
    runs = _drivers([argv, argv, other], plugin_env(bench_plugins, log))
    assert [r.returncode for r in runs] == [0, 0, 0], "".join(r.stderr for r in runs)
    store = Store(store_url)
    checkpoints = store.checkpoints()
    assert len(checkpoints) == 2
    evaluations = store.evaluations()
    per_cell = Counter((e.checkpoint_id, e.cell_key) for e in evaluations)
    assert len(evaluations) == 4 * 2 and set(per_cell.values()) == {1}
    flags = Counter((f.checkpoint_id, f.name) for f in store.flags())
    assert all(v == 1 for v in flags.values())
    assert _count(store, Claim) == 0
    # Evidence that nothing ran twice: each training and each logged cell is in the log
    # once per checkpoint, whichever driver computed it.
    computed = Counter(read_log(log))
    assert computed == Counter({"train": 2, **{f"cell logged_bim steps={s}": 2 for s in (2, 3, 4)}})
    trained = sum(
        ": trained," in line for r in runs for line in r.stderr.splitlines() if line.startswith("logged_natural [")
    )
    assert trained == 2  # one of the two same-recipe drivers found the other's checkpoint
    folders = (tmp_path / "res" / "checkpoints" / "digits" / "logged_natural").iterdir()
    assert sorted(f.name for f in folders) == sorted(c.key for c in checkpoints)  # no stray temporary folder


def shutil_which_bench() -> str:
    import shutil

    path = shutil.which("bench", path=os.path.dirname(sys.executable)) or shutil.which("bench")
    assert path, "the bench console script is not installed"
    return path


def test_a_failing_attack_fails_its_own_cell_and_the_run_exits_nonzero(bench_plugins, tmp_path):
    matrix = tmp_path / "failing.toml"
    matrix.write_text('[[cell]]\nattack = "failing"\n\n[[cell]]\nattack = "fgsm"\n')
    res = tmp_path / "res"
    run = subprocess.run(
        [
            shutil_which_bench(),
            "run",
            "--defense",
            "natural",
            "--set",
            "epochs=1",
            "--matrix",
            str(matrix),
            "--results",
            str(res),
        ],
        capture_output=True,
        text=True,
        env=plugin_env(bench_plugins, tmp_path / "log"),
    )
    assert run.returncode == 1
    assert "failed failing:" in run.stderr and "RuntimeError: this attack always fails" in run.stderr
    assert "second line" not in run.stderr and "Traceback" not in run.stderr
    assert [e.cell_key for e in Store(f"sqlite:///{res / 'bench.db'}").evaluations()] == ["fgsm:eps=0.2,loss=xent"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "dask"], "--executor must be one of local, ray, got 'dask'"),
        (["--ray-address", "auto"], "--ray-address is for --executor ray"),
        (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster at '127.0.0.1:1'"),
        (["--executor", "ray", "--ray-address", "head-node"], "is not auto or host:port"),
    ],
)
def test_bad_executor_options_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    from bench import cli

    argv = ["run", "--defense", "natural", "--results", str(tmp_path / "res"), *args]
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1
    run = subprocess.run([shutil_which_bench(), *argv], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and run.stderr.count("\n") == 1
    assert not (tmp_path / "res" / "checkpoints").exists()
