"""A cell: one attack at one concrete budget, and its canonical key.

Its key is `attack:k=v,...` over every config field in sorted order, the way HELM names
runs: the same string is the CLI argument, the log line and the database key. A cell may
also set `subset = N` to run on a fixed, seeded subset of N test images; a cascade's cell
`nearest = F` to attack only the share F of the images left standing before it that lie
nearest the decision boundary (bench.core.nearest), and `when = "black_box_won"` to run
only where an earlier black-box cell of the cascade broke an image (bench.core.gate).
Matrices of cells are read in bench.core.matrix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.core import contract
from bench.core.gate import Gate, gate_from
from bench.core.kinds import CellKind
from bench.core.nearest import Nearest, nearest_from
from bench.errors import BenchError
from bench.registry import ATTACKS


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
