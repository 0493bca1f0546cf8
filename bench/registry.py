"""Registry[T]: named plugins of one kind (defenses, attacks).

Built-in plugins are found by importing every module of their package; third-party
plugins through an entry-point group. A duplicate name is an error, an unknown name
is an error naming the closest matches, and a plugin that fails to import is an
error rather than a silent gap in the leaderboard.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import inspect
import itertools
import math
import pkgutil
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bench.errors import BenchError, did_you_mean

T = TypeVar("T", bound=Callable[..., Any])

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plugin: its stable name, its function and its config class."""

    name: str
    fn: T
    config: type
    doc: str

    def make_config(self, values: dict[str, Any] | None = None, *, what: str | None = None) -> Any:
        """The config dataclass from defaults plus `values`, with types and ranges checked;
        `what` names where the values came from in errors (default: the plugin's name)."""
        return build_config(self.config, values or {}, what=what or self.name)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, group: str):
        self.kind = kind  # "defense" or "attack", used in messages
        self.package = package  # built-in modules live here
        self.group = group  # entry-point group for third-party plugins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: str, *, config: type) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case")
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"{self.kind} {name!r}: config must be a frozen dataclass")

        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            doc = (fn.__doc__ or config.__doc__ or "").strip()
            self._entries[name] = Entry(name, fn, config, doc)
            return fn

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a plugin (tests register throwaway plugins and clean up after)."""
        self._entries.pop(name, None)

    def load(self) -> None:
        """Import built-in modules and entry points once; import failures are errors."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):
                continue
            importlib.import_module(f"{self.package}.{info.name}")
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must be loud, never a gap
                raise BenchError(
                    f"{self.kind} plugin entry point {ep.name!r} ({ep.value}) failed to "
                    f"import: {type(exc).__name__}: {exc}; fix or uninstall that package"
                ) from exc

    def get(self, name: str) -> Entry[T]:
        self.load()
        if name not in self._entries:
            hint = did_you_mean(name, self._entries)
            raise BenchError(f"unknown {self.kind} {name!r}{hint} (`bench ls {self.kind}s` lists them)")
        return self._entries[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries


def build_config(cls: type, values: dict[str, Any], *, what: str) -> Any:
    """Instantiate a frozen config dataclass from plain values, checking names and types.

    Ints are accepted where floats are expected (TOML and `--set` write `2` for 2.0);
    anything else of the wrong type is an error that names the field.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hint = did_you_mean(unknown[0], fields)
        raise BenchError(
            f"{what}: unknown setting {unknown[0]!r}{hint} (settings: {', '.join(sorted(fields)) or 'none'})"
        )
    clean: dict[str, Any] = {}
    for key, value in values.items():
        clean[key] = coerce(fields[key].type, value, what=f"{what}: {key}")
    try:
        return cls(**clean)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BenchError(f"{what}: {exc}") from exc


def coerce(annotation: Any, value: Any, *, what: str) -> Any:
    """Check one value against a field annotation (given as a string or a type)."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    ann = ann.replace(" ", "")
    optional = ann.endswith("|None") or ann.startswith("Optional[")
    base = ann.removesuffix("|None").removeprefix("Optional[").removesuffix("]") if optional else ann
    if value is None and optional:
        return None
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        # NaN and infinity pass every check written as `value < 0` and poison the numbers
        # a run stores, so no config field takes them.
        if not math.isfinite(value):
            raise BenchError(f"{what} must be a finite number, got {value!r}")
        return float(value)
    if base.startswith("tuple[") and base.endswith(",...]"):  # e.g. tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{what} must be a list, got {value!r}")
        item = base.removeprefix("tuple[").removesuffix(",...]")
        return tuple(coerce(item, v, what=f"{what}[{i}]") for i, v in enumerate(value))
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str):
        return value
    if base not in {"float", "int", "bool", "str"}:
        return value  # other annotated types are left for the dataclass to judge
    raise BenchError(f"{what} must be {base}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring literal written under each field of a dataclass (the string right
    after `x: int = 1`), inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


# The two plugin kinds. Plugin modules (built-in or third-party) register with
# `@register_defense(...)` / `@register_attack(...)` imported from here.
DEFENSES: Registry = Registry("defense", "defenses", "bench.defenses")
ATTACKS: Registry = Registry("attack", "attacks", "bench.attacks")
register_defense = DEFENSES.register
register_attack = ATTACKS.register
