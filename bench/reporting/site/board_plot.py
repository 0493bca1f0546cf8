"""The plot under each board: robust accuracy against the budget eps, one line per
checkpoint (Carlini et al.'s checklist: accuracy must fall as the budget grows, and reach
zero once the budget covers the whole input range).

A line's points are its clean accuracy at eps 0, its worst case at the board's own eps
(the per-sample AND over every cell of the threat model, as in the board's last column),
and, on an L-inf board, the lowest stored accuracy of the unbounded PGD sweep (attack
`unbounded`, one threat model `unbounded-<eps>` per budget) at each of its eps. Where two
of these share an eps, the lower one is drawn.
"""

from __future__ import annotations

from markupsafe import Markup

from bench.core.kinds import Role
from bench.reporting.format import missing
from bench.reporting.site.load import SiteData
from bench.reporting.site.names import checkpoint_name, page_path
from bench.reporting.site.svg import COLORS, svg_lines
from bench.science.white_box import role_of
from bench.store.rows import CellRow

MAX_LINES = len(COLORS)
"""Lines drawn at most, the board's highest-ranked first, so that every line has its own colour."""
NORMS = {"linf": "L-inf", "l2": "L2"}


def threat_budget(threat: str) -> tuple[str, float | None]:
    """(norm, eps) of a threat model's name: `linf-0.2` is ("linf", 0.2); eps None if unnamed."""
    norm, _, eps = threat.rpartition("-")
    try:
        return norm, float(eps)
    except ValueError:
        return threat, None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curve(
    cells: list[CellRow], clean: float | None, worst: float | None, norm: str, budget: float | None
) -> dict[float, tuple[float, str]]:
    """eps -> (accuracy, what it is: "clean", "worst case" or the sweep cell's key)."""
    points: dict[float, tuple[float, str]] = {}

    def put(eps: float, acc: float | None, what: str) -> None:
        if not missing(acc) and (eps not in points or acc < points[eps][0]):
            points[eps] = (float(acc), what)

    put(0.0, clean, "clean")
    if budget is not None:
        put(budget, worst, "worst case")
    if norm == "linf":  # the sweep is L-inf PGD; it says nothing of an L2 budget
        for e in cells:
            if role_of(e) is Role.SWEEP and e.indices is None and _number(e.params.get("eps")):
                put(float(e.params["eps"]), e.robust_acc, e.cell_key)
    return points


def eps_plot(threat: str, rows: list[dict], data: SiteData) -> dict | None:
    """The plot of a board whose rows (in rank order) carry `id` and `worst`; None when no
    checkpoint of it has a point beyond eps 0."""
    norm, budget = threat_budget(threat)
    by_id = {ck.id: ck for ck in data.checkpoints}
    lines = []
    for r in rows:
        ck = by_id[r["id"]]
        points = curve(data.cells[ck.id], (ck.meta or {}).get("clean_acc"), r["worst"], norm, budget)
        if any(eps > 0 for eps in points):
            lines.append((ck, sorted(points.items())))
    if not lines:
        return None
    drawn = lines[:MAX_LINES]
    series = [
        (
            f"{checkpoint_name(ck, data.overrides)} [{ck.key[:8]}]",
            [
                (eps, acc, {"data-key": ck.key, "data-eps": repr(eps), "data-acc": repr(acc), "data-what": what})
                for eps, (acc, what) in points
            ],
        )
        for ck, points in drawn
    ]
    name = NORMS.get(norm, norm)
    caption = (
        f"Accuracy as the {name} budget grows: clean accuracy at eps 0, the worst case over every cell "
        f"of the threat model at the board's eps = {budget:g} (dashed)"
        if budget is not None
        else "Accuracy as the budget grows: clean accuracy at eps 0"
    )
    if norm == "linf":
        caption += (
            ", and beyond it the lowest accuracy of the unbounded PGD sweep at each eps, which must "
            "reach 0% at the top; a line that levels off above zero is a sign of gradient masking"
        )
    caption += ". Checkpoints with no attack stored are left out"
    caption += f"; the {MAX_LINES} highest-ranked of {len(lines)} are drawn." if len(lines) > MAX_LINES else "."
    return {
        "svg": Markup(svg_lines(series, xlabel=f"eps ({name})", ylabel="accuracy (%)", mark=budget, legend=False)),
        "legend": [
            {
                "color": COLORS[i % len(COLORS)],
                "name": checkpoint_name(ck, data.overrides),
                "short": ck.key[:8],
                "href": page_path(ck),
            }
            for i, (ck, _) in enumerate(drawn)
        ],
        "caption": caption,
    }
