"""Provenance: what every stored result records about where it came from (the package's
version, the git commit of its source tree, the device it ran on)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch


def package_version() -> str:
    try:
        return importlib.metadata.version("robustness-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the source tree the package runs from, if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


@functools.cache
def source_digest() -> str:
    """sha256 of the source this process runs (every .py file of the bench, attacks and
    defenses packages, by path): two processes that compute cells for one store must run
    the same code, or their numbers differ without a word (a tree edited while a run's
    workers start)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for package in ("bench", "attacks", "defenses"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()
