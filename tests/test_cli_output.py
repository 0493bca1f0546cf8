"""What the command line prints, and how soon: the results table at 100 columns (short
cell names, percentages, the worst case first), the formats that keep the canonical
keys, help texts, messages that are true, `--model NAME:FN` from the current folder, a
closed pipe, and --help answering before anything heavy is imported.

The console script runs in a subprocess where what a user types matters (the script's
own sys.path, a real pipe, the start-up time); the rest runs in this process.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from cli_run import run_cli
from rich.console import Console

from bench.cli import output
from bench.cli.app import app
from bench.cli.options import DATASET_NAMES
from bench.core.cells import parse_cell_key
from bench.core.data import DATASETS, get_spec
from bench.core.matrix import load_matrix, matrix_cells, matrix_transfer
from bench.reporting.results import BRACKET, COLUMNS
from bench.reporting.site.names import cell_label

BENCH = Path(sys.executable).parent / "bench"
KEY = "3626cbc619ecb8d2"


def full_rows(complete: bool = True, sources: bool = True) -> list[dict]:
    """Result rows shaped as bench.reporting.results.result_rows gives them for the digits
    full matrix: every cell, the transfers, and the worst case last."""
    threat = get_spec("digits").threat
    base = {"defense": "logit_similarity", "preset": "logit_similarity_digits", "dataset": "digits", "checkpoint": KEY}
    rows = [
        {
            **base,
            "attack": c.key,
            "threat": c.threat,
            "clean_acc": 0.96666,
            "robust_acc": 0.11666,
            "n": c.subset or 360,
            "seconds": 12.345,
            "forward_passes": 21.0,
            "kind": "attack",
            "label": cell_label(c.attack, vars(c.config)),
            "params": dict(vars(c.config)),
        }
        for c in matrix_cells("full", threat)
    ]
    surrogates, keys = matrix_transfer("full")
    for i, source in enumerate(surrogates):
        for k in keys:
            cell = parse_cell_key(k, threat)
            rows.append(
                {
                    **base,
                    "attack": f"transfer[{i + 2}]:{cell.key}",
                    "threat": cell.threat,
                    "clean_acc": 0.96666,
                    "robust_acc": 0.83611,
                    "n": 360,
                    "seconds": 0.0,
                    "kind": "transfer",
                    "label": cell_label(cell.attack, vars(cell.config)),
                    "params": dict(vars(cell.config)),
                    "cell": cell.key,
                    "source_id": i + 2,
                    **({"source": source} if sources else {}),
                }
            )
    missing = [] if complete else [rows[0]["attack"], rows[1]["attack"]]
    rows.append(
        {
            **base,
            "attack": "worst_case",
            "threat": threat.name,
            "clean_acc": 0.96666,
            "robust_acc": 0.04166,
            "n": 360,
            "seconds": None,
            "cells": len(rows),
            "flags": ["pgd_still_falling", "restarts_matter"],
            "complete": complete,
            "missing": missing,
        }
    )
    return rows


def render(monkeypatch, rows: list[dict], form: str = "table", width: int = 100) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    monkeypatch.setattr(output, "out", console)
    output.rows(rows, form)
    return console.export_text()


def cells_of(text: str) -> dict[str, list[str]]:
    """The table's rows of checkpoint KEY by cell name: the numbers after its name (clean,
    robust, n, seconds, forward passes per image)."""
    found = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) > 2 and words[1] == KEY[:8]:
            found[" ".join(words[2:-5])] = words[-5:]
    return found


# --- the results table ---------------------------------------------------------------------
def test_the_table_fits_100_columns_with_a_pgd_row_on_one_line(monkeypatch):
    text = render(monkeypatch, full_rows())
    assert max(len(line) for line in text.splitlines()) <= 100, text
    cells = cells_of(text)
    assert cells["cw20"] == ["96.7", "11.7", "360", "12.3", "21"]  # one line: label, clean, robust, n, s, passes
    assert cells["pgd20_r10"] == ["96.7", "11.7", "360", "12.3", "21"]
    assert cells["pgd20 (l2-1)"] and cells["unbounded-0.4"] and cells["spsa"][2] == "100"
    assert cells["transfer natural → pgd20"] == ["96.7", "83.6", "360", "0.0", "–"]  # not counted: a dash
    assert cells["transfer pgd_at → cw20"]
    assert "transfer[" not in text and "eps=" not in text and "0.967" not in text


def first_cell(text: str) -> str:
    """The cell column of the table's first row, its wrapped lines joined."""
    lines = text.splitlines()
    start, end = lines[0].index("cell"), lines[0].index("clean %")
    first = []
    for line in lines[2:]:
        if first and line[:start].strip():
            break
        first.append(line[start:end].strip())
    return " ".join(filter(None, first))


def test_the_worst_case_and_its_flags_come_first(monkeypatch):
    text = render(monkeypatch, full_rows())
    assert text.splitlines()[2].split()[:2] == ["logit_similarity", "3626cbc6"]
    assert first_cell(text) == "worst case linf-0.2 (flags: pgd_still_falling, restarts_matter)"
    assert cells_of(text)["worst case linf-0.2"] == ["96.7", "4.2", "360", "–", "–"]
    assert list(cells_of(text))[1] == "fgsm"  # then the cells, in stored order


