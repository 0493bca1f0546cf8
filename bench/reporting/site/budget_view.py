"""The budget view of a checkpoint page: its worst case against what the cells cost.

The cells that make the worst case of the checkpoint's own threat model are taken
cheapest first and ANDed one at a time, so each point is the robust accuracy the matrix
would have reported had it stopped after that cell, at the forward passes per test image
spent to get there. Where the line goes flat, spending more stopped moving the number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from markupsafe import Markup

from bench.reporting.format import passes, pct
from bench.reporting.site.svg import svg_lines
from bench.store.evidence import Evidence
from bench.store.rows import CellRow

# Beyond two decades of cost a linear axis crowds the cheap cells into its first pixels.
LOG_SPAN = 100.0


@dataclass(frozen=True)
class BudgetPoint:
    """The worst case after one more cell, the cells taken cheapest first."""

    cell: CellRow
    """The cell added at this point."""
    cost: float
    """Its forward passes per test image: per image of its own times its images over the test size."""
    forward_passes: float
    """The forward passes per test image of the cells ANDed so far, this one included."""
    robust_acc: float
    """The AND so far, over the whole test set."""


@dataclass(frozen=True)
class Budget:
    """A checkpoint's worst case built up cell by cell in order of cost."""

    threat: str
    test_size: int
    points: tuple[BudgetPoint, ...]
    uncounted: int
    """Cells of the worst case left out: stored before passes were counted."""


def budget(ev: Evidence) -> Budget:
    """The budget of the checkpoint's own threat model: the cells `worst_case` ANDs (its own
    and the transfers onto it, those that break images), the counted ones cheapest first."""
    size = ev.test_size
    counted: list[tuple[float, CellRow]] = []
    uncounted = 0
    for cell in ev.rows(ev.threat):
        # As in the worst case: a whole-set cell of another test size does not enter the AND.
        if not size or not cell.cell_kind.breaks or (cell.indices is None and cell.n != size):
            continue
        if cell.forward_passes is None or cell.backward_passes is None:
            uncounted += 1
            continue
        counted.append((cell.forward_passes * cell.n / size, cell))
    counted.sort(key=lambda pair: (pair[0], pair[1].cell_key, pair[1].source_id or 0))

    robust = np.ones(size, dtype=bool)
    spent = 0.0
    points = []
    for cost, cell in counted:
        if cell.indices is None:
            robust &= cell.correct()
        else:
            robust[np.asarray(cell.indices, dtype=np.int64)] &= cell.correct()
        spent += cost
        points.append(BudgetPoint(cell, cost, spent, float(robust.mean())))
    return Budget(ev.threat, size, tuple(points), uncounted)


def budget_plot(ev: Evidence, source_names: Mapping[int, str]) -> dict:
    """The checkpoint page's plot entry for the budget view. `source_names` names a
    transfer's source checkpoint by id, for the hover titles."""
    b = budget(ev)
    title = "Worst case against the passes spent"
    left_out = (
        f" {b.uncounted} cell{'' if b.uncounted == 1 else 's'} of the worst case "
        f"{'was' if b.uncounted == 1 else 'were'} left out, stored before passes were counted,"
        " so the line may end above the worst case."
        if b.uncounted
        else ""
    )
    if not b.points:
        empty = (
            f"No cell of {b.threat} has its passes counted.{left_out}"
            if b.uncounted
            else f"No cell of {b.threat} that breaks images is stored."
        )
        return {"id": "budget", "svg": Markup(""), "title": title, "caption": "", "empty": empty}

    def named(cell: CellRow) -> str:
        if cell.source_id is None:
            return cell.cell_key
        return f"{cell.cell_key} crafted on {source_names.get(cell.source_id, f'checkpoint {cell.source_id}')}"

    line = [
        (
            p.forward_passes,
            p.robust_acc,
            {
                "data-cell": p.cell.cell_key,
                "data-source": "" if p.cell.source_id is None else p.cell.source_id,
                "data-cost": repr(p.cost),
                "data-passes": repr(p.forward_passes),
                "data-acc": repr(p.robust_acc),
            },
            f"+ {named(p.cell)} ({passes(p.cost)} passes/img): "
            f"{passes(p.forward_passes)} in all, worst case {pct(p.robust_acc)}%",
        )
        for p in b.points
    ]
    xs = [p.forward_passes for p in b.points]
    logx = xs[0] > 0 and xs[-1] / xs[0] > LOG_SPAN
    last = b.points[-1]
    caption = (
        f"The {len(b.points)} counted cells of {b.threat} that break images, cheapest first (a cell's cost is "
        f"its forward passes per image times its images over the {b.test_size} test images), ANDed one by one: "
        f"{pct(last.robust_acc)}% after {passes(last.forward_passes)} forward passes per test image. "
        "A flat stretch is spending that did not move the number." + left_out
    )
    svg = svg_lines(
        [("worst case", line)],
        xlabel="forward passes per test image" + (" (log)" if logx else ""),
        ylabel="robust accuracy (%)",
        logx=logx,
        legend=False,
    )
    return {"id": "budget", "svg": Markup(svg), "title": title, "caption": caption, "empty": ""}
