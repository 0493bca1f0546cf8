"""Attack matrices: TOML files expanded into cells with canonical keys (bench.core.cells).

A matrix is a list of `[[cell]]` tables, each naming an attack and its parameters; a list value
expands into one cell per element (a product across lists, except the lists a table's `paired`
names, which go together element by element). Unset budgets are filled from the dataset's threat
model, so every cell is concrete. A cascade runs its cells in order, each on what the earlier
ones left standing, and keys each after the cells before it (`cascade_keyed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bench.core import contract
from bench.core.cells import Cell, make_cell, transfer_cell
from bench.core.expansion import combinations
from bench.core.gate import Gate
from bench.core.kinds import Role
from bench.errors import BenchError

BUILTIN = ("quick", "fast", "full", "paper", "truth", "kannan_imagenet", "robustbench")
SCHEDULES = ("all", "cascade")
"""How a matrix runs its cells: `all` on the whole test set each (or its subset), or
`cascade`, in the matrix's order, each on what the earlier ones left standing."""


@dataclass(frozen=True)
class TransferTable:
    """A matrix's `[transfer]` table: the surrogate defenses examples are crafted on, and
    the keys of the cells that craft them (bench.run.surrogates)."""

    surrogates: tuple[str, ...] = ()
    cells: tuple[str, ...] = ()


@dataclass(frozen=True)
class Matrix:
    """A matrix read and checked once per command, then handed to every stage that runs it.

    Its cells are expanded per dataset (`cells`), since the threat model fills their
    budgets; the TOML is never read again."""

    name: str
    """The file's stem, or the built-in matrix's name."""
    source: str
    """What the user gave (a built-in name or a path): errors name it."""
    description: str
    tables: tuple[dict, ...]
    """The `[[cell]]` tables, those of the included matrices first, as parsed."""
    transfer: TransferTable
    schedule: str = "all"
    """One of SCHEDULES."""
    escalate: str | None = None
    """The matrix (a built-in name or a path) a checkpoint faces in full when this one's
    cells or admission checks signal masking (`fast` escalates to `full`); None: never."""
    eps: float | None = None
    """The run's own L-inf radius (`eps = 0.1` in the TOML, or `--eps`): the budget of every
    cell that sets none, its default step scaled with it; None: the dataset's threat model."""

    @property
    def cascade(self) -> bool:
        return self.schedule == "cascade"

    def threat(self, threat):
        """The threat model the cells are filled from: the dataset's, at the run's radius."""
        return threat if self.eps is None else threat.at(self.eps)

    def escalation(self) -> Matrix | None:
        """The matrix it escalates to, at the same radius."""
        if self.escalate is None:
            return None
        target = load_matrix(self.escalate)
        return target if self.eps is None else dataclasses.replace(target, eps=self.eps)

    def cells(self, threat, test_size: int | None = None) -> list[Cell]:
        """Every cell under `threat` (a cascade's in its order); `test_size` bounds subsets."""
        cells = expand(list(self.tables), self.threat(threat), where=f"matrix {self.source!r}", test_size=test_size)
        if not self.cascade:
            if any(c.nearest for c in cells):
                raise BenchError(
                    f"matrix {self.source!r}: nearest= picks among the images a cascade left standing; "
                    'set schedule = "cascade" or drop nearest= from its cells'
                )
            if any(c.when for c in cells):
                raise BenchError(
                    f"matrix {self.source!r}: when= reads what a cascade's earlier cells broke; "
                    'set schedule = "cascade" or drop when= from its cells'
                )
            return cells
        for i, c in enumerate(cells):
            if c.when is Gate.BLACK_BOX_WON and not any(contract.hooks(o.config).role is Role.QUERY for o in cells[:i]):
                raise BenchError(
                    f"matrix {self.source!r}: {c.attack} runs when a black-box cell before it broke an image, "
                    "and none comes before it; put a square cell earlier or drop when="
                )
        if any(c.subset for c in cells):
            raise BenchError(
                f"matrix {self.source!r}: a cascade runs each cell on what the earlier ones left "
                "standing; drop subset= from its cells"
            )
        return cascade_keyed(cells, self.name)

    def transfer_cells(self, threat) -> list[Cell]:
        """The cells that craft the transfer examples, as `transfer_cell` makes them."""
        return [transfer_cell(k, self.threat(threat)) for k in self.transfer.cells]


def cascade_keyed(cells: list[Cell], name: str) -> list[Cell]:
    """The cells as the cascade `name` runs them. A cell's images are those the cells before
    it left standing, so every cell after the first names them in its key (`after=`, a
    digest of their keys): a changed cell, order or same-named file re-keys every later one,
    whose old rows ran on other images and are never read as the new cascade's."""
    out: list[Cell] = []
    for c in cells:
        before = "\n".join(o.key for o in out)
        after = f",after={hashlib.sha256(before.encode()).hexdigest()[:12]}" if out else ""
        out.append(dataclasses.replace(c, key=f"{c.key}{after},cascade={name}", cascade=name))
    return out


def load_matrix(name_or_path: str, eps: float | None = None) -> Matrix:
    """A built-in matrix or a TOML file; a matrix that says `include = ["full"]` has the
    included built-in matrices' cells first, then its own, and their [transfer] table
    unless it has its own. `eps`, where given, is the run's radius (`--eps`), over the
    file's own `eps`."""
    name, raw = _load_toml(name_or_path)
    radius = _radius(raw["eps"], f"matrix {name_or_path!r}: eps") if eps is None and "eps" in raw else None
    if eps is not None:
        radius = _radius(eps, "--eps")
    included, included_transfer = _included(raw, name)
    schedule = raw.get("schedule", "all")
    if schedule not in SCHEDULES:
        raise BenchError(f"matrix {name_or_path!r}: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return Matrix(
        name=name,
        source=name_or_path,
        description=str(raw.get("description", "")),
        tables=(*included, *raw.get("cell", [])),
        transfer=_transfer_table(name, raw.get("transfer") or included_transfer),
        schedule=schedule,
        escalate=_escalation(raw.get("escalate"), name_or_path),
        eps=radius,
    )


def _radius(eps: Any, what: str) -> float:
    """The run's L-inf radius, checked: a number in (0, 1] pixel units."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps <= 1:
        raise BenchError(
            f"{what} must be an L-inf radius in (0, 1] pixel units, e.g. 0.1 (or 0.0314 for 8/255); got {eps!r}"
        )
    return float(eps)


def _escalation(target: Any, source: str) -> str | None:
    """The matrix to escalate to, checked now (it is read only if a model calls for it)."""
    if target is None:
        return None
    if not isinstance(target, str) or target == source:
        raise BenchError(f"matrix {source!r}: escalate must name another matrix (a built-in name or a path)")
    if load_matrix(target).escalate is not None:
        raise BenchError(
            f"matrix {source!r}: it escalates to {target!r}, which escalates again; name a matrix that does not"
        )
    return target


def _transfer_table(name: str, table: dict) -> TransferTable:
    surrogates, cells = table.get("surrogates", []), table.get("cells", [])
    if not (
        isinstance(surrogates, list)
        and all(isinstance(s, str) for s in surrogates)
        and isinstance(cells, list)
        and all(isinstance(c, str) for c in cells)
    ):
        raise BenchError(
            f'matrix {name!r}: [transfer] takes surrogates = ["natural", ...] and cells = ["pgd:steps=20", ...]'
        )
    if surrogates and not cells:
        raise BenchError(f"matrix {name!r}: [transfer] names surrogates but no cells to craft with")
    return TransferTable(tuple(surrogates), tuple(cells))


def _included(raw: dict, where: str) -> tuple[list[dict], dict]:
    """(cell tables, [transfer] table) of the built-in matrices `raw` includes."""
    names = raw.get("include", [])
    if not (isinstance(names, list) and all(isinstance(n, str) and n in BUILTIN for n in names)):
        raise BenchError(
            f"matrix {where!r}: include takes a list of built-in matrices ({', '.join(BUILTIN)}), got {names!r}"
        )
    cells: list[dict] = []
    transfer: dict = {}
    for name in names:
        included_raw = _load_toml(name)[1]
        cells.extend(_included(included_raw, name)[0])
        cells.extend(included_raw.get("cell", []))
        transfer = transfer or (included_raw.get("transfer") or {})
    return cells, transfer


def _load_toml(name_or_path: str) -> tuple[str, dict]:
    """(name, parsed TOML) of a built-in matrix or a TOML file, with at least one cell
    of its own or included."""
    if name_or_path in BUILTIN:
        text = resources.files("bench").joinpath("matrices", f"{name_or_path}.toml").read_text()
        where = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise BenchError(
                f"unknown matrix {name_or_path!r}: give one of {', '.join(BUILTIN)} or the path of a TOML file"
            )
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise BenchError(f"matrix {name_or_path!r} cannot be read as UTF-8 text ({exc}); give a TOML file") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"matrix {where!r} is not valid TOML: {exc}") from exc
    cells = raw.get("cell", [] if raw.get("include") else None)
    if not isinstance(cells, list) or not (cells or raw.get("include")) or not all(isinstance(c, dict) for c in cells):
        raise BenchError(
            f"matrix {where!r} has no [[cell]] tables; each names an attack, e.g. "
            '[[cell]] attack = "pgd" steps = [10, 20]'
        )
    return Path(where).stem, raw


def expand(cells: list[dict], threat, *, where: str = "matrix", test_size: int | None = None) -> list[Cell]:
    out: dict[str, Cell] = {}
    for i, table in enumerate(cells):
        table = dict(table)
        attack = table.pop("attack", None)
        if not isinstance(attack, str):
            raise BenchError(f'{where}: cell {i + 1} has no attack = "name"')
        paired = table.pop("paired", [])
        lists = {k: v for k, v in table.items() if isinstance(v, list)}
        empty = [k for k, v in lists.items() if not v]
        if empty:
            raise BenchError(
                f"{where}: cell {i + 1} ({attack}): {empty[0]} = [] gives no cells; "
                "list at least one value or drop the key"
            )
        for params in combinations(table, lists, paired, f"{where}: cell {i + 1} ({attack})"):
            cell = make_cell(attack, params, threat, where=f"{where}: cell {i + 1}", test_size=test_size)
            out.setdefault(cell.key, cell)
    return list(out.values())


def matrix_cells(name_or_path: str, threat, test_size: int | None = None) -> list[Cell]:
    """Every cell of a matrix read from its name or path (for scripts and listings; a
    command reads its matrix once, `load_matrix`, and passes the Matrix down)."""
    return load_matrix(name_or_path).cells(threat, test_size)


def matrix_transfer(name_or_path: str) -> tuple[list[str], list[str]]:
    """(surrogate defenses, transfer cell keys) of a matrix's [transfer] table; empty if none."""
    table = load_matrix(name_or_path).transfer
    return list(table.surrogates), list(table.cells)
