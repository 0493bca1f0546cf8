"""Attack matrices: TOML files expanded into cells with canonical keys.

A matrix is a list of `[[cell]]` tables, each naming an attack and its parameters; a list value
expands into one cell per element (a product across lists, except the lists a table's `paired`
names, which go together element by element). Unset budgets are filled from the dataset's threat
model, so every cell is concrete, and its key is `attack:k=v,...` over every config field in sorted
order, the way HELM names runs: the same string is the CLI argument, the log line and the database
key. A cell may also set `subset = N` to run on a fixed, seeded subset of N test images, and a
cascade's cell `nearest = F` to attack only the share F of the images left standing before it that
lie nearest the decision boundary (bench.core.nearest), and `when = "black_box_won"` to run only
where an earlier black-box cell of the cascade broke an image (bench.core.gate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bench.core import contract
from bench.core.expansion import combinations
from bench.core.gate import Gate, gate_from
from bench.core.kinds import CellKind, Role
from bench.core.nearest import Nearest, nearest_from
from bench.errors import BenchError
from bench.registry import ATTACKS

BUILTIN = ("quick", "fast", "full", "paper", "truth", "kannan_imagenet", "robustbench")
SCHEDULES = ("all", "cascade")
"""How a matrix runs its cells: `all` on the whole test set each (or its subset), or
`cascade`, in the matrix's order, each on what the earlier ones left standing."""


@dataclass(frozen=True)
class Cell:
    attack: str
    config: contract.AttackConfig
    """The attack's frozen config with every budget filled in."""
    key: str
    threat: str
    """The threat model the cell counts toward, e.g. linf-0.2."""
    subset: int = 0
    """0: the whole test set; N: the first N of a seeded permutation of it."""
    eot: int = 0
    """Forward passes whose mean logits the attack follows (bench.science.adaptive.EOT); 0: one."""
    votes: int = 0
    """Passes that judge each prediction by majority (randomized models); 0: one pass."""
    rounds: int = 1
    """Times the attack runs on what the majority verdict leaves standing (randomized models)."""
    view: Callable[[Any], Any] | None = None
    """A view of the model the attack crafts through, `view(model)` (such as
    bench.engine.mirror.ThroughForward), named in the key; the verdicts stay the model's
    own. None: the model itself."""
    nearest: Nearest | None = None
    """A cascade's cell only: it attacks the share of the images standing before it nearest
    the boundary (bench.core.nearest); None: all."""
    when: Gate | None = None
    """A cascade's cell only: it runs only where the cascade showed this sign (bench.core.gate),
    and on no image elsewhere; None: always."""
    cascade: str = ""
    """The cascade matrix the cell belongs to (its key ends `,cascade=<name>`, `cascade_keyed`):
    it runs on what every earlier cell left standing. Empty: its whole test set (or subset)."""

    @property
    def seed(self) -> int:
        """The seed of the cell's random draws (starts, targets, queries): derived from its
        key, so two cells never share a stream. With one seed for every cell, PGD-50 was the
        first 50 steps of PGD-1000 from the same start, and a long fixed-step run revisits
        an earlier iterate within a few dozen steps: longer cells could add nothing."""
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:4], "big") & 0x7FFFFFFF

    @property
    def verifier(self) -> bool:
        """A verifier cell (its attack config says `verifier = True`): it returns per-image
        verdicts (bench.engine.verified) and brackets the worst case rather than making it."""
        return contract.hooks(self.config).verifier

    @property
    def kind(self) -> CellKind:
        """What the cell's stored bits say (bench.core.kinds): an attack's unless its config
        declares a verifier's kind."""
        return contract.hooks(self.config).kind


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _in_key(f: dataclasses.Field, config: Any) -> bool:
    """Fields marked metadata={"key": False} change speed, not results (early stop), and
    stay out of the key; fields marked {"key": "set"} enter it only away from their
    default, so a field added later leaves the keys of the cells it does not change as
    they were (and their stored rows found)."""
    mark = f.metadata.get("key", True)
    if mark == "set":
        return getattr(config, f.name) != f.default
    return bool(mark)


def cell_key(
    attack: str, config: Any, subset: int = 0, nearest: Nearest | None = None, when: Gate | None = None
) -> str:
    parts = [f"{f.name}={_fmt(getattr(config, f.name))}" for f in dataclasses.fields(config) if _in_key(f, config)]
    if subset:
        parts.append(f"subset={subset}")
    if nearest:
        parts += nearest.key_parts()
    if when:
        parts.append(f"when={when.value}")
    return f"{attack}:" + ",".join(sorted(parts))


def make_cell(
    attack: str, params: dict[str, Any], threat, *, where: str = "cell", test_size: int | None = None
) -> Cell:
    """One concrete cell; `where` names its origin (file and cell) in every error, and
    `test_size`, where the dataset is known, bounds its subset."""
    params = dict(params)
    subset = params.pop("subset", 0)
    nearest = nearest_from(params, attack, where)
    when = gate_from(params, attack, where)
    if not isinstance(subset, int) or isinstance(subset, bool) or subset < 0:
        raise BenchError(f"{where} ({attack}): subset must be a non-negative integer, got {subset!r}")
    if test_size is not None and subset > test_size:
        raise BenchError(
            f"{where} ({attack}): subset must be at most the test set's {test_size} images, "
            f"got {subset} (0 runs on all of them)"
        )
    try:
        entry = ATTACKS.get(attack)
    except BenchError as exc:
        raise BenchError(f"{where}: {exc}") from exc
    cfg = entry.make_config(params, what=f"{where} ({attack})")
    try:  # the budget filled from the threat model is checked like one given
        cfg = contract.with_threat(cfg, threat)
    except (TypeError, ValueError) as exc:
        raise BenchError(f"{where} ({attack}): {exc}") from exc
    key = cell_key(attack, cfg, subset, nearest, when)
    return Cell(attack, cfg, key, cfg.threat_key(), subset, nearest=nearest, when=when)


def parse_cell_key(key: str, threat) -> Cell:
    """A cell from its canonical key (or a short form such as `pgd:steps=10`)."""
    name, _, rest = key.partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise BenchError(f"attack cell {key!r}: {part!r} is not key=value")
        params[k.strip()] = _parse_value(v.strip())
    return make_cell(name.strip(), params, threat, where=f"attack cell {key!r}")


def transfer_cell(key: str, threat) -> Cell:
    """The cell that crafts examples for other models: parsed from its key, then with its
    config's `for_transfer()` where it has one (PGD keeps its final iterate rather than the
    first that fools the source), so the key says how the examples were made."""
    cell = parse_cell_key(key, threat)
    config = contract.for_transfer(cell.config)
    if config is None:
        return cell
    return dataclasses.replace(cell, config=config, key=cell_key(cell.attack, config, cell.subset))


def _parse_value(v: str) -> Any:
    if v in ("true", "false"):
        return v == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


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
