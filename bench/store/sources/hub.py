"""`--model timm:NAME` and `--model torchvision:NAME` with `--weights FILE`: a library's
architecture, built for the dataset's classes and channels, with the user's weights.

Nothing is downloaded: the architecture is built with `pretrained=False` (timm) or
`weights=None` (torchvision) and the weights come from the user's file (safetensors, or
a torch checkpoint read weights-only). The input normalization is the library's own
metadata (timm's `pretrained_cfg`, torchvision's default weights' transforms) unless
--mean/--std say otherwise. The images go in at the dataset's own size: the library's
input size (224 for most ImageNet models) is not imposed, since resizing inside the
model would change the geometry of the threat model.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from bench.core.data import DatasetSpec
from bench.errors import BenchError, did_you_mean
from bench.store.factories import first_line, load_state, read_state, weights_hash
from bench.store.sources.base import Normalization

LIBRARIES = ("timm", "torchvision")


def _timm():
    """timm, imported here (it serves this shape of model alone) and quietly: its import
    warns that torch.jit.interface is deprecated, which is no concern of the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            import timm
        except ImportError as exc:
            raise BenchError("--model timm:... needs the timm package: pip install 'robustness-bench[timm]'") from exc
    return timm


def _names(library: str) -> list[str]:
    if library == "timm":
        return list(_timm().list_models())
    # torchvision's model registry: only this shape of model needs it.
    from torchvision.models import list_models

    return list(list_models())


def architecture(library: str, name: str, spec: DatasetSpec) -> nn.Module:
    """The named architecture for the dataset (its classes; its channels where the library
    lets them be chosen), with initial weights: nothing downloaded."""
    names = _names(library)
    if name not in names:
        raise BenchError(
            f"--model {library}:{name}: {library} {_version(library)} has no model {name!r}{did_you_mean(name, names)}"
        )
    try:
        if library == "timm":
            return _timm().create_model(name, pretrained=False, num_classes=spec.num_classes, in_chans=spec.shape[0])
        # torchvision's model builders load dozens of modules: only this shape needs them.
        from torchvision.models import get_model

        return get_model(name, weights=None, num_classes=spec.num_classes)
    except Exception as exc:  # an architecture that cannot take the dataset's classes or channels
        raise BenchError(
            f"--model {library}:{name} cannot be built for {spec.name} ({spec.num_classes} classes, "
            f"{spec.shape[0]} channel(s)): {type(exc).__name__}: {first_line(exc)[:160]}"
        ) from exc


def _version(library: str) -> str:
    return importlib.metadata.version(library)


def library_normalization(library: str, name: str, model: nn.Module) -> tuple[Normalization | None, Any]:
    """(the library's normalization, its input size) from its metadata; the size is for
    the user's eyes (bench.store.sources.hub's docstring says why it is not imposed)."""
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        size = cfg.get("input_size")
        origin = f"timm's pretrained_cfg of {name}"
    else:
        # torchvision's weights registry: only this shape of model needs it.
        from torchvision.models import get_model_weights

        try:
            transforms = get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError):  # an architecture torchvision has no weights for
            return None, None
        mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
        size = getattr(transforms, "crop_size", None)
        origin = f"torchvision's default weights of {name}"
    if mean is None or std is None:
        return None, size
    return Normalization(tuple(mean), tuple(std), origin), size


@dataclass(frozen=True)
class HubSource:
    library: str
    name: str
    weights: str | None

    kind: ClassVar[str] = "hub"

    @property
    def reference(self) -> str:
        return f"{self.library}:{self.name}"

    def build(self, spec: DatasetSpec) -> nn.Module:
        model = architecture(self.library, self.name, spec)
        if not self.weights:
            raise BenchError(
                f"--model {self.reference} needs --weights FILE: the bench never downloads weights; "
                "save the trained state_dict (safetensors or torch.save) and pass it"
            )
        load_state(
            model,
            read_state(self.weights),
            f"--weights {self.weights!r}",
            f"save them from {self.library}'s {self.name} built with num_classes={spec.num_classes}",
        )
        return model.to("cpu").eval()

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        norm, _ = library_normalization(self.library, self.name, architecture(self.library, self.name, spec))
        if norm is not None and len(norm.mean) not in (1, spec.shape[0]):
            raise BenchError(
                f"{norm.origin} normalizes {len(norm.mean)} channels and {spec.name} images have "
                f"{spec.shape[0]}; say how the network was trained with --mean and --std"
            )
        return norm

    def digest(self, model: nn.Module) -> str:
        return weights_hash(model)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "library": self.library, "name": self.name, "version": _version(self.library)}

    def files(self) -> dict[str, Path]:
        return {}
