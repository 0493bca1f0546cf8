"""The `bench` command line run in this process, for the tests of several files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `bench ARGS`, run in-process through cli.main."""
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


BENCH = Path(sys.executable).parent / "bench"
"""The installed console script, beside the interpreter the tests run under."""


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """`bench ARGS` through the installed console script, in a subprocess (what a user
    types), its tables 200 columns wide."""
    assert BENCH.exists(), f"no console script at {BENCH}: install the package (pip install -e .)"
    return subprocess.run(
        [str(BENCH), *args], capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )
