"""A safetensors file written a batch at a time, so a set larger than memory can be kept.

safetensors writes only tensors already whole in memory (`save_file`). ImageNet's crafted
examples are 3 GB of float32 at 5,000 images, so the bench writes the same format itself,
batch after batch: an 8-byte header length, a JSON header naming each tensor's dtype,
shape and byte range, then the tensors' bytes in order. The header is reserved first and
written last, padded with spaces as the format allows, because its metadata (what
crafting cost) is only known when the last batch is in. Files are read back with
safetensors itself (`safe_open`, `load_file`), which checks all of it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

HEADER_RESERVE = 4096
"""Bytes kept for the header beyond its tensors' entries (the metadata); a multiple of 8,
as safetensors aligns the data that follows."""

_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


ANY_ROWS = -1
"""A `Streamed` first dimension: as many rows as its batches give (a cell's breaks, whose
number is known when the last batch is judged)."""


@dataclass(frozen=True)
class Streamed:
    """One tensor of a streamed file: its name, dtype, shape, and its rows in order."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    """The tensor's shape; its first dimension may be ANY_ROWS."""
    batches: Iterable[torch.Tensor]
    """Consecutive slices along the first dimension, together exactly `shape`. They are
    consumed after the batches of the tensors before this one, so a later tensor's may be
    made from what the earlier ones' gave."""


def write_streamed(path: Path, tensors: list[Streamed], metadata: Callable[[], dict[str, str]]) -> Path:
    """Write `tensors` as one safetensors file at `path`, atomically (a reader never sees
    half a file): each tensor's batches are consumed in order and written as they come.
    `metadata` is called once every batch is in. Returns `path`."""
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise ValueError(f"streamed tensors are {sorted(map(str, _DTYPES))}, got {t.dtype}")
    # Room for the largest header these tensors could need (every row count and offset at
    # 20 digits), then the metadata's.
    widest = {t.name: _entry(t, [2**63] * len(t.shape), 2**63, 2**63) for t in tensors}
    reserved = len(_header(widest, {})) + HEADER_RESERVE
    reserved += -reserved % 8
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * (8 + reserved))
            entries, offset = {}, 0
            for t in tensors:
                rows, size = 0, 0
                for batch in t.batches:
                    if tuple(batch.shape[1:]) != tuple(t.shape[1:]):
                        raise ValueError(f"{t.name}: a batch of shape {tuple(batch.shape)} in a tensor of {t.shape}")
                    data = batch.detach().to("cpu", t.dtype).contiguous().numpy().tobytes()
                    f.write(data)
                    rows, size = rows + len(batch), size + len(data)
                if t.shape[0] not in (rows, ANY_ROWS):
                    raise ValueError(f"{t.name}: batches gave {rows} rows of {t.shape[0]}")
                entries[t.name] = _entry(t, [rows, *t.shape[1:]], offset, offset + size)
                offset += size
            header = _header(entries, metadata())
            if len(header) > reserved:
                raise ValueError(f"streamed file {path}: metadata of {len(header)} bytes over the {reserved} reserved")
            f.seek(0)
            f.write(struct.pack("<Q", reserved) + header + b" " * (reserved - len(header)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _entry(t: Streamed, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": _DTYPES[t.dtype], "shape": shape, "data_offsets": [begin, end]}


def _header(entries: dict, metadata: dict[str, str]) -> bytes:
    return json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
