"""The `bench` command line run in this process, for the tests of several files."""

from __future__ import annotations

import sys

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
