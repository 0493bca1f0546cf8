"""How the checkpoint page shows the records a run leaves in a checkpoint's meta: an
outside model's factory, the admission checks, and the numbers of a flag.

Nothing shown names the machine that ran the bench: a .py factory and a weights file
show by their file names (bench.reporting.site.names.factory_name), never the folders
they lay in.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from bench.reporting.format import MISSING, missing, num, percent
from bench.reporting.site.names import (
    breakable,
    checkpoint_name,
    factory_name,
    file_name,
    outside_name,
)
from bench.store.db import Checkpoint

FRACTIONS = {"pgd20", "longest", "single", "fgsm", "best_pgd", "spsa", "pgd_same_images", "transfer"}
"""Flag numbers (bench.science.flags) that are accuracies without saying so in their names;
a key holding `acc`, `share` or `drop` is a fraction of samples too. Every other number
(steps, counts, eps, losses, output values) is shown as it is."""


def portable_outside(info: dict | None) -> dict:
    """meta["outside"] with its factory and weights file by name only: the absolute paths
    the run recorded name a user's folders, and the weights sha256 identifies the model."""
    out = dict(info or {})
    if out.get("factory"):
        out["factory"] = factory_name(out["factory"])
    if out.get("weights_file"):
        out["weights_file"] = file_name(out["weights_file"])
    source = dict(out.get("source") or {})
    kind = source.get("kind") or "factory"
    if out.get("reference") and kind == "onnx":
        out["reference"] = file_name(out["reference"])  # an ONNX file's path names a user's folder
    if out.get("reference") and kind == "factory":
        out["reference"] = factory_name(out["reference"])
    if source.get("factory"):
        source["factory"] = factory_name(source["factory"])
    if source:
        out["source"] = source
    return out


def outside_line(info: dict | None) -> dict | None:
    """The checkpoint page's line on an outside model: its factory and weights file by name,
    the weights sha256 that identifies it, and the name of the kept copy of the factory's
    source. The source itself is not hashed: the store records no hash of it, and the site
    reads the store alone."""
    if not isinstance(info, dict):
        return None
    out = portable_outside(info)
    normalize = out.get("normalize") or {}
    return {
        "factory": outside_name(info),
        "normalize": f"mean {normalize['mean']}, std {normalize['std']} ({normalize.get('origin', '')})"
        if normalize
        else "",
        "weights_sha256": out.get("weights_sha256") or "",
        "weights_file": out.get("weights_file") or "",
        "source_copy": file_name(out["source_copy"]) if out.get("source_copy") else "",
    }


def portable(key: str, value: Any) -> Any:
    """A config or meta value with any outside-model record made portable."""
    return portable_outside(value) if key == "outside" and isinstance(value, dict) else value


def _is_fraction(key: str) -> bool:
    return key in FRACTIONS or any(part in key for part in ("acc", "share", "drop"))


def flag_number(key: str, value: Any, by_id: dict[int, Checkpoint], overrides: dict[int, str]) -> Any:
    """One number of a flag as text: fractions of samples in percent, counts as counts,
    cell keys breakable at commas, a source checkpoint by its name."""
    if key == "cells" and isinstance(value, list):
        return Markup("<br>").join(Markup('<code class="key">{}</code>').format(breakable(str(k))) for k in value)
    if key == "source_id" and value in by_id:
        return f"{checkpoint_name(by_id[value], overrides)} [{by_id[value].key[:8]}]"
    if key == "sweep" and isinstance(value, dict):  # eps -> accuracy of the unbounded sweep
        return ", ".join(f"eps {k}: {percent(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(num(v) for v in value)
    if _is_fraction(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return percent(value)
    return num(value)


def _n(value: Any) -> str:
    return MISSING if missing(value) or value is None else num(value)


def _of(count: Any, total: Any) -> str:
    """`7 of 360 (1.94%)`."""
    if not isinstance(count, (int, float)) or not isinstance(total, (int, float)) or not total:
        return _n(count)
    return f"{num(count)} of {num(total)} ({percent(count / total)})"


def admission_rows(admission: dict | None) -> list[tuple[str, str]]:
    """The admission checks (bench.science.admission) as a small key/value table; a
    part the record lacks is left out, and a record of another shape shows its keys."""
    a = admission if isinstance(admission, dict) else {}

    def part(name: str) -> dict:
        v = a.get(name)
        return v if isinstance(v, dict) else {}

    rows = []
    if "n" in a:
        rows.append(("test images checked", _n(a["n"])))
    if p := part("probabilities"):
        rows += [
            ("lowest output", _n(p.get("min"))),
            ("highest output", _n(p.get("max"))),
            ("largest row-sum error |Σ − 1|", _n(p.get("max_row_sum_error"))),
        ]
    if r := part("randomized"):
        rows += [
            ("forward passes compared", _n(r.get("passes"))),
            ("largest output difference between passes", _n(r.get("max_output_diff"))),
        ]
        if "max_relative_diff" in r:
            rows.append(("largest difference relative to the output's norm", _n(r["max_relative_diff"])))
        rows.append(("share of predictions changed between passes", percent(r.get("share_prediction_changed"))))
    if "autograd_calls" in a:
        rows.append(("autograd calls in one forward pass", _n(a["autograd_calls"])))
    if z := part("zero_gradient"):
        rows.append(("samples with a zero input gradient", _of(z.get("count"), z.get("n"))))
    if "noise_flips" in a:
        f = part("noise_flips")
        rows.append(
            (
                "correct predictions flipped by tiny noise",
                f"{_of(f.get('flipped'), f.get('correct'))} at amplitude {_n(f.get('amplitude'))}"
                if f
                else "not measured: the forward passes vary",
            )
        )
    if t := part("loss_rising"):
        rows += [
            (
                "traced PGD",
                (f"{_n(t.get('steps'))} steps on {_n(t.get('n'))} images, last {_n(t.get('tail'))} steps compared"),
            ),
            ("mean loss before the last steps", _n(t.get("loss_before_tail"))),
            ("mean loss at the last step", _n(t.get("loss_last"))),
        ]
    if c := part("config"):
        rows.append(("settings", ", ".join(f"{k}={num(v)}" for k, v in c.items())))
    known = {
        "schema",
        "n",
        "probabilities",
        "randomized",
        "autograd_calls",
        "zero_gradient",
        "noise_flips",
        "loss_rising",
        "config",
    }
    rows += [(k, num(v)) for k, v in a.items() if k not in known]
    return rows
