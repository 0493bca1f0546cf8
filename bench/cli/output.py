"""What the commands print: result tables, transfer grids, Table-1 rows, failure reports
and progress bars. Imported only once a command's arguments are checked (bench.cli.commands)."""
from __future__ import annotations

import contextlib
import csv
import json
import sys

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.cli.console import err, out
from bench.reporting.results import COLUMNS


def progress():
    """Progress bars on a terminal; nothing in logs and pipes, where bars are noise."""
    if not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True)


def summary(label: str, key: str, verb: str, ran: int, total: int) -> None:
    err.print(f"{label} [{key[:8]}]: {verb}, {ran} of {total} cells run", markup=False)


def failures(failed: dict[str, str]) -> None:
    """Each failed cell with its reason, one line each."""
    for cell, reason in failed.items():
        err.print(f"  failed {cell}: {reason}", markup=False, highlight=False, soft_wrap=True)


def failed_total(count: int) -> None:
    err.print(f"{count} cell(s) failed (reasons above); the others are stored. Fix the attack "
              "and run again to fill them in", markup=False)


def rows(result: list[dict], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(result, indent=1))
        return
    if fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS + ["flags"], extrasaction="ignore")
        w.writeheader()
        for r in result:
            w.writerow({**r, "flags": ";".join(r.get("flags", []))})
        return
    table = Table(show_lines=False)
    for col in ("defense", "checkpoint", "attack", "clean", "robust", "n", "s"):
        table.add_column(col, justify="right" if col in ("clean", "robust", "n", "s") else "left",
                         overflow="fold")
    for r in result:
        attack = r["attack"]
        if attack == "worst_case" and r.get("flags"):
            attack += f" (flags: {', '.join(r['flags'])})"
        table.add_row(r["defense"], r["checkpoint"][:8], escape(attack),
                      f"{r['clean_acc']:.3f}" if r["clean_acc"] is not None else "",
                      f"{r['robust_acc']:.3f}", str(r["n"]),
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    if not result:
        out.print("no results stored yet: run `bench run --defense NAME`")
        return
    out.print(table)


def grid(cells: list[dict]) -> None:
    """Robust accuracy of each target (rows) on each source's examples (columns)."""
    sources = list(dict.fromkeys(g["source"] for g in cells))
    table = Table(title="robust accuracy of target (rows) on examples crafted on source (columns)")
    table.add_column("target \\ source")
    for s in sources:
        table.add_column(escape(s), justify="right")  # names such as lrm[b425ac] are not markup
    for t in dict.fromkeys(g["target"] for g in cells):
        found = {g["source"]: g["robust_acc"] for g in cells if g["target"] == t}
        table.add_row(escape(t), *[f"{found[s]:.3f}" if s in found else "" for s in sources])
    out.print(table)


def diagnosis(result: list[dict], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(result, indent=1))
        return

    def num(v, spec):
        return "" if v is None else f"{v:{spec}}"

    table = Table(title="linearized robustness (Shafahi et al. Eq. 4, Table 1), medians over the test set")
    for col in ("defense", "checkpoint", "dataset", "eps", "logit gap", "gradient gap", "eps_L", "coherence",
                "predicted", "FGSM", "PGD"):
        table.add_column(col, justify="left" if col in ("defense", "checkpoint", "dataset") else "right")
    for r in result:
        table.add_row(r["defense"], r["checkpoint"][:8], r["dataset"], f"{r['eps']:g}",
                      num(r["median_logit_gap"], ".3g"), num(r["median_grad_gap"], ".3g"),
                      num(r["median_eps_l"], ".3g"), num(r["median_coherence"], ".2f"),
                      num(r["predicted_acc"], ".3f"), num(r["fgsm_acc"], ".3f"), num(r["pgd_acc"], ".3f"))
    out.print(table)


def listing(entries: list[tuple[str, ...]], widths: tuple[int, ...]) -> None:
    for entry in entries:
        out.print(" ".join(f"{v:{w}}" if w else v for v, w in zip(entry, widths)).rstrip(), markup=False,
                  highlight=False)
