"""Hyperparameter presets: TOML files under defenses/presets/ (and any the user names).

A preset names a defense and holds its config, training schedule overrides, the
dataset and architecture it is meant for, where its numbers come from, and the numbers
the paper reports for it, so the leaderboard can show paper and measurement side by
side. The `<defense>_digits` preset is the default when the dataset is digits.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError, did_you_mean

PRESET_DIR = Path(__file__).resolve().parents[2] / "defenses" / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    defense: str
    dataset: str
    arch: str | None
    description: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    """Reported numbers, by leaderboard column (clean, fgsm, pgd20, cw20, ...), in [0, 1];
    `<label>_top5` is a column's top-5 accuracy."""
    paper_eps: float | None = None
    """The L-inf radius the paper's numbers were measured at, where it is not the dataset's
    (Kannan et al.'s ImageNet tables at 16/255 against RobustBench's 4/255): the checkpoint's
    cells at that radius stand beside them (a run at `--eps`, or a matrix's `eps`)."""


def _read(path: Path) -> Preset:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"preset {str(path)!r} cannot be read as UTF-8 text ({exc}); give a TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"preset {str(path)!r} is not valid TOML: {exc}") from exc
    for key in ("defense", "dataset"):
        if key not in raw:
            raise BenchError(f"preset {str(path)!r} lacks the top-level key {key!r}")
    known = {"defense", "dataset", "arch", "description", "source", "config", "train", "paper", "paper_eps"}
    extra = sorted(set(raw) - known)
    if extra:
        raise BenchError(f"preset {str(path)!r} has unknown key {extra[0]!r} (keys: {', '.join(sorted(known))})")
    _check_types(path, raw)
    return Preset(
        name=path.stem,
        defense=raw["defense"],
        dataset=raw["dataset"],
        arch=raw.get("arch"),
        description=raw.get("description", ""),
        source=raw.get("source", ""),
        config=dict(raw.get("config", {})),
        train=dict(raw.get("train", {})),
        paper={k: float(v) for k, v in raw.get("paper", {}).items()},
        paper_eps=float(raw["paper_eps"]) if "paper_eps" in raw else None,
    )


def _check_types(path: Path, raw: dict[str, Any]) -> None:
    """Top-level strings and tables of the right kind, paper numbers in [0, 1]. The
    config and train tables are checked field by field when a recipe is built from them
    (bench.registry.build_config), like every --set value."""
    where = f"preset {str(path)!r}"
    for key in ("defense", "dataset", "arch", "description", "source"):
        if key in raw and not isinstance(raw[key], str):
            raise BenchError(f"{where}: {key} must be a string, got {raw[key]!r}")
    for key in ("config", "train", "paper"):
        if key in raw and not isinstance(raw[key], dict):
            raise BenchError(f"{where}: {key} must be a table ([{key}]), got {raw[key]!r}")
    eps = raw.get("paper_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1):
        raise BenchError(f"{where}: paper_eps must be an L-inf radius in (0, 1], got {eps!r}")
    for column, value in raw.get("paper", {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BenchError(f"{where}: paper.{column} must be an accuracy in [0, 1], got {value!r}")


def all_presets() -> dict[str, Preset]:
    return {p.stem: _read(p) for p in sorted(PRESET_DIR.glob("*.toml"))}


def get_preset(name: str) -> Preset:
    """A preset by name, or by path to a user's TOML file."""
    path = Path(name)
    if name.endswith(".toml"):
        if not path.is_file():
            raise BenchError(f"preset file {name!r} does not exist")
        return _read(path)
    presets = all_presets()
    if name not in presets:
        raise BenchError(f"unknown preset {name!r}{did_you_mean(name, presets)} (`bench ls presets` lists them)")
    return presets[name]


def default_preset(defense: str, dataset: str) -> Preset | None:
    """`<defense>_<dataset>` when it exists (the digits presets), else none. Only that file
    is read: every run resolves its recipe here, and parsing all the presets took about a
    tenth of a second of a rerun that computes nothing."""
    path = PRESET_DIR / f"{defense}_{dataset}.toml"
    return _read(path) if path.is_file() else None
