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

PRESET_DIR = Path(__file__).resolve().parent.parent / "defenses" / "presets"


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
    """Reported numbers, by leaderboard column (clean, fgsm, pgd20, cw20, ...), in [0, 1]."""


def _read(path: Path) -> Preset:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"preset {str(path)!r} is not valid TOML: {exc}") from exc
    for key in ("defense", "dataset"):
        if key not in raw:
            raise BenchError(f"preset {str(path)!r} lacks the top-level key {key!r}")
    known = {"defense", "dataset", "arch", "description", "source", "config", "train", "paper"}
    extra = sorted(set(raw) - known)
    if extra:
        raise BenchError(f"preset {str(path)!r} has unknown key {extra[0]!r} (keys: {', '.join(sorted(known))})")
    return Preset(
        name=path.stem, defense=raw["defense"], dataset=raw["dataset"], arch=raw.get("arch"),
        description=raw.get("description", ""), source=raw.get("source", ""),
        config=dict(raw.get("config", {})), train=dict(raw.get("train", {})),
        paper={k: float(v) for k, v in raw.get("paper", {}).items()},
    )


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
    """`<defense>_<dataset>` when it exists (the digits presets), else none."""
    return all_presets().get(f"{defense}_{dataset}")
