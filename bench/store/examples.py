"""The adversarial inputs a cell broke images with, kept beside its checkpoint.

A cell's per-sample bits say which images it broke; its `Breaks` are the inputs that
broke them (an attack's adversarial images, a complete verifier's counterexamples), so a
reader can check a break against the model without running the attack again. They are
written as safetensors in the checkpoint's folder, `examples/<digest of the cell key>.safetensors`,
with two tensors (`indices`: test-set indices, int64; `inputs`: the inputs in [0, 1],
float32, one per index) and the cell's key and threat model in the file's metadata.
Images the model already misclassifies are not among them: the clean image is their
example.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bench.core.images import Images, Picked
from bench.store.streamed import ANY_ROWS, Streamed, write_streamed

FOLDER = "examples"
WRITE_ROWS = 64
"""Inputs read and written at a time."""
INPUTS, INDICES = "inputs", "indices"
"""The names of a file's two tensors."""


@dataclass(frozen=True)
class Breaks:
    """The images one cell broke: their test-set indices and the inputs that broke them."""

    indices: torch.Tensor
    """(k,) int64 test-set indices, increasing."""
    inputs: Images
    """(k, C, H, W) float32: the input the model misclassifies, for each index (a tensor,
    or rows of a crafted file read only as they are written: bench.core.images)."""

    kept: Path | None = None
    """The file they are kept in already (a plain cell writes its breaks as it judges
    them), or None where whoever stores the cell writes them (`write_examples`)."""

    def __post_init__(self):
        if len(self.indices) != len(self.inputs):
            raise ValueError(f"examples: {len(self.indices)} indices for {len(self.inputs)} inputs")


def transfer_examples_key(source_key: str, cell_key: str) -> str:
    """The name a transfer's examples are kept under in its target's folder: its source
    checkpoint's key and the transfer's cell key."""
    return f"transfer[{source_key}]:{cell_key}"


def broken_by(correct: torch.Tensor, clean: torch.Tensor, inputs: Images) -> Breaks:
    """The breaks of a cell run on the whole test set in order: the images the model got
    right (`clean`) that its inputs made it get wrong (`correct` False)."""
    at = (clean & ~correct).nonzero().squeeze(1)
    return Breaks(at, Picked(inputs, at))


def examples_path(checkpoint_dir: str | os.PathLike, cell_key: str) -> Path:
    """Where a cell's examples are kept (a key holds ':', '=' and ',': the file is named by its digest)."""
    digest = hashlib.sha256(cell_key.encode()).hexdigest()[:24]
    return Path(checkpoint_dir) / FOLDER / f"{digest}.safetensors"


def write_examples(checkpoint_dir: str | os.PathLike, cell_key: str, threat: str, breaks: Breaks) -> Path:
    """Write a cell's examples atomically (a reader never sees half a file), the inputs
    WRITE_ROWS at a time; returns the path."""
    inputs = breaks.inputs
    return stream_examples(
        checkpoint_dir,
        cell_key,
        threat,
        tuple(inputs.shape[1:]),
        (inputs[j : j + WRITE_ROWS] for j in range(0, len(inputs), WRITE_ROWS)),
        lambda: breaks.indices,
    )


def stream_examples(
    checkpoint_dir: str | os.PathLike,
    cell_key: str,
    threat: str,
    shape: tuple[int, ...],
    inputs: Iterable[torch.Tensor],
    indices: Callable[[], torch.Tensor],
) -> Path:
    """Write a cell's examples atomically as its inputs come, batch after batch (each
    (k, *shape)), then their test-set indices, asked for once the last batch is in;
    returns the path."""

    rows = 0

    def counted() -> Iterator[torch.Tensor]:
        nonlocal rows
        for batch in inputs:
            rows += len(batch)
            yield batch

    def later() -> Iterator[torch.Tensor]:
        at = indices()
        if len(at) != rows:
            raise ValueError(f"examples: {len(at)} indices for {rows} inputs")
        yield at

    tensors = [
        Streamed(INPUTS, torch.float32, (ANY_ROWS, *shape), counted()),
        Streamed(INDICES, torch.int64, (ANY_ROWS,), later()),
    ]
    path = examples_path(checkpoint_dir, cell_key)
    return write_streamed(path, tensors, lambda: {"cell_key": cell_key, "threat": threat})


def read_examples(checkpoint_dir: str | os.PathLike, cell_key: str) -> Breaks | None:
    """A cell's kept examples; None where none were kept (a row stored before they were)."""
    path = examples_path(checkpoint_dir, cell_key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("cell_key") != cell_key:
            raise ValueError(f"examples: {path} holds another cell's inputs")
        return Breaks(f.get_tensor(INDICES), f.get_tensor(INPUTS), kept=path)
