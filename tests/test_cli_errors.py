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

from bench import cli

# The console script installed beside this interpreter (a venv's bin/, or the system's).
BENCH = Path(sys.executable).parent / "bench"

USAGE_ERRORS = [
    (["run"], "missing option '--defense'; see `bench run --help`"),
    (["run", "--defense", "natural", "--seed", "abc"], "'--seed'"),
    (["nosuchcommand"], "no such command 'nosuchcommand'; see `bench --help`"),
    (["run", "--defense", "natural", "--no-such-option"], "no such option"),
    (["ls", "defenses", "extra"], "unexpected extra argument"),
    (["ls", "nothing"], "cannot list 'nothing'"),
    (["train", "--defense", "natural", "--threads", "0"], "--threads must be at least 1"),
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
    from bench.env import Bench
    from bench.recipe import RunSpec
    from bench.schedule import run_defense

    results = tmp_path_factory.mktemp("cli-errors") / "res"
    bench = Bench.open(results)
    run_defense(bench, RunSpec("natural", overrides=("epochs=1",)), "quick")
    bench.store.engine.dispose()  # closes SQLite's WAL into bench.db before it is compared
    return results


def _one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


@pytest.mark.parametrize("args, message", USAGE_ERRORS)
def test_usage_errors_of_the_installed_script_are_one_line(store, args, message):
    assert BENCH.exists(), f"no console script at {BENCH}: install the package (pip install -e .)"
    before = _store_state(store)
    proc = subprocess.run([str(BENCH), *args, *(["--results", str(store)] if args[0] in ("run", "train") else [])],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr), proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert _store_state(store) == before


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


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