def test_an_incomplete_worst_case_says_so_in_the_table_and_the_summary(monkeypatch, capsys):
    rows = full_rows(complete=False)
    assert first_cell(render(monkeypatch, rows)) == (
        "worst case linf-0.2 (incomplete: 2 cells missing) (flags: pgd_still_falling, restarts_matter)"
    )
    assert output.missing_cells(rows, KEY) == 2 and output.missing_cells(full_rows(), KEY) is None
    output.summary("logit_similarity", KEY, "trained", 26, 28, output.missing_cells(rows, KEY))
    assert capsys.readouterr().err == (
        "logit_similarity [3626cbc6]: trained, 26 of 28 cells run; worst case (incomplete: 2 cells missing)\n"
    )
    output.summary("logit_similarity", KEY, "trained", 28, 28, None)
    assert capsys.readouterr().err == "logit_similarity [3626cbc6]: trained, 28 of 28 cells run\n"


def test_a_transfer_without_its_source_name_shows_the_id(monkeypatch):
    assert "transfer #2 → pgd20" in cells_of(render(monkeypatch, full_rows(sources=False)))


BARE_CELL = {
    "defense": "natural",
    "preset": None,
    "dataset": "digits",
    "checkpoint": KEY,
    "threat": "linf-0.2",
    "clean_acc": 0.9,
    "robust_acc": 0.5,
    "n": 360,
    "seconds": 0.1,
}
"""A cell row of checkpoint KEY at L-inf 0.2 without its attack, label or params, and with
no worst case above it."""


def test_cells_that_would_share_a_name_show_the_settings_that_differ(monkeypatch):
    rows = [
        {**BARE_CELL, "attack": f"fgsm:eps=0.2,loss={loss}", "label": "fgsm", "params": {"eps": 0.2, "loss": loss}}
        for loss in ("xent", "cw")
    ]
    # No worst case above them names their radius: each name carries it.
    assert set(cells_of(render(monkeypatch, rows))) == {"fgsm (linf-0.2) loss=xent", "fgsm (linf-0.2) loss=cw"}


def test_a_setting_keyed_only_where_set_is_not_named_where_absent(monkeypatch):
    """`fast`'s two APGD-T cells: one sets first_target, the other keeps the default and
    its key (and params) lack it. The default is not shown as an empty `first_target=`."""
    one = {"eps": 0.2, "n_target_classes": 1, "steps": 100}
    rest = {"eps": 0.2, "first_target": 2, "n_target_classes": 9, "steps": 40}
    rows = [{**BARE_CELL, "attack": "apgd_t", "label": "apgd_t", "params": p} for p in (one, rest)]
    assert set(cells_of(render(monkeypatch, rows, width=140))) == {  # wide enough not to wrap
        "apgd_t (linf-0.2) n_target_classes=1 steps=100",
        "apgd_t (linf-0.2) first_target=2 n_target_classes=9 steps=40",
    }


def test_wide_shows_the_canonical_keys(monkeypatch):
    text = render(monkeypatch, full_rows(), "wide", width=200)
    assert "pgd:eps=0.2,loss=cw,norm=linf,random_start=true,restarts=1,step_size=0.05,steps=20" in text
    assert "transfer[2]:pgd:" in text and "worst case linf-0.2" in text


def test_csv_and_json_keep_the_canonical_keys_and_fields(capsys):
    rows = full_rows()
    output.rows(rows, "json")
    assert json.loads(capsys.readouterr().out) == rows
    output.rows(rows, "csv")
    read = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(read[0]) == [*COLUMNS, "flags", *BRACKET]
    assert [r["attack"] for r in read] == [r["attack"] for r in rows]  # worst case last, as stored
    assert read[-1]["flags"] == "pgd_still_falling;restarts_matter" and read[0]["robust_acc"] == "0.11666"


# --- help ------------------------------------------------------------------------------------
def _commands():
    return typer.main.get_command(app).commands


def test_every_dataset_is_in_every_dataset_help():
    assert DATASET_NAMES.split(", ") == list(DATASETS)
    helps = {name: p.help for name, cmd in _commands().items() for p in cmd.params if p.name == "dataset"}
    assert set(helps) == {"train", "run", "eval", "results", "diagnose", "transfer"}
    for name, text in helps.items():
        assert all(d in text for d in DATASETS), (name, text)


def test_run_and_eval_default_to_one_matrix():
    defaults = {
        name: next(p.default for p in cmd.params if p.name == "matrix")
        for name, cmd in _commands().items()
        if name in ("run", "eval")
    }
    assert defaults == {"run": "full", "eval": "full"}


def test_every_option_names_its_value():
    group = typer.main.get_command(app)
    for cmd in [group, *_commands().values()]:
        for p in cmd.params:
            assert getattr(p, "is_flag", False) or p.metavar, f"{cmd.name} {p.opts}: no metavar"


