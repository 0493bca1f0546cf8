"""Recipes: what the user asked for (TrainRequest) resolved into what gets trained (Recipe).

A defense's config is its dataclass defaults, then a preset, then `--set key=value`
overrides; the canonical JSON of the result, with dataset, architecture and seed,
hashes to the checkpoint key. A recipe trained data-parallel on N > 1 workers is another
checkpoint (its global batch is N times the per-worker batch, and its random draws are
split among the workers), so N enters its key; one worker keeps the keys it always had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from typing import Any

import torch

from bench.core.data import DatasetSpec, get_spec
from bench.core.models import build_model
from bench.core.presets import Preset, default_preset, get_preset
from bench.engine.train import TrainConfig
from bench.errors import BenchError, did_you_mean
from bench.registry import DEFENSES, build_config
from bench.store import checkpoints as ckpt


@dataclass(frozen=True)
class TrainRequest:
    """What the user asked for; `resolve` turns it into a concrete recipe."""

    defense: str
    dataset: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    """`key=value` strings; keys of the defense config or of TrainConfig."""
    arch: str | None = None
    seed: int = 0
    workers: int = 1
    """Processes that train the one checkpoint data-parallel (`--workers`), each on
    train_config.batch_size images of every step."""


@dataclass(frozen=True)
class Recipe:
    defense: str
    config: Any
    train_config: TrainConfig
    dataset: DatasetSpec
    arch: str
    seed: int
    preset: Preset | None
    workers: int = 1
    """Data-parallel workers (bench.run.distributed); 1 trains in one process."""

    @property
    def key(self) -> str:
        key = ckpt.checkpoint_key(self.defense, self.config, self.train_config, self.dataset.name, self.arch, self.seed)
        if self.workers == 1:
            return key
        # The one-process key with the worker count hashed in: a new ingredient that
        # leaves every one-process key as it was.
        return hashlib.sha256(f"{key}:workers={self.workers}".encode()).hexdigest()[:16]

    @property
    def paper_threat(self) -> str | None:
        """The threat model its preset's paper numbers are at, where the preset names a
        radius of its own (`paper_eps`); None: the checkpoint's own."""
        eps = self.preset.paper_eps if self.preset else None
        return self.dataset.threat.at(eps).name if eps is not None else None

    def train_record(self) -> dict:
        """The training settings as stored (the checkpoint's `train` config): TrainConfig's
        fields, and the worker count where it is more than one."""
        record = dataclasses.asdict(self.train_config)
        return record if self.workers == 1 else {**record, "workers": self.workers}


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BenchError(f"--set {item!r} is not key=value (e.g. --set beta=0.5)")
    try:  # TOML value syntax: 0.5, 3, true, "batch", [100, 150]
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().removeprefix("train."), value


SEED_LIMIT = 2**31
"""Seeds are stored in a 32-bit integer column (PostgreSQL's INTEGER)."""
MAX_WORKERS = 1024
"""More data-parallel workers than any cluster here holds; a bound to catch typos."""


def resolve(spec: TrainRequest) -> Recipe:
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not 0 <= spec.seed < SEED_LIMIT:
        raise BenchError(f"--seed must be an integer in [0, {SEED_LIMIT}), got {spec.seed!r}")
    if isinstance(spec.workers, bool) or not isinstance(spec.workers, int) or not 1 <= spec.workers <= MAX_WORKERS:
        raise BenchError(
            f"--workers must be an integer between 1 and {MAX_WORKERS}, got {spec.workers!r} "
            "(1 trains in one process; N trains one checkpoint data-parallel on N Ray Train workers)"
        )
    entry = DEFENSES.get(spec.defense)
    preset = get_preset(spec.preset) if spec.preset else None
    if preset and preset.defense != spec.defense:
        raise BenchError(f"preset {preset.name!r} is for defense {preset.defense!r}, not {spec.defense!r}")
    dataset = spec.dataset or (preset.dataset if preset else "digits")
    ds = get_spec(dataset)
    if preset and preset.dataset != dataset:
        raise BenchError(
            f"preset {preset.name!r} is for dataset {preset.dataset!r}; "
            f"drop --dataset or pass --dataset {preset.dataset}"
        )
    preset = preset or default_preset(spec.defense, dataset)

    defense_values = dict(preset.config) if preset else {}
    train_values = dict(preset.train) if preset else {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defense_fields = {f.name for f in dataclasses.fields(entry.config)}
    for item in spec.overrides:
        key, value = parse_override(item)
        if key in defense_fields:
            defense_values[key] = value
        elif key in train_fields:
            train_values[key] = value
        else:
            hint = did_you_mean(key, defense_fields | train_fields)
            raise BenchError(
                f"--set {key}: not a setting of {spec.defense!r} or of training{hint} "
                f"(defense: {', '.join(sorted(defense_fields)) or 'none'}; "
                f"training: {', '.join(sorted(train_fields))})"
            )
    source = f"preset {preset.name!r} or --set" if preset else "--set"
    cfg = entry.make_config(defense_values, what=f"{spec.defense} ({source})")
    train_cfg = build_config(TrainConfig, train_values, what=f"training ({source})")
    if ds.streamed is not None and train_cfg.augment != "none":
        # The loop refuses it too (bench.engine.train); here it is one line before anything runs.
        raise BenchError(
            f"augment={train_cfg.augment!r} ({source}): {ds.name}'s training images are cropped and flipped "
            "as they stream from disk (random resized crop); leave augment at 'none'"
        )
    arch = spec.arch or (preset.arch if preset and preset.arch else ds.default_arch)
    _check_fits(arch, ds)  # fail early on an unknown architecture or one the images do not fit
    return Recipe(spec.defense, cfg, train_cfg, ds, arch, spec.seed, preset, spec.workers)


def _check_fits(arch: str, ds: DatasetSpec) -> None:
    """One forward pass of a zero image: an architecture built for other image sizes (a
    28x28 MNIST network on 8x8 digits) fails here, not in the middle of training."""
    model = build_model(arch, ds).eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *ds.shape))
    except RuntimeError as exc:
        raise BenchError(
            f"architecture {arch!r} does not fit the {'x'.join(map(str, ds.shape))} images of "
            f"{ds.name} ({str(exc).splitlines()[0]}); drop --arch for the dataset's default "
            f"{ds.default_arch!r}"
        ) from exc
    if tuple(logits.shape) != (1, ds.num_classes):
        raise BenchError(
            f"architecture {arch!r} gives logits of shape {tuple(logits.shape)} on {ds.name}, "
            f"not (1, {ds.num_classes}); drop --arch for the dataset's default {ds.default_arch!r}"
        )
