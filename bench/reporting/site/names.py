"""What the site calls things and where it puts them: cell labels, anchors, page paths."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from bench.store.db import Checkpoint


def cell_label(attack: str, params: dict) -> str:
    """The column label of a cell within its threat model: pgd20, cw200, pgd20_r10, fgsm, spsa.

    PGD is named by its loss and steps (cross-entropy `pgd`, CW margin `cw`), with `_rN`
    for N restarts; every other attack is named by itself.
    """
    if attack != "pgd":
        return attack
    base = "cw" if params.get("loss") == "cw" else "pgd"
    restarts = params.get("restarts", 1)
    return f"{base}{params.get('steps')}" + (f"_r{restarts}" if restarts and restarts > 1 else "")


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
