"""attacks.html: what every attack, parameter and stored cell key means."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections import defaultdict

from bench.core.cells import Cell
from bench.registry import ATTACKS, field_docs
from bench.reporting.format import num
from bench.reporting.site.load import SiteData, cell_order
from bench.reporting.site.names import breakable, cell_anchor, cell_label


def _parse_key(cell_key: str) -> tuple[str, list[tuple[str, str]]]:
    name, _, rest = cell_key.partition(":")
    return name, [tuple(p.partition("=")[::2]) for p in rest.split(",") if p]


def attacks(data: SiteData) -> list[dict]:
    """Every registered or stored attack: its docstrings, its parameters, its stored cells.

    A cell's meaning is its parameters, so each attack's stored cells form one table with
    a column per parameter of the key, under the table that explains the parameters.
    """
    stored: dict[str, dict[str, dict]] = defaultdict(dict)
    for attacked, group in [*data.cells.items(), *data.incoming.items()]:
        for e in group:
            entry = stored[e.attack].setdefault(e.cell_key, {"cell": e, "checkpoints": set()})
            entry["checkpoints"].add(attacked)
    out = []
    for name in sorted(set(ATTACKS.names()) | set(stored)):
        entry = ATTACKS.get(name) if name in ATTACKS else None
        docs = field_docs(entry.config) if entry else {}
        module = sys.modules.get(entry.fn.__module__) if entry else None
        fields = []
        if entry:
            for f in dataclasses.fields(entry.config):
                default = (
                    f.default
                    if f.default is not dataclasses.MISSING
                    else ("(computed)" if f.default_factory is not dataclasses.MISSING else "(required)")
                )
                fields.append(
                    {
                        "name": f.name,
                        "type": str(f.type),
                        "default": "unset" if default is None else num(default),
                        "doc": _runs(" ".join(docs.get(f.name, "").split())),
                        "in_key": f.metadata.get("key", True),
                    }
                )
        cells = sorted(stored[name].values(), key=lambda info: cell_order(info["cell"]))
        parsed = [dict(_parse_key(info["cell"].cell_key)[1]) for info in cells]
        columns = list(dict.fromkeys([*(f["name"] for f in fields if f["in_key"]), *(k for p in parsed for k in p)]))
        columns = [c for c in columns if any(c in p for p in parsed)]
        if any("subset" in p for p in parsed) and not any(f["name"] == "subset" for f in fields):
            fields.append(
                {
                    "name": "subset",
                    "type": "int",
                    "default": "0",
                    "in_key": True,
                    "doc": _runs(field_docs(Cell).get("subset", "") + " Set by the matrix, for any attack."),
                }
            )
        out.append(
            {
                "name": name,
                "registered": entry is not None,
                "module_doc": _prose(module.__doc__ if module and module.__doc__ else ""),
                "doc": _prose(entry.doc) if entry else [],
                "fields": fields,
                "columns": columns,
                "cells": [
                    {
                        "key": breakable(info["cell"].cell_key),
                        "anchor": cell_anchor(info["cell"].cell_key),
                        "label": cell_label(name, info["cell"].params),
                        "threat": info["cell"].threat,
                        "n": info["cell"].n,
                        "checkpoints": len(info["checkpoints"]),
                        "params": [p.get(c, "") for c in columns],
                    }
                    for info, p in zip(cells, parsed, strict=True)
                ],
            }
        )
    return out


def _prose(text: str) -> list[list[tuple[bool, str]]]:
    """A docstring as paragraphs of (is_code, text) runs; `backticks` become code.

    Source line breaks are dropped (the page reflows the text), except before a bullet.
    """
    return [
        _runs(re.sub(r"\n(?!\s*[-*] )\s*", " ", para))
        for para in re.split(r"\n\s*\n", inspect.cleandoc(text or ""))
        if para.strip()
    ]


def _runs(text: str) -> list[tuple[bool, str]]:
    parts = re.split(r"`([^`]*)`", text)
    return [(i % 2 == 1, p) for i, p in enumerate(parts) if p]
