"""Checkpoints: safetensors weights plus a JSON sidecar; loading never unpickles.

results/checkpoints/<dataset>/<defense>/<key>/model.safetensors and meta.json. The key
is a hash of the canonical JSON of everything that determines the weights (defense,
its full config, training schedule, dataset, architecture, seed), so the same recipe
is found again instead of retrained. Files are written to a temporary folder and
renamed into place, so a killed run never leaves half a checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.core.data import get_spec
from bench.core.models import build_model
from bench.errors import BenchError
from bench.store.sources import rebuild

KEY_SCHEMA = 1  # bump only if the key's ingredients change; old keys stay valid


def canonical(obj: Any) -> str:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def checkpoint_key(defense: str, config, train_config, dataset: str, arch: str, seed: int) -> str:
    payload = canonical(
        {
            "schema": KEY_SCHEMA,
            "defense": defense,
            "config": dataclasses.asdict(config),
            "train": dataclasses.asdict(train_config),
            "dataset": dataset,
            "arch": arch,
            "seed": seed,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_dir(results: Path, dataset: str, defense: str, key: str) -> Path:
    return results / "checkpoints" / dataset / defense / key


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: torch.nn.Module, directory: Path, meta: dict, files: dict[str, Path] | None = None) -> dict:
    """Write weights, meta and `files` (name in the folder -> source path) atomically;
    returns the meta of the folder now in place: ours with the weights' sha256 added, or
    that of an intact folder another writer put there first (the same key, so the same
    weights). The one writer of checkpoint folders, trained and outside alike."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        weights = tmp / "model.safetensors"
        # Cloned: tied weights share storage, which safetensors refuses to write twice.
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(weights))
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        meta = dict(meta, sha256=sha256_file(weights))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=list))
        # Renaming a folder onto an existing, non-empty one fails, so of two writers of
        # the same key only one puts its folder in place; the other keeps what is there.
        for _ in range(3):
            try:
                os.rename(tmp, directory)
                return meta
            except OSError:
                if not directory.exists():
                    raise
            existing = read_meta(directory)
            if existing is not None:  # another writer was first with an intact folder
                return existing
            # A broken folder (not intact): move it aside atomically, then try again.
            aside = Path(tempfile.mkdtemp(prefix=".broken-", dir=directory.parent))
            try:
                os.rename(directory, aside / "old")
            except FileNotFoundError:  # another writer moved it first
                pass
            shutil.rmtree(aside, ignore_errors=True)
        raise BenchError(f"could not put checkpoint folder {str(directory)!r} in place; check the folder")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(directory: Path) -> dict | None:
    """The sidecar of a complete, intact checkpoint folder, else None."""
    meta_path, weights = directory / "meta.json", directory / "model.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    return meta if meta.get("sha256") == sha256_file(weights) else None


def build_from_meta(meta: dict, weights: Path, device: str = "cpu") -> torch.nn.Module:
    if meta.get("outside"):  # a user's model: rebuilt from its factory, not an architecture
        return rebuild(meta, weights.parent, device)
    model = build_model(meta["arch"], get_spec(meta["dataset"]))
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval()


def load_checkpoint(
    path_or_key: str | os.PathLike, results: str | os.PathLike | None = None, device: str = "cpu"
) -> torch.nn.Module:
    """A checkpoint as an eval-mode nn.Module taking [0, 1] inputs.

    Accepts a checkpoint folder, its model.safetensors, or a key (looked up under
    `results`, default ./results or $BENCH_RESULTS). The weights' sha256 is checked
    against the sidecar.
    """
    path = Path(path_or_key)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        base = Path(results or os.environ.get("BENCH_RESULTS", "results")) / "checkpoints"
        matches = sorted(base.glob(f"*/*/{path_or_key}*")) if base.is_dir() else []
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise BenchError(
                f"{what} checkpoint matches {str(path_or_key)!r} under {str(base)!r}; "
                "pass a checkpoint folder or a unique key"
            )
        path = matches[0]
    meta = read_meta(path)
    if meta is None:
        raise BenchError(
            f"{str(path)!r} is not an intact checkpoint (meta.json missing, unreadable, "
            "or the weights' sha256 does not match it)"
        )
    return build_from_meta(meta, path / "model.safetensors", device)
