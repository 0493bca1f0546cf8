"""Usage errors of the command line: exit status 2, one line, no traceback, store untouched.

Run through the installed `bench` console script in a subprocess (what a user types,
with whatever typer the environment resolved) and in-process through `bench.cli.main`.
CI also runs this file alone in a freshly resolved virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_cli as _cli

from bench import cli
from bench.core.matrix import load_matrix

# The console script installed beside this interpreter (a venv's bin/, or the system's).
BENCH = Path(sys.executable).parent / "bench"

USAGE_ERRORS = [
    (["run"], "missing option '--defense'; see `bench run --help`"),
    (["run", "--defense", "natural", "--seed", "abc"], "'--seed'"),
    (["nosuchcommand"], "no such command 'nosuchcommand'; see `bench --help`"),
    (["run", "--defense", "natural", "--no-such-option"], "no such option"),
    (["ls", "defenses", "extra"], "unexpected extra argument"),
    (["ls", "nothing"], "cannot list 'nothing'"),
    (["train", "--defense", "natural", "--threads", "0"], "--threads must be between 1 and 1024, got 0"),
    (["run", "--defense", "natural", "--threads", "99999999999"], "--threads must be between 1 and 1024"),
    (["run", "--defense", "natural", "--eps", "abc"], "invalid value for '--eps'"),
    (["run", "--defense", "natural", "--batch-size", "-3"], "--batch-size must be at least 1 (or 0 for the default)"),
    (["eval", "--model", "m.py:build", "--batch-size", "many"], "invalid value for '--batch-size'"),
]


def _store_state(results: Path) -> tuple[bytes, list[str]]:
    """bench.db's bytes and the checkpoint folder's listing: what must not change."""
    db = results / "bench.db"
    ckpts = results / "checkpoints"
    listing = sorted(str(p.relative_to(results)) for p in ckpts.rglob("*")) if ckpts.exists() else []
    return (db.read_bytes() if db.exists() else b""), listing


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A results folder holding one tiny trained checkpoint and its quick-matrix cells."""
    from bench.run.driver import run_defense
    from bench.run.recipe import TrainRequest
    from bench.run.workspace import Workspace

    results = tmp_path_factory.mktemp("cli-errors") / "res"
    ws = Workspace.open(results)
    run_defense(ws, TrainRequest("natural", overrides=("epochs=1",)), load_matrix("quick"))
    ws.store.engine.dispose()  # closes SQLite's WAL into bench.db before it is compared
    return results


def _one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