@pytest.mark.parametrize(
    "command", ["", "ls", "train", "run", "eval", "results", "diagnose", "transfer", "perf", "site"]
)
def test_help_names_values_in_words(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, *command.split(), "--help")
    assert code == 0 and "Usage: bench" in out
    # Every option of ours reads like a word. typer 0.29 shows the type of its own --help flag
    # and of an argument (ls WHAT) whatever their metavar; older typer shows neither.
    ours = re.sub(r"(--help|WHAT)\s+<(bool|str)>", "", out)
    assert not re.search(r"<(str|int|float|list[^>]*|bool)>", ours), out
    if not command:
        assert "--debug" in out


def test_ls_matrices_shows_each_matrix_s_cells(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "ls", "matrices")
    surrogates, keys = matrix_transfer("full")
    total = len(matrix_cells("full", get_spec("digits").threat)) + len(surrogates) * len(keys)
    text = " ".join(out.split())
    assert code == 0 and f"full {total} cells on digits; linf-0.2: fgsm, pgd5, cw5," in text
    assert (
        "pgd20_r10" in text and "l2-1: pgd20" in text and "transfer from natural, pgd_at: pgd20_last, cw20_last" in text
    )
    assert "quick 3 cells on digits; linf-0.2: fgsm, pgd10, pgd20" in text
    assert max(len(line) for line in out.splitlines()) <= 160  # the width of a piped console


# --- messages that are true ----------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from bench.run.driver import run_defense
    from bench.run.recipe import TrainRequest
    from bench.run.workspace import Workspace

    results = tmp_path_factory.mktemp("cli-output") / "res"
    run_defense(Workspace.open(results), TrainRequest("natural", overrides=("epochs=1",)), load_matrix("quick"))
    return results


@pytest.mark.parametrize(
    "args",
    [
        ["--defense", "nonexistent"],
        ["--dataset", "mnist"],
        ["--defense", "natural", "--dataset", "svhn", "--format", "json"],
    ],
)
def test_a_filter_that_matches_nothing_says_so_and_names_what_is_stored(store, monkeypatch, capsys, args):
    code, out, err = run_cli(monkeypatch, capsys, "results", *args, "--results", str(store))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: no stored checkpoint matches --")
    assert "stored defenses: natural; stored datasets: digits" in err


def test_results_of_an_empty_store_and_in_each_format(store, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--defense", "natural", "--results", str(tmp_path))
    assert code == 0 and "no results stored yet" in out
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--results", str(store))
    assert code == 0 and "worst case linf-0.2" in out and "pgd20" in out and "pgd:eps" not in out
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--format", "wide", "--results", str(store))
    assert code == 0 and "pgd:eps=0.2" in out
    code, _, err = run_cli(monkeypatch, capsys, "results", "--format", "xml", "--results", str(store))
    assert code == 2 and "--format must be table, wide, csv or json" in err


# --- the installed script ------------------------------------------------------------------
FACTORY = """
from bench.core.data import get_spec
from bench.core.models import build_model


def build():
    return build_model("digits_cnn", get_spec("digits"))
"""


def test_model_module_is_found_in_the_current_folder(tmp_path):
    (tmp_path / "my_models.py").write_text(FACTORY)
    (tmp_path / "tiny.toml").write_text('[[cell]]\nattack = "fgsm"\n')
    proc = subprocess.run(
        [
            str(BENCH),
            "eval",
            "--model",
            "my_models:build",
            "--name",
            "mine",
            "--matrix",
            "tiny.toml",
            "--results",
            "res",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mine [" in proc.stderr and "added, 1 of 1 cells run" in proc.stderr


def test_importing_the_cli_imports_nothing_heavy():
    code = "import sys, bench.cli; print(sorted(m for m in ('torch', 'numpy', 'sqlalchemy', 'bench.api') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "[]"
    )


def test_what_a_run_loads_leaves_the_heavy_extras_alone():
    """bench.api is what `bench run` and `bench eval` import before they know there is
    nothing to compute: no attack library, table library, dataset reader or solver."""
    heavy = ("scipy.optimize", "scipy.sparse", "scipy.stats", "torchattacks", "pandas", "sklearn", "mlxtend")
    code = f"import sys, bench.api; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("args, status", [(["--help"], 0), (["run", "--help"], 0), (["run", "--defens", "x"], 2)])
def test_help_and_usage_errors_answer_at_once(args, status):
    start = time.perf_counter()
    proc = subprocess.run([str(BENCH), *args], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    assert proc.returncode == status, proc.stderr
    assert took < 3.0, f"`bench {' '.join(args)}` took {took:.2f} s"  # about 0.5 s on 2 shared cores


@pytest.mark.parametrize("args", [["ls", "presets"], ["--help"], ["results", "--format", "csv", "--results", "{tmp}"]])
def test_a_closed_pipe_ends_quietly_with_status_0(tmp_path, args):
    # The reader goes before the first line is written, so every write meets the closed pipe.
    proc = subprocess.Popen(
        [str(BENCH), *[str(tmp_path) if a == "{tmp}" else a for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == b"", err.decode()
