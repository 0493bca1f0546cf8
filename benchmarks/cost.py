"""What the full matrix costs in model passes, against AutoAttack and the fast cascade, and
what it would cost on an H100 at CIFAR-10 and ImageNet scale.

    bench run --defense all --matrix full --results /tmp/res      # the matrix (minutes on a CPU)
    bench run --defense all --matrix fast --results /tmp/res      # optional: the cascade beside it
    python benchmarks/cost.py --results /tmp/res
    python benchmarks/cost.py --results /tmp/res --no-projection  # the store's tables alone

Every stored cell records the model's forward and backward passes per image of the
images it ran on (bench.engine.passes); a transfer records its craft's passes on its
source. A cell's cost per test image is that times its images over the test set (a
subset or cascade cell in proportion), as the worst case sums them (bench.store.evidence).

1. Per cell of the full matrix (every stored row not of the cascade: its cells, the
   adaptive and witness cells the run added, the transfers onto the checkpoint) and per
   checkpoint: forward / backward passes per test image; the matrix's total; AutoAttack's
   cell (the standard version, on the checkpoint's own threat model) alone; their ratio.
2. Where the store holds the cascade (cells whose key contains `,cascade=<--matrix>`, or
   `--fast-suffix`), per checkpoint: AutoAttack's robust accuracy and passes, the
   cascade's worst case (the AND of its cells) and passes, their ratio, and whether the
   cascade escalated to the full matrix: "yes" with the flags the checkpoint's meta
   `escalated` records (the run writes it when masking flags call for escalation), "no"
   where neither the marker nor a masking flag is stored, "unknown" where a masking flag
   is stored but no marker.
3. GPU hours of each schedule on one H100 for CIFAR-10 ResNet-18 and WideResNet-28-10
   (10,000 test images) and ImageNet ResNet-50 (5,000): FLOPs per forward and per
   backward pass counted by FlopCounterMode on the CPU, times the passes per image
   measured here, over the bf16 peak measured on the H100 times the fraction of it PGD
   reached there (docs/results.md, "Performance"). The assumptions are printed.

The store is only read.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from bench.core.data import get_spec
from bench.core.matrix import load_matrix
from bench.core.models import build_model
from bench.perf.gpu import DATASHEET_BF16_TFLOPS, flops_per_image
from bench.reporting.site.names import cell_label
from bench.science.flags import MASKING
from bench.store.db import Store
from bench.store.evidence import Evidence, WorstCase, load_evidence, worst_case
from bench.store.meta import CheckpointMeta
from bench.store.rows import CellRow

MEASURED_PEAK_TFLOPS = 788.0
"""The bf16 rate of a large matrix product measured on the H100 (docs/results.md,
"Performance"); the fractions below are of this figure, as `bench perf` reports them."""

DASH = "–"
CASCADE_KEY = ",cascade="
"""What every cascade cell's key contains (bench.core.matrix.Matrix.cells): its images are
those the earlier cells left standing, a share of the test set, not a fixed subset."""


@dataclass(frozen=True)
class CheckpointCost:
    """One checkpoint's cells split by schedule, with what the tables read off them."""

    defense: str
    key: str
    threat: str
    test_size: int
    full: tuple[CellRow, ...]
    """Every stored row not of the cascade: own cells, then the transfers onto it."""
    fast: tuple[CellRow, ...]
    autoattack: CellRow | None
    fast_worst: WorstCase | None
    escalated: str
    """"yes: <flags>", "no", "unknown" (see the module's docstring), or a dash without the cascade."""


def per_test_image(row: CellRow, test_size: int) -> tuple[float, float] | None:
    """A cell's (forward, backward) passes per test image: per image of its images, in
    proportion to them; None where the row was stored before passes were counted."""
    if row.forward_passes is None or row.backward_passes is None:
        return None
    share = row.n / test_size
    return row.forward_passes * share, row.backward_passes * share


def total(rows: tuple[CellRow, ...], test_size: int) -> tuple[float, float] | None:
    """The rows' passes per test image together; None if any row was not counted."""
    costs = [per_test_image(r, test_size) for r in rows]
    if not costs or any(c is None for c in costs):
        return None
    return sum(c[0] for c in costs), sum(c[1] for c in costs)


def is_autoattack(row: CellRow, threat: str) -> bool:
    """AutoAttack's standard version on the whole test set in the checkpoint's own threat
    model: the cell a paper reports."""
    return (
        row.source_id is None
        and row.attack == "autoattack"
        and row.threat == threat
        and row.indices is None
        and row.params.get("version", "standard") == "standard"
    )


