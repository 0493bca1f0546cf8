"""The shapes an outside model comes in, and how each is built again from its folder.

| --model                             | source                         |
|-------------------------------------|--------------------------------|
| `MODULE:FUNCTION` (+ `--weights`)   | factory.FactorySource          |
| an nn.Module in Python              | factory.ModuleSource           |
| `FILE.onnx`                         | onnx_file.OnnxSource           |
| `timm:NAME`, `torchvision:NAME`     | hub.HubSource (+ `--weights`)  |
| `robustbench:DATASET/THREAT/NAME`   | zoo.ZooSource                  |

Any of them may sit behind a `Normalized` wrapper (`--mean/--std`, or the library's own
metadata), which is part of the stored weights and so of the model's identity. The
checkpoint's meta keeps the source's `record()` under `outside.source`; `rebuild` builds
the architecture from it and loads the stored safetensors over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from bench.core.data import get_spec
from bench.errors import BenchError
from bench.store.factories import SOURCE_FILE, build, class_factory, parse_factory
from bench.store.sources import hub, onnx_file, zoo
from bench.store.sources.base import Normalization, Normalized, Source, parse_normalization, wrapped
from bench.store.sources.factory import FactorySource, ModuleSource
from bench.store.sources.hub import HubSource
from bench.store.sources.onnx_file import OnnxSource
from bench.store.sources.zoo import ZooSource

__all__ = ["Normalization", "Normalized", "Source", "parse_normalization", "parse_source", "rebuild", "wrapped"]

DEFAULT_ROBUSTBENCH_MODELS = "models"
"""RobustBench's own default model_dir: ./models."""


def parse_source(model: nn.Module | str, weights: str | None = None, robustbench_models: str | None = None) -> Source:
    """What --model names, as a source; nothing is built yet."""
    if isinstance(model, nn.Module):
        if weights:
            raise BenchError("weights go with a --model reference, not with a module given in Python")
        return ModuleSource(model, class_factory(model))
    if not isinstance(model, str):
        raise BenchError(f"model must be an nn.Module or a --model reference, got a {type(model).__name__}")
    library, sep, rest = model.partition(":")
    if sep and library in hub.LIBRARIES:
        if not rest:
            raise BenchError(f"--model {model!r}: name the architecture, e.g. --model {library}:resnet18")
        return HubSource(library, rest, weights)
    if sep and library == "robustbench":
        if weights:
            raise BenchError(
                "--weights does not go with --model robustbench:...: the weights are read from RobustBench's "
                "models/ folder (--robustbench-models)"
            )
        dataset, threat, name = zoo.parse(rest)
        return ZooSource(dataset, threat, name, Path(robustbench_models or DEFAULT_ROBUSTBENCH_MODELS))
    if model.endswith(".onnx"):
        if weights:
            raise BenchError("--weights does not go with an ONNX file: its weights are inside it")
        return OnnxSource(Path(model))
    return FactorySource(parse_factory(model), weights)


def dataset_of(source: Source) -> str | None:
    """The dataset a source names itself (a RobustBench entry), else None."""
    return source.dataset if isinstance(source, ZooSource) else None


def architecture(info: dict[str, Any], directory: Path, dataset: str, name: str) -> nn.Module:
    """The network of a stored outside model, before its weights are loaded."""
    record = info.get("source") or {"kind": "factory", "factory": info.get("factory")}
    kind = record["kind"]
    if kind == "onnx":
        return onnx_file.architecture(record, directory)
    if kind == "hub":
        return hub.architecture(record["library"], record["name"], get_spec(dataset))
    if kind == "robustbench":
        return zoo.entry(record["dataset"], record["threat"], record["name"])["model"]()
    if not record.get("factory"):
        raise BenchError(
            f"outside model {name!r} was given as an object with no importable factory, so it cannot be "
            "rebuilt; evaluate it with --model MODULE:FUNCTION"
        )
    source = directory / SOURCE_FILE
    return build(parse_factory(record["factory"]), source if source.is_file() else None)


def rebuild(meta: dict, directory: Path, device: str = "cpu") -> nn.Module:
    """An outside model from its checkpoint folder: its architecture, behind the stored
    normalization where it had one, with the stored weights."""
    info = meta["outside"]
    spec = get_spec(meta["dataset"])
    model = wrapped(
        architecture(info, directory, meta["dataset"], meta["defense"]),
        Normalization.of_record(info.get("normalize")),
        spec,
    )
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device="cpu"))
    return model.to(device).eval()
