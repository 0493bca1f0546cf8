"""What every shape of outside model gives the store, and the normalization said once.

A source builds the user's network with the user's weights (`build`), says how its
library normalizes inputs (`normalization`), names what identifies it (`digest`), and
records how to build the same architecture again from its checkpoint folder (`record`,
`files`). The store keeps the network's state_dict as safetensors whatever the shape, so
a rebuilt model is the architecture (bench.store.sources.rebuild) plus those weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from bench.core.data import DatasetSpec
from bench.core.models import Normalize
from bench.errors import BenchError


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std the network expects its inputs normalized by."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str
    """Who said it: `--mean/--std`, or the library's metadata."""

    def checked(self, spec: DatasetSpec) -> Normalization:
        """One value per channel of the dataset (or one for all), every std positive."""
        channels = spec.shape[0]
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise BenchError(
                    f"{self.origin}: {label} has {len(values)} values and {spec.name} images have {channels} "
                    f"channel(s); give {channels} (or 1 for all), e.g. --{label} "
                    f"{','.join(['0.5'] * channels)}"
                )
            if not all(math.isfinite(v) for v in values):
                raise BenchError(f"{self.origin}: {label} {values} is not finite")
        if any(v <= 0 for v in self.std):
            raise BenchError(f"{self.origin}: std {self.std} must be positive")
        return self

    def record(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "origin": self.origin}

    @classmethod
    def of_record(cls, record: dict[str, Any] | None) -> Normalization | None:
        if not record:
            return None
        return cls(tuple(record["mean"]), tuple(record["std"]), record.get("origin", "stored"))


def parse_normalization(mean: str | None, std: str | None) -> Normalization | None:
    """`--mean 0.49,0.48,0.45 --std 0.25,0.24,0.26`: both or neither."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise BenchError("--mean and --std go together: give both (e.g. --mean 0.5 --std 0.5), or neither")

    def floats(flag: str, text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise BenchError(f"{flag} {text!r}: give numbers separated by commas, e.g. {flag} 0.5,0.5,0.5") from None
        return values

    return Normalization(floats("--mean", mean), floats("--std", std), "--mean/--std")


class Normalized(nn.Module):
    """The network behind its normalization: the bench's attacks work on [0, 1] pixels
    and the budget stays in pixel units, whatever inputs the network was trained on. Its
    mean and std are buffers, so they are part of the weights' hash and the stored file."""

    def __init__(self, model: nn.Module, normalization: Normalization, channels: int):
        super().__init__()
        mean, std = normalization.mean, normalization.std
        self.normalize = Normalize(  # one value stands for every channel
            mean * channels if len(mean) == 1 else mean, std * channels if len(std) == 1 else std
        )
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def wrapped(model: nn.Module, normalization: Normalization | None, spec: DatasetSpec) -> nn.Module:
    """The model as the bench attacks it: behind its normalization, where it has one."""
    return model if normalization is None else Normalized(model, normalization, spec.shape[0])


class Source(Protocol):
    """One shape of outside model (a factory, an ONNX file, a library name, a zoo entry)."""

    kind: ClassVar[str]
    """Stable name of the shape, stored in the checkpoint's meta."""

    @property
    def reference(self) -> str:
        """What the user wrote after --model."""
        ...

    def build(self, spec: DatasetSpec) -> nn.Module:
        """The network with the user's weights, on the CPU, in eval mode."""
        ...

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        """The library's own input normalization, where its metadata has one."""
        ...

    def digest(self, model: nn.Module) -> str:
        """What identifies the model: the sha256 of its file or of its weights."""
        ...

    def record(self) -> dict[str, Any]:
        """How to build the architecture again (JSON, with `kind`)."""
        ...

    def files(self) -> dict[str, Path]:
        """Files the checkpoint folder keeps (name there -> path here)."""
        ...
