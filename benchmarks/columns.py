"""The strength of the white-box and transfer columns, per defense, from one or two stores.

    bench run --defense all --matrix full --results /tmp/after           # this code
    python benchmarks/columns.py --results /tmp/after
    python benchmarks/columns.py --results /tmp/after --before /tmp/before  # a store of older code

For each checkpoint of the dataset in `--results` it prints robust accuracy (percent of
the test set) under PGD-50 and PGD-1000 on the cross-entropy, Kannan et al.'s targeted
PGD-20, APGD-CE, APGD-T, multi-targeted PGD and AutoAttack, the lowest transfer cell, the
worst case, and the seconds each of the new white-box cells took against AutoAttack's
(their cost). With `--before`, a store filled by older code for the same recipes (the
same checkpoint keys), it adds that store's PGD-50, PGD-1000 and transfer figures, and the
masking flags each store raised, so what moved can be read off one table. The stores are
only read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.science.flags import MASKING
from bench.store.db import Store
from bench.store.evidence import worst_case
from bench.store.rows import CellRow


def _pgd(cells: list[CellRow], threat: str, steps: int, targeted: str = "none") -> CellRow | None:
    for c in cells:
        p = c.params
        if (
            c.attack == "pgd"
            and c.threat == threat
            and c.indices is None
            and p.get("steps") == steps
            and p.get("loss") == "xent"
            and p.get("restarts", 1) == 1
            and p.get("norm", "linf") == "linf"
            and p.get("targeted", "none") == targeted
            and "grad=forward" not in c.cell_key
        ):
            return c
    return None


def _one(cells: list[CellRow], threat: str, attack: str) -> CellRow | None:
    return next(
        (
            c
            for c in cells
            if c.attack == attack
            and c.threat == threat
            and c.indices is None
            and c.params.get("version", "standard") == "standard"
        ),
        None,
    )


def _lowest_transfer(transfers: list[CellRow], threat: str, target_id: int) -> float | None:
    """The lowest of the matrix's surrogate transfer cells (not a `bench transfer` grid's
    rows, whose diagonal is a white-box attack)."""
    accs = [
        t.robust_acc
        for t in transfers
        if t.target_id == target_id
        and t.threat == threat
        and t.source_id != target_id
        and (t.extra or {}).get("surrogate")
    ]
    return min(accs) if accs else None


def figures(store: Store, dataset: str) -> dict[str, dict]:
    """Per checkpoint key: its defense, columns (fractions or None), seconds and flags."""
    out = {}
    cks = store.checkpoints(dataset=dataset)
    ids = [c.id for c in cks]
    evaluations, transfers = store.evaluations(ids), store.transfers(ids)
    flags: dict[int, set[str]] = {}
    for f in store.flags(ids):
        flags.setdefault(f.checkpoint_id, set()).add(f.name)
    for ck in cks:
        cells = [e for e in evaluations if e.checkpoint_id == ck.id]
        incoming = [t for t in transfers if t.target_id == ck.id]
        if not cells:
            continue
        size = next((c.n for c in cells if c.indices is None), 0)
        wc = worst_case(ck.threat, [*cells, *incoming], size) if size else None
        picked = {
            "fgsm": _one(cells, ck.threat, "fgsm"),
            "pgd20": _pgd(cells, ck.threat, 20),
            "pgd50": _pgd(cells, ck.threat, 50),
            "pgd1000": _pgd(cells, ck.threat, 1000),
            "targeted": _pgd(cells, ck.threat, 20, "random"),
            "apgd": _one(cells, ck.threat, "apgd"),
            "apgd_t": _one(cells, ck.threat, "apgd_t"),
            "multitargeted": _one(cells, ck.threat, "multitargeted"),
            "autoattack": _one(cells, ck.threat, "autoattack"),
            "square": _one(cells, ck.threat, "square"),
        }
        l2 = next((c.threat for c in cells if c.threat.startswith("l2-")), None)
        l2_worst = worst_case(l2, [*cells, *incoming], size) if size and l2 else None
        out[ck.key] = {
            "defense": ck.defense,
            "clean": (ck.meta or {}).get("clean_acc"),
            **{k: (c.robust_acc if c else None) for k, c in picked.items()},
            "seconds": {k: c.seconds for k, c in picked.items() if c is not None},
            "transfer": _lowest_transfer(incoming, ck.threat, ck.id),
            "worst": wc.robust_acc if wc else None,
            "l2_worst": l2_worst.robust_acc if l2_worst else None,
            "masking": sorted(flags.get(ck.id, set()) & set(MASKING)),
        }
    return out


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="a store filled by this code's full matrix")
    ap.add_argument("--before", help="a store filled by older code for the same recipes")
    ap.add_argument("--dataset", default="digits")
    args = ap.parse_args()
    after = figures(Store.for_results(Path(args.results)), args.dataset)
    before = figures(Store.for_results(Path(args.before)), args.dataset) if args.before else {}
    cols = ["pgd50", "pgd1000", "targeted", "apgd", "apgd_t", "multitargeted", "autoattack"]
    head = [
        "defense",
        "clean",
        "FGSM",
        "PGD-20",
        "PGD-50",
        "PGD-1000",
        "targeted PGD-20",
        "APGD-CE",
        "APGD-T",
        "multi-targeted",
        "AutoAttack",
        "Square",
        "transfer",
        "worst case",
        "L2 worst case",
    ]
    if before:
        head = [
            "defense",
            "clean",
            "PGD-50 before",
            "PGD-50",
            "PGD-1000 before",
            "PGD-1000",
            *head[6:11],
            "transfer before",
            "transfer",
            "worst case",
        ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, f in sorted(after.items(), key=lambda kv: kv[1]["defense"]):
        b = before.get(key, {})
        if before:
            row = [
                f["defense"],
                pct(f["clean"]),
                pct(b.get("pgd50")),
                pct(f["pgd50"]),
                pct(b.get("pgd1000")),
                pct(f["pgd1000"]),
                *(pct(f[c]) for c in cols[2:]),
                pct(b.get("transfer")),
                pct(f["transfer"]),
                pct(f["worst"]),
            ]
        else:
            row = [
                f["defense"],
                pct(f["clean"]),
                pct(f["fgsm"]),
                pct(f["pgd20"]),
                *(pct(f[c]) for c in cols),
                pct(f["square"]),
                pct(f["transfer"]),
                f"**{pct(f['worst'])}**",
                pct(f["l2_worst"]),
            ]
        print("| " + " | ".join(row) + " |")
    print("\nseconds per cell (the new white-box cells against AutoAttack's):")
    print("| defense | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for f in sorted(after.values(), key=lambda f: f["defense"]):
        print(
            f"| {f['defense']} | "
            + " | ".join("–" if c not in f["seconds"] else f"{f['seconds'][c]:.1f}" for c in cols)
            + " |"
        )
    if before:
        print("\nmasking flags, before -> after:")
        for key, f in sorted(after.items(), key=lambda kv: kv[1]["defense"]):
            was = before.get(key, {}).get("masking", [])
            if was != f["masking"]:
                print(f"- {f['defense']}: {', '.join(was) or 'none'} -> {', '.join(f['masking']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