@pytest.mark.parametrize("args, message", USAGE_ERRORS)
def test_usage_errors_of_the_installed_script_are_one_line(store, args, message):
    assert BENCH.exists(), f"no console script at {BENCH}: install the package (pip install -e .)"
    before = _store_state(store)
    proc = subprocess.run(
        [str(BENCH), *args, *(["--results", str(store)] if args[0] in ("run", "train") else [])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr), proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert _store_state(store) == before


@pytest.mark.parametrize("args, message", USAGE_ERRORS)
def test_usage_errors_in_process_are_one_line(store, monkeypatch, capsys, args, message):
    before = _store_state(store)
    extra = ["--results", str(store)] if args[0] in ("run", "train") else []
    code, _, err = _cli(monkeypatch, capsys, *args, *extra)
    assert code == 2 and _one_line(err) and err.startswith("error: ") and message in err, err
    assert _store_state(store) == before


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], []])
def test_help_and_bare_bench_exit_0_with_the_usage(args):
    proc = subprocess.run([str(BENCH), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: bench" in proc.stdout and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "ls", "nothing", "--debug"])
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="cannot list"):
        cli.main()


class _Planted:
    """A CIFAR batch entry whose unpickling would create a file (a stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _issue_inputs(tmp: Path) -> dict[str, str]:
    """The files behind the reported cases: matrices, a crafted CIFAR batch, a truncated MNIST."""
    import pickle
    import struct

    for name, eps in (("nan", "nan"), ("seven", "7.0"), ("negative", "-0.1")):
        (tmp / f"{name}.toml").write_text(f'[[cell]]\nattack = "fgsm"\n\n[[cell]]\nattack = "pgd"\neps = {eps}\n')
    (tmp / "unpaired.toml").write_text(
        '[[cell]]\nattack = "pgd"\neps = [0.1, 0.2]\nstep_size = [0.01]\npaired = ["eps", "step_size"]\n'
    )
    (tmp / "radius.toml").write_text('eps = 1.5\n\n[[cell]]\nattack = "fgsm"\n')
    (tmp / "nearest.toml").write_text('[[cell]]\nattack = "fgsm"\nnearest = 0.2\n')
    (tmp / "probe.toml").write_text('schedule = "cascade"\n[[cell]]\nattack = "square"\nprobe = 10\n')
    (tmp / "probe_attack.toml").write_text(
        'schedule = "cascade"\n[[cell]]\nattack = "square"\nnearest = 0.1\nprobe = 10\nprobe_attack = "square"\n'
    )
    (tmp / "gate.toml").write_text('schedule = "cascade"\n[[cell]]\nattack = "pgd"\nwhen = "black_box_won"\n')
    (tmp / "two_steps.toml").write_text('[[cell]]\nattack = "pgd"\nstep_size = 0.05\nstep_fraction = 0.25\n')
    (tmp / "paper_eps.toml").write_text('defense = "natural"\ndataset = "digits"\npaper_eps = 2.0\n')
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({"data": _Planted(tmp / "planted"), "labels": [0]}, f)
    raw = tmp / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, 10, 28, 28) + bytes(999))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 10) + bytes(10))
    return {
        "{nan}": str(tmp / "nan.toml"),
        "{seven}": str(tmp / "seven.toml"),
        "{negative}": str(tmp / "negative.toml"),
        "{unpaired}": str(tmp / "unpaired.toml"),
        "{radius}": str(tmp / "radius.toml"),
        "{nearest}": str(tmp / "nearest.toml"),
        "{probe}": str(tmp / "probe.toml"),
        "{probe_attack}": str(tmp / "probe_attack.toml"),
        "{gate}": str(tmp / "gate.toml"),
        "{two_steps}": str(tmp / "two_steps.toml"),
        "{paper_eps}": str(tmp / "paper_eps.toml"),
        "{cifar}": str(tmp / "cifar"),
        "{mnist}": str(tmp / "mnist"),
    }


# Every case reported against the bench, beyond the usage errors above.
ISSUE_CASES = [
    (["run", "--defense", "natural", "--matrix", "{nan}"], "cell 2 (pgd): eps must be a finite number, got nan"),
    (["run", "--defense", "natural", "--matrix", "{seven}"], "cell 2 (pgd): eps must be in (0, 1] for L-inf, got 7.0"),
    (
        ["run", "--defense", "natural", "--matrix", "{negative}"],
        "cell 2 (pgd): eps must be in (0, 1] for L-inf, got -0.1",
    ),
    (
        ["run", "--defense", "natural", "--dataset", "cifar10", "--data-root", "{cifar}"],
        "is refused: it refers to posix.system",
    ),
    (
        ["run", "--defense", "natural", "--dataset", "mnist", "--data-root", "{mnist}"],
        "t10k-images-idx3-ubyte' is corrupt or truncated",
    ),
    (
        ["run", "--defense", "natural", "--db", "postgresql+psycopg2://bench@localhost/bench"],
        'install the postgres extra (pip install -e ".[postgres]")',
    ),
    (["results", "--db", "mysql://bench@localhost/bench"], "its database driver (MySQLdb) is not installed"),
    # Plain postgresql:// is psycopg's: not installed, the driver line; installed, no server here.
    (["results", "--db", "postgresql://bench@127.0.0.1:9/bench"], "cannot open the store at 'postgresql://"),
    (["results", "--db", "not a url"], "check --db (an SQLAlchemy URL"),
    (["run", "--defense", "natural", "--set", "lr=nan"], "lr must be a finite number, got nan"),
    (["run", "--defense", "natural", "--seed", "-5"], "--seed must be an integer in [0, 2147483648)"),
    (["run", "--defense", "natural", "--eps", "2"], "--eps must be an L-inf radius in (0, 1] pixel units"),
    (["run", "--defense", "natural", "--eps", "nan"], "--eps must be an L-inf radius in (0, 1] pixel units"),
    (["run", "--defense", "natural", "--matrix", "{radius}"], "radius.toml': eps must be an L-inf radius in (0, 1]"),
    (
        ["run", "--defense", "natural", "--matrix", "{nearest}"],
        'nearest= picks among the images a cascade left standing; set schedule = "cascade"',
    ),
    (
        ["run", "--defense", "natural", "--matrix", "{probe}"],
        "cell 1 (square): probe ranks the images nearest= chooses; set nearest = 0.1 or drop probe",
    ),
    (
        ["run", "--defense", "natural", "--matrix", "{probe_attack}"],
        "cell 1 (square): probe_attack must be one of pgd, apgd, got 'square'",
    ),
    (
        ["run", "--defense", "natural", "--matrix", "{gate}"],
        "pgd runs when a black-box cell before it broke an image, and none comes before it; put a square cell",
    ),
    (
        ["run", "--defense", "natural", "--matrix", "{two_steps}"],
        "cell 1 (pgd): step_size 0.05 and step_fraction 0.25 both given: keep one",
    ),
    (
        ["run", "--defense", "natural", "--matrix", "{unpaired}"],
        "paired lists must be as long as each other (eps has 2, step_size has 1)",
    ),
    (
        ["run", "--defense", "natural", "--preset", "{paper_eps}"],
        "paper_eps must be an L-inf radius in (0, 1], got 2.0",
    ),
    (
        ["run", "--defense", "natural", "--dataset", "imagenet", "--set", "augment=crop"],
        "imagenet's training images are cropped and flipped as they stream from disk",
    ),
]


@pytest.mark.parametrize("args, message", ISSUE_CASES)
def test_reported_cases_exit_2_with_one_line_and_leave_the_store(store, tmp_path, monkeypatch, capsys, args, message):
    subst = _issue_inputs(tmp_path)
    before = _store_state(store)
    code, _, err = _cli(monkeypatch, capsys, *[subst.get(a, a) for a in args], "--results", str(store))
    assert code == 2 and _one_line(err) and message in err, err
    assert _store_state(store) == before
    assert not (tmp_path / "planted").exists()


@pytest.mark.parametrize("name", ["{probe}", "{probe_attack}", "{gate}", "{two_steps}"])
def test_a_bad_cascade_cell_through_the_installed_script(store, tmp_path, name):
    """The cell settings `fast` brought (`probe`, `probe_attack`, `when`, `step_fraction`),
    refused as a user meets them."""
    args, message = next(case for case in ISSUE_CASES if name in case[0])
    path = _issue_inputs(tmp_path)[name]
    before = _store_state(store)
    proc = subprocess.run(
        [str(BENCH), *[path if a == name else a for a in args], "--results", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and _one_line(proc.stderr) and message in proc.stderr, proc.stderr
    assert _store_state(store) == before


def test_defense_all_checks_every_recipe_before_training_any(store, monkeypatch, capsys):
    # `pair_weight` is a setting of alp and clp, the first two in order, but not of
    # gaussian_noise, the third: nothing may train before that is found out.
    before = _store_state(store)
    code, _, err = _cli(
        monkeypatch, capsys, "run", "--defense", "all", "--set", "pair_weight=0.5", "--results", str(store)
    )
    assert code == 2 and _one_line(err) and "--set pair_weight: not a setting of 'gaussian_noise'" in err
    assert _store_state(store) == before


def test_ctrl_c_exits_130_saying_what_is_kept(monkeypatch, capsys):
    import bench.api

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.api, "all_presets", interrupted)
    code, _, err = _cli(monkeypatch, capsys, "ls", "presets")
    assert code == 130 and _one_line(err) and err.startswith("interrupted: every cell committed so far is kept")
