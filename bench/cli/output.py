"""What the commands print: result tables, transfer grids, Table-1 rows, failure reports
and progress bars. Imported only once a command's arguments are checked (bench.cli.commands)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import textwrap
from collections import Counter

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.cli.console import err, out, write
from bench.core.data import DATASETS
from bench.reporting.format import MISSING, fmt, pct
from bench.reporting.results import BRACKET, COLUMNS, WORST_CASE


def progress():
    """Progress bars on a terminal; nothing in logs and pipes, where bars are noise."""
    if not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def summary(label: str, key: str, verb: str, ran: int, total: int, missing_count: int | None = None) -> None:
    """One line per checkpoint; `missing_count` (missing_cells) says its worst case is incomplete."""
    tail = f"; {_incomplete(missing_count)}" if missing_count is not None else ""
    err.print(
        f"{label} [{key[:8]}]: {verb}, {ran} of {total} cells run{tail}", markup=False, highlight=False, soft_wrap=True
    )


def surrogates(names: list[str]) -> None:
    """The one line a first run on a dataset prints about the models it trains unasked."""
    if names:
        err.print(
            f"trained the transfer surrogates {', '.join(names)} (once per dataset): the matrix's "
            "black-box transfer cells attack every model with examples crafted on them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def missing_cells(result: list[dict], key: str) -> int | None:
    """How many cells the worst case of checkpoint `key` lacks, or None where it is complete."""
    for r in result:
        if r["attack"] == WORST_CASE and r["checkpoint"] == key and r.get("complete") is False:
            return len(r.get("missing") or [])
    return None


def _incomplete(count: int) -> str:
    return f"worst case ({_missing_note(count)})"


def _missing_note(count: int) -> str:
    return f"incomplete: {count} cell{'s' if count != 1 else ''} missing"


def failures(failed: dict[str, str]) -> None:
    """Each failed cell with its reason, one line each."""
    for cell, reason in failed.items():
        err.print(f"  failed {cell}: {reason}", markup=False, highlight=False, soft_wrap=True)


def failed_total(count: int) -> None:
    err.print(
        f"{count} cell(s) failed (reasons above); the others are stored. Fix the attack and run again to fill them in",
        markup=False,
    )


def rows(result: list[dict], form: str) -> None:
    """Result rows as `form`: json and csv as stored (canonical cell keys, fractions, the
    worst case last); table with short cell names and percentages, each checkpoint's worst
    case first, made to read at 100 columns; wide the same table with the canonical keys."""
    if form == "json":
        write(json.dumps(result, indent=1) + "\n")
        return
    if form == "csv":
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=[*COLUMNS, "flags", *BRACKET], extrasaction="ignore")
        w.writeheader()
        for r in result:
            w.writerow({**r, "flags": ";".join(r.get("flags", []))})
        write(text.getvalue())
        return
    if not result:
        out.print("no results stored yet: run `bench run --defense NAME`", markup=False)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    # Top-5 beside top-1 where some dataset shown has more than ten classes (Kannan et al.'s tables).
    top5 = any(getattr(DATASETS.get(r["dataset"]), "num_classes", 0) > 10 for r in result)
    columns = (
        "defense",
        "checkpoint",
        "cell key" if form == "wide" else "cell",
        "clean %",
        "robust %",
        *(("top-5 %",) if top5 else ()),
        "n",
        "s",
        "fwd/img",
    )
    for col in columns:
        numeric = col in ("clean %", "robust %", "top-5 %", "n", "s", "fwd/img")
        table.add_column(
            col, justify="right" if numeric else "left", no_wrap=numeric or col == "checkpoint", overflow="fold"
        )
    groups = list(_by_checkpoint(result).values())
    for i, group in enumerate(groups):
        # The checkpoint's own worst case (the last row of its group) on top, then any other
        # threat model's (another radius a run chose, the L2 one).
        worst = [r for r in group if r["attack"] == WORST_CASE][::-1]
        cells = [r for r in group if r["attack"] != WORST_CASE]
        names = [escape(r["attack"]) for r in cells] if form == "wide" else _cell_names(cells, worst)
        shown = [*((w, _worst_name(w)) for w in worst), *zip(cells, names, strict=True)]
        for j, (r, name) in enumerate(shown):
            # A rule under the worst case, and between checkpoints.
            rule = (j == len(worst) - 1 and bool(cells)) or (j == len(shown) - 1 and i < len(groups) - 1)
            table.add_row(
                escape(r["defense"]),
                r["checkpoint"][:8],
                name,
                pct(r["clean_acc"], 1),
                pct(r["robust_acc"], 1),
                *((pct(r.get("robust_top5"), 1),) if top5 else ()),
                str(r["n"]),
                fmt(r["seconds"], ".1f"),
                passes(r.get("forward_passes")),
                style="bold" if j < len(worst) else None,
                end_section=rule,
            )
    out.print(table)


def passes(value: float | None) -> str:
    """Passes per image, short (`21`, `1.2k`, `56k`); a dash where they were not counted."""
    if value is None:
        return MISSING
    if value < 1000:
        return f"{value:.3g}"
    return f"{value / 1000:.2g}k" if value < 10000 else f"{value / 1000:.0f}k"


def _by_checkpoint(result: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in result:
        groups.setdefault(r["checkpoint"], []).append(r)
    return groups


def _worst_name(row: dict) -> str:
    """`worst case THREAT`, then a line for what it lacks and one for its flags, so that
    these widen the cell column no more than they must."""
    notes = [_missing_note(len(row.get("missing") or []))] if row.get("complete") is False else []
    bracket = bracket_note(row)
    if bracket:
        notes.append(bracket)
    if row.get("flags"):
        notes.append(f"flags: {', '.join(row['flags'])}")
    return escape("\n".join([f"worst case {row['threat']}", *(f"({n})" for n in notes)]))


def bracket_note(row: dict) -> str:
    """What the verifier cells say beside the worst case: the certified floor, the exact
    figure or the images still unknown, the gap in points and the images attacks missed;
    or that they are withheld, and why."""
    if row.get("withheld"):
        return f"certified and exact withheld: {row['withheld']}"
    if row.get("certified") is None:
        return f"not verifiable: {row['not_verifiable']}" if row.get("not_verifiable") else ""
    parts = [f"certified {pct(row['certified'], 1)}%"]
    if row.get("exact") is not None:
        parts.append(f"exact {pct(row['exact'], 1)}%")
    elif row.get("unknown") is not None:
        parts.append(f"{row['unknown']} unknown")
    parts.append(f"gap {row['gap']:.1f} pts")
    if row.get("attacks_missed"):
        parts.append(f"attacks missed {row['attacks_missed']}")
    return ", ".join(parts)


def _cell_names(cells: list[dict], worst: list[dict]) -> list[str]:
    """Short names of one checkpoint's cells: the site's cell_label (pgd20, cw20, pgd20_r5,
    fgsm) with its threat model (`pgd20 (l2-1)`, `unbounded-0.4`, `verify (linf-0.05)`),
    `transfer SOURCE → ` before a transfer's, the settings that differ between cells that
    would otherwise share a name (`fgsm loss=cw`), and under a complete verifier's its
    verdict counts. Only where every L-inf cell is at the one radius the worst case above
    them names do its cells go without it (the table stays within 100 columns); cells at
    two radii always name theirs, so two verify rows are never confused."""
    radii = {r["threat"] for r in cells if r["threat"].startswith("linf-")}
    heads = {w["threat"] for w in worst if w["threat"].startswith("linf-")}
    home = next(iter(heads)) if len(heads) == 1 and radii <= heads else None
    names, params = [], []
    for r in cells:
        name, p = r["label"], r["params"]
        if r["threat"] != home:
            name = r["threat"] if r["threat"].startswith(f"{name}-") else f"{name} ({r['threat']})"
        if r.get("source_id") is not None:
            name = f"transfer {r.get('source') or '#' + str(r['source_id'])} → {name}"
        names.append(name)
        params.append(p)
    for name, count in Counter(names).items():
        if count > 1:
            same = [i for i, n in enumerate(names) if n == name]
            keys = sorted({k for i in same for k in params[i]})
            differ = [k for k in keys if len({str(params[i].get(k)) for i in same}) > 1]
            # A setting keyed only where set (`first_target`) is absent from the others: not `k=`.
            for i in same:
                names[i] = " ".join([name, *(f"{k}={params[i][k]}" for k in differ if k in params[i])])
    for i, r in enumerate(cells):
        if r.get("verdicts"):
            v = r["verdicts"]
            names[i] += f"\n({v['robust']} robust, {v['not_robust']} not robust, {v['unknown']} unknown)"
    return [escape(n) for n in names]


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
    for col in (
        "defense",
        "checkpoint",
        "dataset",
        "eps",
        "logit gap",
        "gradient gap",
        "eps_L",
        "coherence",
        "predicted",
        "FGSM",
        "PGD",
    ):
        table.add_column(col, justify="left" if col in ("defense", "checkpoint", "dataset") else "right")
    for r in result:
        table.add_row(
            r["defense"],
            r["checkpoint"][:8],
            r["dataset"],
            f"{r['eps']:g}",
            num(r["median_logit_gap"], ".3g"),
            num(r["median_grad_gap"], ".3g"),
            num(r["median_eps_l"], ".3g"),
            num(r["median_coherence"], ".2f"),
            num(r["predicted_acc"], ".3f"),
            num(r["fgsm_acc"], ".3f"),
            num(r["pgd_acc"], ".3f"),
        )
    out.print(table)


def listing(entries: list[tuple[str, ...]], widths: tuple[int, ...]) -> None:
    """One line an entry, columns padded to `widths`; a long last column wraps under itself."""
    for entry in entries:
        # Not strict: a kind without widths passes none, and its entries show their last column alone.
        head = " ".join(f"{v:{w}}" if w else v for v, w in zip(entry[:-1], widths, strict=False))
        indent = " " * (len(head) + 1 if head else 0)
        text = textwrap.fill(
            entry[-1],
            width=max(out.width, len(indent) + 20),
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        out.print((head + text[len(head) :]).rstrip(), markup=False, highlight=False, soft_wrap=True)