def escalation(ev: Evidence, fast: tuple[CellRow, ...], masking: bool) -> str:
    """Whether the cascade escalated to the full matrix: the run records why in the meta
    (`escalated`) when the checkpoint's masking flags call for it, and only then."""
    reason = CheckpointMeta.of(ev.checkpoint).escalated
    if reason:
        return f"yes: {reason}"
    if not fast:
        return DASH
    # Without masking flags the cascade had no cause to escalate; with them and no
    # marker, the store does not say what happened.
    return "unknown" if masking else "no"


def checkpoint_costs(
    store: Store, dataset: str, fast_marker: str, fast_keys: set[str] | None = None
) -> list[CheckpointCost]:
    """Each checkpoint's cells split by schedule. `fast_keys`, where given, are the cascade's
    cell keys today: rows of an earlier version of the matrix (same marker, other
    settings) are then left out of both sides."""
    out = []
    cks = store.checkpoints(dataset=dataset)
    masked = {f.checkpoint_id for f in store.flags([c.id for c in cks]) if f.name in MASKING}
    for ev in load_evidence(store, cks).values():
        if not ev.test_size:
            continue
        rows = ev.rows()
        fast = tuple(r for r in rows if fast_marker in r.cell_key and (fast_keys is None or r.cell_key in fast_keys))
        full = tuple(r for r in rows if fast_marker not in r.cell_key)
        aa = next((r for r in full if is_autoattack(r, ev.threat)), None)
        out.append(
            CheckpointCost(
                defense=ev.checkpoint.defense,
                key=ev.checkpoint.key,
                threat=ev.threat,
                test_size=ev.test_size,
                full=full,
                fast=fast,
                autoattack=aa,
                fast_worst=worst_case(ev.threat, fast, ev.test_size) if fast else None,
                escalated=escalation(ev, fast, ev.checkpoint.id in masked),
            )
        )
    return sorted(out, key=lambda c: c.defense)


def passes(cost: tuple[float, float] | None) -> str:
    """forward / backward passes per test image."""
    return DASH if cost is None else f"{cost[0]:,.1f} / {cost[1]:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return DASH if a is None or b is None or b == 0 else f"{a / b:,.1f}x"


def pct(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:.1f}"


def row_name(row: CellRow, defense_of: dict[int, str]) -> str:
    """The row's label and key, a transfer's prefixed by its source's defense."""
    name = f"{cell_label(row.attack, row.params)} `{row.cell_key}`"
    if row.source_id is not None:
        return f"transfer from {defense_of.get(row.source_id, '?')}: {name}"
    return name


