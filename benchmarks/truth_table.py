"""The truth table: per checkpoint, the exact robust accuracy (or its bracket) against what
the attacks alone found, from a store a `truth` matrix ran on.

    bench run --defense all --arch digits_mlp --matrix truth --results DIR
    python benchmarks/truth_table.py --results DIR

Prints one Markdown row per checkpoint of the architecture: clean accuracy, the
CROWN-certified floor, the exact robust accuracy where the verifier decided every image
(else the bracket: the floor and the worst case, the verifier's counterexamples in it,
and the count unknown), the attacks' worst case without
the verifier's counterexamples, the images the attacks missed, the verifier's per-image
seconds (median, p90, max) and the median number of unstable ReLUs, then the totals.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from bench.store.bracket import bracket
from bench.store.db import Store
from bench.store.evidence import test_size_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--arch", default="digits_mlp")
    args = parser.parse_args()
    store = Store.for_results(args.results)
    cells = defaultdict(list)
    for e in store.evaluations():
        cells[e.checkpoint_id].append(e)
    transfers = defaultdict(list)
    for t in store.transfers():
        transfers[t.target_id].append(t)
    print(
        "| defense | clean | certified (CROWN) | exact | attacks' worst case | attacks missed | verify s: median / p90 / max | unstable ReLUs (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    total_seconds, decided, images = 0.0, 0, 0
    for ck in sorted(store.checkpoints(), key=lambda c: c.defense):
        if ck.arch != args.arch:
            continue
        own = cells[ck.id]
        size = test_size_of(own)
        b = bracket(ck.threat, tuple(own), tuple(transfers[ck.id]), size) if size else None
        verify = next((e for e in own if e.attack == "verify"), None)
        certify = next((e for e in own if e.attack == "certify"), None)
        if not b or verify is None:
            print(f"| {ck.defense} | no verifier cell stored |", file=sys.stderr)
            continue
        v = verify.extra["verify"]
        exact = (
            f"{100 * b.exact:.2f}"
            if b.exact is not None
            else f"[{100 * b.certified:.2f}, {100 * b.certified + b.gap:.2f}] ({b.unknown} unknown)"
        )
        print(
            f"| {ck.defense} | {100 * ck.meta['clean_acc']:.2f} | {100 * certify.robust_acc:.2f} | {exact} | "
            f"{100 * b.attacks_only:.2f} | {b.attacks_missed} | {v['seconds']['median']:.3f} / "
            f"{v['seconds']['p90']:.2f} / {v['seconds']['max']:.2f} | {v['unstable']['median']:.0f} |"
        )
        total_seconds += verify.seconds
        decided += v["n"] - v["unknown"]
        images += v["n"]
    print(
        f"\nverify cells: {total_seconds:.0f} s in all; {decided} of {images} images decided "
        f"({100 * decided / max(images, 1):.2f}%)"
    )


if __name__ == "__main__":
    main()
