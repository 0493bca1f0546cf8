"""A matrix cell's list values into the parameter sets of its concrete cells: a product
over its lists, except the lists `paired` names, which go together element by element."""

from __future__ import annotations

import itertools
from typing import Any

from bench.errors import BenchError


def combinations(table: dict, lists: dict[str, list], paired: Any, where: str) -> list[dict]:
    """The parameters of each cell a table expands into: a product over its lists, except
    that the lists `paired` names go together, element by element (`eps = [0.1, 0.2]`,
    `step_size = [0.01, 0.02]`, `paired = ["eps", "step_size"]`: two cells, not four)."""
    if not (isinstance(paired, list) and all(isinstance(k, str) for k in paired)):
        raise BenchError(f'{where}: paired takes the names of list values, e.g. paired = ["eps", "step_size"]')
    unlisted = [k for k in paired if k not in lists]
    if unlisted:
        raise BenchError(f"{where}: paired names {unlisted[0]!r}, which is not a list in the cell; give it a list")
    lengths = {len(lists[k]) for k in paired}
    if len(lengths) > 1:
        sizes = ", ".join(f"{k} has {len(lists[k])}" for k in paired)
        raise BenchError(f"{where}: paired lists must be as long as each other ({sizes}); give each the same count")
    groups: list[list[dict]] = []
    if paired:
        rows = zip(*(lists[k] for k in paired), strict=True)  # as long as each other: checked above
        groups.append([dict(zip(paired, values, strict=True)) for values in rows])
    groups += [[{k: v} for v in values] for k, values in lists.items() if k not in paired]
    out = []
    for combo in itertools.product(*groups):
        params = dict(table)
        for part in combo:
            params.update(part)
        out.append(params)
    return out