def print_full(costs: list[CheckpointCost], defense_of: dict[int, str]) -> None:
    print("## The full matrix: forward / backward passes per test image\n")
    print("A subset cell counts in proportion to its images; a transfer counts its craft's passes")
    print("on the source, which crafted once serves every target (counted here once per target).\n")
    names: dict[tuple[int | None, str], str] = {}
    for c in costs:
        for r in c.full:
            names.setdefault((r.source_id and defense_of.get(r.source_id), r.cell_key), row_name(r, defense_of))
    print("| cell | " + " | ".join(c.defense for c in costs) + " |")
    print("|---|" + "---|" * len(costs))
    by_cell = [{(r.source_id and defense_of.get(r.source_id), r.cell_key): r for r in c.full} for c in costs]
    for ident, name in sorted(names.items(), key=lambda kv: kv[1]):
        cells = [
            passes(per_test_image(m[ident], c.test_size)) if ident in m else DASH
            for m, c in zip(by_cell, costs, strict=True)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    totals = [total(c.full, c.test_size) for c in costs]
    autoattacks = [per_test_image(c.autoattack, c.test_size) if c.autoattack else None for c in costs]
    print("| **full matrix, total** | " + " | ".join(f"**{passes(t)}**" for t in totals) + " |")
    print("| **AutoAttack alone** | " + " | ".join(f"**{passes(a)}**" for a in autoattacks) + " |")
    print(
        "| **full / AutoAttack, forward** | "
        + " | ".join(f"**{ratio(t and t[0], a and a[0])}**" for t, a in zip(totals, autoattacks, strict=True))
        + " |"
    )
    print(
        "| full / AutoAttack, backward | "
        + " | ".join(ratio(t and t[1], a and a[1]) for t, a in zip(totals, autoattacks, strict=True))
        + " |"
    )


def print_fast(costs: list[CheckpointCost], marker: str) -> None:
    print(f"\n## The cascade (cells keyed `{marker}`) against AutoAttack\n")
    with_fast = [c for c in costs if c.fast]
    if not with_fast:
        print("no fast rows")
        return
    head = [
        "defense",
        "AutoAttack robust %",
        "AutoAttack fwd/img",
        "cascade worst case %",
        "cascade fwd/img",
        "AutoAttack / cascade, fwd",
        "cascade cells",
        "escalated",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in with_fast:
        aa = per_test_image(c.autoattack, c.test_size) if c.autoattack else None
        fast = total(c.fast, c.test_size)
        row = [
            c.defense,
            pct(c.autoattack.robust_acc if c.autoattack else None),
            DASH if aa is None else f"{aa[0]:,.1f}",
            pct(c.fast_worst.robust_acc if c.fast_worst else None),
            DASH if fast is None else f"{fast[0]:,.1f}",
            ratio(aa and aa[0], fast and fast[0]),
            str(len(c.fast)),
            c.escalated,
        ]
        print("| " + " | ".join(row) + " |")
    print("\nThe cascade's passes are its own cells'; where it escalated, the full matrix's come on top.")


@dataclass(frozen=True)
class Target:
    """A model and test set to project onto."""

    name: str
    build: Callable[[], torch.nn.Module]
    shape: tuple[int, int, int]
    images: int
    fraction: float
    """The fraction of the measured peak the H100 reached on PGD for this model."""
    fraction_source: str
    published: str
    """The published forward cost, to check the count against."""


def targets() -> list[Target]:
    cifar = get_spec("cifar10")
    return [
        Target(
            "CIFAR-10 ResNet-18",
            # The bench's CIFAR ResNet-18 (3x3 stem, no max pooling): the model the H100
            # figure was measured on. torchvision's resnet18 downsamples a 32x32 input
            # 4x in its stem and would count a sixteenth of the work.
            lambda: build_model("resnet18", cifar),
            (3, 32, 32),
            10_000,
            0.24,
            "measured: PGD-20 on 10,000 images in 2.40 s eager, 24% of 788 TFLOP/s",
            "2.22 GFLOP per PGD step in docs/results.md (~0.56 GMAC forward)",
        ),
        Target(
            "CIFAR-10 WideResNet-28-10",
            lambda: build_model("wrn28_10", cifar),
            (3, 32, 32),
            10_000,
            0.35,
            "measured: PGD-20 on 10,000 images in 15.4 s, 35% of 788 TFLOP/s",
            "5.25 G multiply-adds forward, 36.5M parameters (Zagoruyko & Komodakis)",
        ),
        Target(
            "ImageNet ResNet-50",
            lambda: torchvision.models.resnet50(weights=None),
            (3, 224, 224),
            5_000,
            0.24,
            "assumed: not measured; ResNet-18's 24% (larger convolutions are likely to do better)",
            "4.1 G multiply-adds forward, 25.6M parameters (He et al.)",
        ),
    ]


def model_flops(target: Target) -> tuple[float, float, int]:
    """(FLOPs per forward pass, FLOPs per backward pass to the input, parameters) per image:
    FlopCounterMode counts a multiply-add as 2 FLOPs; the backward pass is one PGD step's
    count less its forward (the weights frozen, as in an attack)."""
    torch.manual_seed(0)
    model = target.build().eval()
    flops = flops_per_image(model, target.shape, "cpu")
    params = sum(p.numel() for p in model.parameters())
    return flops["forward"], flops["pgd_step"] - flops["forward"], params


def scales_with_pixels(row: CellRow) -> bool:
    """A cell whose queries per step grow with the input (SPSA's `samples_per_dim`)."""
    return (row.params.get("samples_per_dim") or 0) > 0


def projected(rows: tuple[CellRow, ...], test_size: int, source_dim: int, target: Target) -> tuple[float, float]:
    """The rows' passes per test image on the target: a whole-set or cascade cell keeps its
    share of the test set, a fixed subset keeps its image count (min of it and the target's
    set), and a cell whose queries grow with the input (`samples_per_dim`, SPSA) scales
    with the target's pixels over the source's."""
    target_dim = math.prod(target.shape)
    forward = backward = 0.0
    for r in rows:
        per_image = per_test_image(r, test_size)
        if per_image is None:
            raise ValueError(f"{r.cell_key}: stored before passes were counted")
        share = r.n / test_size
        if r.indices is not None and CASCADE_KEY not in r.cell_key:
            share = min(r.n, target.images) / target.images
        scale = target_dim / source_dim if scales_with_pixels(r) else 1.0
        forward += (r.forward_passes or 0.0) * share * scale
        backward += (r.backward_passes or 0.0) * share * scale
    return forward, backward


def duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{60 * hours:.1f} min"


def gpu_hours(passes_per_image: tuple[float, float], flops: tuple[float, float], target: Target) -> float:
    work = target.images * (passes_per_image[0] * flops[0] + passes_per_image[1] * flops[1])
    return work / (MEASURED_PEAK_TFLOPS * 1e12 * target.fraction) / 3600


def print_projection(costs: list[CheckpointCost], dataset: str) -> None:
    source_dim = math.prod(get_spec(dataset).shape)
    print("\n## Projected H100 hours\n")
    print("Assumptions:")
    print(
        f"- peak: {MEASURED_PEAK_TFLOPS:g} TFLOP/s bf16 measured on the H100 (datasheet {DATASHEET_BF16_TFLOPS['H100']:g});"
    )
    print("  a model's rate is that times the fraction PGD reached on it (docs/results.md, Performance).")
    print(f"- passes per image: measured here on {dataset} ({source_dim} pixels), per checkpoint; the")
    print("  median and the largest over the checkpoints are projected. The share of images each")
    print("  stage still attacks (early stop, the cascade, AutoAttack's later attacks) is taken as on")
    print(f"  {dataset}; SPSA's samples scale with the pixels; a fixed subset keeps its image count.")
    print("- a transfer's craft is counted as if the surrogate had the target's architecture, once per target.")
    print("- every pass runs at PGD's rate: AutoAttack's FAB and Square and small late batches run")
    print("  slower, so the hours are a floor. Training is not counted.")
    # Per schedule: each checkpoint's rows of it, with its test-set size, where every row
    # was counted.
    candidates = {
        "full": [(c.full, c.test_size) for c in costs],
        "AutoAttack": [((c.autoattack,), c.test_size) for c in costs if c.autoattack is not None],
        "fast (cascade, without escalation)": [(c.fast, c.test_size) for c in costs if c.fast],
    }
    schedules = {
        name: counted
        for name, groups in candidates.items()
        if (counted := [(rows, size) for rows, size in groups if total(rows, size) is not None])
    }
    if not schedules:
        print("\nno checkpoint with counted passes: nothing to project")
        return
    print("\n| model | params | forward GFLOP/img (counted) | published | backward GFLOP/img | fraction of peak |")
    print("|---|---|---|---|---|---|")
    flops = {}
    for t in targets():
        fwd, bwd, params = model_flops(t)
        flops[t.name] = (fwd, bwd)
        print(
            f"| {t.name} ({t.shape[1]}x{t.shape[2]}) | {params / 1e6:.1f}M | {fwd / 1e9:.2f} "
            f"({fwd / 2e9:.2f} G multiply-adds) | {t.published} | {bwd / 1e9:.2f} | "
            f"{100 * t.fraction:.0f}% ({t.fraction_source}) |"
        )
    print(
        "\n| model | images | schedule | fwd / bwd passes per image (median) | H100 time (median) "
        "| H100 time (largest) | of which SPSA (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in targets():
        for name, groups in schedules.items():
            per_ck = [projected(rows, size, source_dim, t) for rows, size in groups]
            hours = [gpu_hours(p, flops[t.name], t) for p in per_ck]
            # The cells whose queries grow with the pixels, alone: at ImageNet's size they
            # are most of the matrix.
            grown = [
                gpu_hours(
                    projected(tuple(r for r in rows if scales_with_pixels(r)), size, source_dim, t), flops[t.name], t
                )
                for rows, size in groups
            ]
            mid = (statistics.median(p[0] for p in per_ck), statistics.median(p[1] for p in per_ck))
            print(
                f"| {t.name} | {t.images:,} | {name} | {mid[0]:,.0f} / {mid[1]:,.0f} | "
                f"{duration(statistics.median(hours))} | {duration(max(hours))} | {duration(statistics.median(grown))} |"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="a store filled by `bench run --defense all --matrix full`")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--matrix", default="fast", help="the cascade matrix whose rows are read beside the full ones")
    ap.add_argument(
        "--fast-suffix", help="what the cascade's cell keys contain (default `,cascade=<the matrix's name>`)"
    )
    ap.add_argument("--no-projection", action="store_true", help="skip the FLOP counts and GPU hours")
    args = ap.parse_args()
    torch.set_num_threads(1)
    matrix = load_matrix(args.matrix)
    marker = args.fast_suffix or f",cascade={matrix.name}"  # a TOML file's cells carry its name, not its path
    store = Store.for_results(Path(args.results))
    # The cascade's cells as the matrix has them today, where --matrix names one (a store
    # may hold an earlier version's under the same marker); with --fast-suffix, every row
    # that carries it.
    keys = None if args.fast_suffix else {c.key for c in matrix.cells(get_spec(args.dataset).threat)}
    costs = checkpoint_costs(store, args.dataset, marker, keys)
    if not costs:
        print(f"no {args.dataset} checkpoint with stored cells in {args.results}")
        return 1
    defense_of = {c.id: c.defense for c in store.checkpoints()}
    print_full(costs, defense_of)
    print_fast(costs, marker)
    if not args.no_projection:
        print_projection(costs, args.dataset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
