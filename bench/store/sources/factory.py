"""`--model MODULE:FUNCTION` (with `--weights`), and a module handed to `bench.evaluate`:
the shape the bench has always taken (bench.store.factories builds and rebuilds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from bench.core.data import DatasetSpec
from bench.store.factories import SOURCE_FILE, Factory, build, load_weights, weights_hash
from bench.store.sources.base import Normalization


@dataclass(frozen=True)
class FactorySource:
    kind: ClassVar[str] = "factory"
    factory: Factory
    weights: str | None = None

    @property
    def reference(self) -> str:
        return self.factory.reference

    def build(self, spec: DatasetSpec) -> nn.Module:
        model = build(self.factory)
        if self.weights:
            load_weights(model, self.weights)
        return model.to("cpu").eval()

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        return None  # a factory's model takes [0, 1] inputs, or normalizes inside itself

    def digest(self, model: nn.Module) -> str:
        return weights_hash(model)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory.reference}

    def files(self) -> dict[str, Path]:
        return {SOURCE_FILE: Path(self.factory.module)} if self.factory.is_file else {}


@dataclass(frozen=True)
class ModuleSource:
    """An nn.Module given in Python; rebuilt from its class where that takes no arguments."""

    kind: ClassVar[str] = "factory"
    model: nn.Module
    factory: Factory | None

    @property
    def reference(self) -> str:
        return self.factory.reference if self.factory else type(self.model).__name__

    def build(self, spec: DatasetSpec) -> nn.Module:
        return self.model.to("cpu").eval()

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        return None

    def digest(self, model: nn.Module) -> str:
        return weights_hash(model)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory.reference if self.factory else None}

    def files(self) -> dict[str, Path]:
        return {}
