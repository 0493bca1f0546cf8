"""Property-based: random matrix files and random --set values thrown at the command line.

Every run ends in status 0 or 2 (never a traceback: any other exception fails the
test), and a run that ends in 2 leaves the store byte for byte as it was. Runs go
in-process through `bench.cli.main` to stay fast; the tiny checkpoint they attack is
trained once. Valid draws are kept cheap on purpose (FGSM and PGD of at most 3 steps
and 3 restarts on digits, one epoch of training), and the examples are derandomized so
the suite is the same on every run.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import cli

FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _state(results: Path) -> tuple[bytes, list[str]]:
    ckpts = results / "checkpoints"
    return (results / "bench.db").read_bytes(), sorted(str(p.relative_to(results)) for p in ckpts.rglob("*"))


def _main(*argv: str) -> tuple[int, str]:
    """(exit status, stderr) of one in-process `bench` command."""
    err = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["bench", *argv]),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("fuzz") / "res"
    code, err = _main("train", "--defense", "natural", "--set", "epochs=1", "--results", str(results))
    assert code == 0, err
    return results


def _checked_run(results: Path, *argv: str) -> None:
    before = _state(results)
    code, err = _main(*argv, "--results", str(results))
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert _state(results) == before, err
    else:
        # Close the connections the finished run left behind, so that SQLite's WAL is in
        # bench.db before the next snapshot (collecting after every run costs too much).
        gc.collect()


# --- TOML values: valid ones small, invalid ones of every kind -----------------------
def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string (JSON escapes are TOML escapes)


SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-0.5, max_value=1.5),
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=-(2**63), max_value=-4),
    st.booleans(),
    st.sampled_from(["xent", "cw", "linf", "l2", "l3", "hinge", ""]),
    st.text(max_size=8),
)
# Fields of the two cheap attacks, plus fields neither has. Counts are drawn from the
# small scalars only, so a valid draw never runs long.
FIELDS = [
    "eps",
    "steps",
    "restarts",
    "step_size",
    "loss",
    "norm",
    "random_start",
    "early_stop",
    "subset",
    "iterations",
    "bogus",
]
SMALL = st.one_of(st.integers(min_value=-2, max_value=3), st.sampled_from([0.5, "3", None]))


CELL_VALUES = st.sampled_from([0.05, 0.2, 1.0, "xent", "cw", "linf", "l2", True, False])
"""Values that are valid for some field, so that many draws pass the checks and run."""


@st.composite
def cell_tables(draw):
    attack = draw(st.sampled_from(["fgsm", "fgsm", "pgd", "pgd", "pgd", "pgdd", "", "autoattack_"]))
    fields = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=3))
    lines = [f"attack = {json.dumps(attack)}"]
    lists = 0
    for field in fields:
        values = (
            SMALL.filter(lambda v: v is not None)
            if field in ("steps", "restarts", "subset", "iterations")
            else st.one_of(CELL_VALUES, SCALARS)
        )
        if lists < 2 and draw(st.booleans()):
            lists += 1
            lines.append(f"{field} = {_toml(draw(st.lists(values, max_size=2)))}")
        else:
            lines.append(f"{field} = {_toml(draw(values))}")
    return "[[cell]]\n" + "\n".join(lines) + "\n"


MATRICES = st.one_of(
    st.lists(cell_tables(), min_size=1, max_size=2).map("\n".join),
    st.text(max_size=40),  # anything at all: mostly not TOML
    st.just("[cell]\nattack = 'fgsm'\n"),  # a table, not an array of tables
)


@FUZZ
@given(text=MATRICES)
def test_random_matrix_files_end_in_0_or_2_and_a_refusal_changes_nothing(store, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("matrix") / "m.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _checked_run(store, "run", "--defense", "natural", "--set", "epochs=1", "--matrix", str(path))


# --- --set values ------------------------------------------------------------------
# Keys of training and of logit_squeeze, and keys of neither; epochs and batch_size are
# pinned afterwards (the last --set wins) so a valid draw trains one quick epoch.
SET_KEYS = [
    "lr",
    "momentum",
    "weight_decay",
    "optimizer",
    "schedule",
    "milestones",
    "warmup_epochs",
    "augment",
    "beta",
    "sigma",
    "form",
    "train.lr",
    "bogus",
    "",
]
RAW_VALUES = st.one_of(
    SCALARS.map(_toml),
    st.lists(SCALARS, max_size=3).map(_toml),
    st.sampled_from(["sgd", "adam", "step", "batch", "example", "[1, 2", "{}", "1e999", "0x10", "=", "nan"]),
    st.text(max_size=10),
)


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(SET_KEYS), RAW_VALUES), min_size=1, max_size=3))
def test_random_set_values_end_in_0_or_2_and_a_refusal_changes_nothing(store, sets):
    argv = ["train", "--defense", "logit_squeeze"]
    for key, value in sets:
        argv += ["--set", f"{key}={value}"]
    argv += ["--set", "epochs=1", "--set", "batch_size=128"]
    _checked_run(store, *argv)


# --- preset files ------------------------------------------------------------------
# Mostly well-formed, so that draws reach the value checks and some train; the rest
# break one thing at a time (a missing or mistyped key, an unknown one, a bad value).
PRESET_VALUES = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3, "batch", "sgd", [2, 3]]), SCALARS)


@st.composite
def preset_files(draw):
    lines = []
    for key, values in (
        ("defense", st.sampled_from(["logit_squeeze"] * 4 + ["natural", 3])),
        ("dataset", st.sampled_from(["digits"] * 4 + ["mnist", "", 1.5])),
        ("arch", st.sampled_from(["digits_cnn"] * 3 + ["madry_mnist", "nope", True])),
    ):
        if draw(st.integers(0, 9)):
            lines.append(f"{key} = {_toml(draw(values))}")
    if not draw(st.integers(0, 5)):
        lines.append(f"bogus = {_toml(draw(SCALARS))}")
    for table, keys in (
        ("config", ["beta", "sigma", "form", "bogus"]),
        ("train", ["lr", "momentum", "optimizer", "milestones", "epochs"]),
        ("paper", ["clean", "pgd20"]),
    ):
        if draw(st.booleans()):
            lines.append(f"[{table}]")
            for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=2)):
                lines.append(f"{key} = {_toml(draw(PRESET_VALUES))}")
    return "\n".join(lines) + "\n"


@settings(FUZZ, max_examples=30)
@given(text=preset_files())
def test_random_preset_files_end_in_0_or_2_and_a_refusal_changes_nothing(store, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("preset") / "mine.toml"
    path.write_text(text)
    _checked_run(
        store,
        "train",
        "--defense",
        "logit_squeeze",
        "--preset",
        str(path),
        "--set",
        "epochs=1",
        "--set",
        "batch_size=128",
    )
