"""What the site calls things and where it puts them: cell labels, anchors, page paths."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from markupsafe import Markup, escape

from bench.core.data import DATASETS
from bench.store.db import Checkpoint

SURROGATE_TEXT = (
    "trained once per dataset as a source for the full matrix's black-box transfer cells: "
    "every other checkpoint is attacked with adversarial examples crafted on it"
)
"""Why a checkpoint marked `meta["surrogate"]` (set by the run layer) is on the boards."""


def cell_label(attack: str, params: dict) -> str:
    """The column label of a cell within its threat model: pgd20, cw200, pgd20_r10, fgsm, spsa.

    PGD is named by its loss and steps (cross-entropy `pgd`, CW margin `cw`), with `_cos`
    for the cosine step schedule, `_tgt` toward random targets, `_last` for the final
    iterate (a transfer's) and `_rN` for N restarts; every other attack is named by itself.
    """
    if attack != "pgd":
        return attack
    base = "cw" if params.get("loss") == "cw" else "pgd"
    restarts = params.get("restarts", 1)
    return (
        f"{base}{params.get('steps')}"
        + ("_cos" if params.get("schedule") == "cosine" else "")
        + ("_tgt" if params.get("targeted") == "random" else "")
        + ("_last" if params.get("keep") == "last" else "")
        + (f"_r{restarts}" if restarts and restarts > 1 else "")
    )


def many_classes(dataset: str) -> bool:
    """More than ten classes: the board and the checkpoint page show the worst case's top-5
    beside its top-1 (Kannan et al.'s ImageNet tables)."""
    spec = DATASETS.get(dataset)
    return spec is not None and spec.num_classes > 10


def cell_anchor(cell_key: str) -> str:
    """The id of a cell key's entry on attacks.html (keys hold ':', '=' and ',')."""
    return "cell-" + hashlib.sha1(cell_key.encode()).hexdigest()[:12]


_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def page_path(ck: Checkpoint) -> str:
    """The checkpoint page's path under the site root, named by its key if that is a safe name."""
    return f"ck/{ck.key}.html" if _SAFE.match(ck.key) else f"ck/id-{ck.id}.html"


def compare_path(dataset: str) -> str:
    """The comparison page of a dataset's checkpoints, under the site root."""
    return f"compare-{dataset}.html"


def checkpoint_name(ck: Checkpoint, overrides: Mapping[int, str] | None = None) -> str:
    """A checkpoint as people call it: `defense (preset)`, plus `[settings]` when `overrides`
    (bench.reporting.site.load.override_labels) has to tell it apart from its siblings."""
    name = f"{ck.defense} ({ck.preset})" if ck.preset else ck.defense
    extra = overrides.get(ck.id) if overrides is not None else None
    return f"{name} [{extra}]" if extra else name


def breakable(key: str) -> Markup:
    """A cell key that may wrap after its commas and nowhere else: escaped, then `<wbr>`
    after each comma (the CSS keeps `code.key` from breaking inside a part)."""
    return Markup(str(escape(key)).replace(",", ",<wbr>"))  # no escape holds a comma


def file_name(path: str) -> str:
    """The last part of a path, either separator: a file's name says nothing of the
    machine it lay on, its folder does."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path


def factory_name(reference: str | None) -> str:
    """An outside model's factory as the site shows it: a .py factory by its file's name
    (`my_models.py:build`, not the folder it was in on the machine that ran it); a
    module name (`my_package.models:build`) as it is; "" for none."""
    if not reference:
        return ""
    module, sep, function = reference.rpartition(":")
    return f"{file_name(module)}:{function}" if sep and module.endswith(".py") else reference


def outside_name(info: Mapping | None) -> str:
    """What an outside model was given as (meta["outside"]), as the site shows it: a
    factory by factory_name, an ONNX file by its file's name, a library or zoo reference
    (`timm:resnet18`, `robustbench:cifar10/Linf/...`) as it is; "" for none."""
    if not info:
        return ""
    source = info.get("source") or {}
    if source.get("kind") == "onnx":
        return file_name(source.get("file_name") or info.get("reference") or "")
    if source.get("kind") in ("hub", "robustbench"):
        return str(info.get("reference") or "")
    return factory_name(info.get("factory"))


def checkpoint_folder(ck: Checkpoint) -> str:
    """A checkpoint's folder relative to its results folder, `checkpoints/<dataset>/<defense>/<key>`
    as bench.store.checkpoints lays it out; a folder laid out otherwise shows as `…/<its name>`.
    Never the absolute path, which names the machine and user that ran it."""
    parts = [p for p in re.split(r"[\\/]", ck.path or "") if p]
    if parts[-4:] == ["checkpoints", ck.dataset, ck.defense, ck.key]:
        return "/".join(parts[-4:])
    return f"…/{parts[-1]}" if parts else ""
