"""`--model robustbench:DATASET/THREAT/NAME`: an architecture of RobustBench's model zoo
(the optional `robustbench` extra) with the weights the user downloaded once into
RobustBench's `models/` folder, in its own layout and checkpoint format.

RobustBench keeps a model's weights at `<models>/<dataset>/<threat>/<NAME>.pt` (its
`load_model(model_dir=...)` default is ./models) as a torch checkpoint whose tensors sit
under `state_dict` with DataParallel's `module.` prefix; those are read weights-only
here, never unpickled as code. Its zoo's architectures normalize their inputs inside
themselves where their authors did, so no normalization is added unless --mean/--std
say so. Where the user's RobustBench checkout has the entry's `model_info` JSON beside
`models/`, its reported clean and AutoAttack accuracy go on the board beside ours, as
presets show their paper's numbers.

robustbench 1.1.1's package `__init__` imports its evaluation code, which needs the
`autoattack` package from GitHub (not on PyPI; the bench uses `pyautoattack`) and
setuptools' `pkg_resources`; the zoo itself needs neither. So the zoo's modules are
loaded under a bare `robustbench` package that skips that `__init__`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from bench.core.data import DatasetSpec
from bench.errors import BenchError, did_you_mean
from bench.store.factories import load_state, read_state, weights_hash
from bench.store.sources.base import Normalization

DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}
"""RobustBench's dataset names that are bench datasets (ImageNet is not one yet)."""
THREATS = ("Linf", "L2", "corruptions")


def _zoo() -> Any:
    """robustbench.model_zoo.models, without running robustbench's package __init__."""
    if "robustbench" not in sys.modules:
        spec = importlib.util.find_spec("robustbench")
        if spec is None or not spec.submodule_search_locations:
            raise BenchError(
                "--model robustbench:...: the robustbench package is not installed; "
                "pip install 'robustness-bench[robustbench]'"
            )
        package = types.ModuleType("robustbench")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["robustbench"] = package
    # Quietly: the zoo's architectures (and the timm they import) warn about torch APIs
    # they use, which are no concern of the user's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import models
    return models


def parse(text: str) -> tuple[str, str, str]:
    """`DATASET/THREAT/NAME` -> its three parts, checked."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise BenchError(
            f"--model robustbench:{text}: write robustbench:DATASET/THREAT/NAME, "
            "e.g. robustbench:cifar10/Linf/Carmon2019Unlabeled"
        )
    dataset, threat, name = parts
    if dataset not in DATASETS:
        raise BenchError(
            f"--model robustbench:{text}: dataset {dataset!r} is not one the bench reads; "
            f"use one of {', '.join(DATASETS)}"
        )
    if threat not in THREATS:
        raise BenchError(f"--model robustbench:{text}: threat {threat!r} is not RobustBench's; use one of {THREATS}")
    return dataset, threat, name


def entry(dataset: str, threat: str, name: str) -> dict[str, Any]:
    models = _zoo()
    # robustbench is an optional extra, loaded by _zoo() above.
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = models.model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in zoo:
        raise BenchError(
            f"--model robustbench:{dataset}/{threat}/{name}: RobustBench's zoo has no such model"
            f"{did_you_mean(name, zoo)}"
        )
    found = zoo[name]
    if isinstance(found.get("gdrive_id"), list):
        raise BenchError(
            f"--model robustbench:{dataset}/{threat}/{name} is an ensemble of several checkpoints, "
            "which the bench does not load; give it as a Python factory"
        )
    return found


def reported(model_dir: Path, dataset: str, threat: str, name: str) -> dict[str, float]:
    """The zoo's reported accuracies as fractions ({} where the checkout lacks its JSON)."""
    info = model_dir.parent / "model_info" / dataset / threat / f"{name}.json"
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text())
        out = {"clean": float(data["clean_acc"]) / 100}
        if data.get("autoattack_acc") not in (None, ""):
            out["autoattack"] = float(data["autoattack_acc"]) / 100
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{str(info)!r} is not a RobustBench model_info file ({exc}); remove it or fix it") from exc


@dataclass(frozen=True)
class ZooSource:
    dataset: str
    threat: str
    name: str
    model_dir: Path

    kind: ClassVar[str] = "robustbench"

    @property
    def reference(self) -> str:
        return f"robustbench:{self.dataset}/{self.threat}/{self.name}"

    @property
    def weights_path(self) -> Path:
        return self.model_dir / self.dataset / self.threat / f"{self.name}.pt"

    def build(self, spec: DatasetSpec) -> nn.Module:
        model = entry(self.dataset, self.threat, self.name)["model"]()
        path = self.weights_path
        if not path.is_file():
            raise BenchError(
                f"--model {self.reference}: no weights at {str(path)!r}, where RobustBench keeps them; "
                "put the downloaded .pt there, or point --robustbench-models at your models/ folder"
            )
        state = read_state(path, flag=self.reference)
        load_state(
            model,
            state,
            f"the weights at {str(path)!r}",
            "they must be RobustBench's file for this entry",
            constants_from_code=True,
        )
        return model.to("cpu").eval()

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        return None  # the zoo's architectures normalize inside themselves where they need to

    def digest(self, model: nn.Module) -> str:
        return weights_hash(model)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.dataset, "threat": self.threat, "name": self.name}

    def files(self) -> dict[str, Path]:
        return {}

    def paper(self) -> dict[str, float]:
        return reported(self.model_dir, self.dataset, self.threat, self.name)
