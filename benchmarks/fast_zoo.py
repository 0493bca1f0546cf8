"""The cheating zoo under the `fast` matrix: does the cheap worst case escalate where it
must, and land near the truth?

    python benchmarks/fast_zoo.py                   # every model of tests/cheats.py and the two honest controls
    python benchmarks/fast_zoo.py noisy natural     # some of them

For each model it prints `fast`'s worst case, the truth (the attack written for the cheat,
tests/cheats.py; for the honest controls the lowest of three AutoAttack runs at seeds the
matrix never draws, benchmarks/worst_vs_autoattack.py), the difference in points
(`fast` must land within 10 of the truth), whether `fast` escalated and why, and the
forward passes per test image its worst case cost.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cheating_zoo import adaptive
from cheats import CHEATS
from conftest import train_digits

import bench
from bench.core.data import load_dataset
from bench.core.presets import default_preset
from bench.store.db import Store

LIMIT = 0.10
"""`fast` must land within this of the truth on every model of the zoo."""


def main() -> None:
    names = [c.name for c in CHEATS] + ["natural", "pgd_at"]
    only = set(sys.argv[1:])
    unknown = only - set(names)
    if unknown:
        # Checked before the two trainings, so a typo costs nothing.
        print(
            f"fast_zoo.py: no model named {', '.join(sorted(unknown))}; choose from {', '.join(names)}", file=sys.stderr
        )
        sys.exit(2)
    torch.set_num_threads(1)
    x, y = load_dataset("digits", "test")
    natural = train_digits("natural")
    robust_base = train_digits("pgd_at", epochs=8, **default_preset("pgd_at", "digits").config)
    torch.manual_seed(0)
    zoo = [(c.name, c.build(natural, robust_base)) for c in CHEATS]
    zoo += [("natural", natural), ("pgd_at", robust_base)]
    zoo = [z for z in zoo if not only or z[0] in only]
    results = Path(tempfile.mkdtemp(prefix="fast-zoo-"))
    print("| model | fast | truth | fast - truth (pts) | within 10 | escalated | fwd/img | s |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    total = time.perf_counter()
    misses = 0
    for kind, model in zoo:
        model.eval()
        start = time.perf_counter()
        rows = bench.evaluate(model, name=f"zoo_{kind}", matrix="fast", results=results, device="cpu")
        wc = [r for r in rows if r["attack"] == "worst_case"][-1]  # the own threat model's, last
        truth = adaptive(kind, model, natural, x, y)
        if isinstance(truth, list):
            truth = min(n for _, n in truth) / len(y)
        ck = next(c for c in Store.for_results(results).checkpoints() if c.key == wc["checkpoint"])
        gap = 100 * (wc["robust_acc"] - truth)
        within = abs(gap) <= 100 * LIMIT
        misses += not within
        fwd = wc.get("forward_passes")
        print(
            f"| {kind} | {100 * wc['robust_acc']:.2f}% | {100 * truth:.2f}% | {gap:+.2f} | {'yes' if within else 'NO'} "
            f"| {(ck.meta or {}).get('escalated') or 'no'} | {'–' if fwd is None else f'{fwd:.0f}'} "
            f"| {time.perf_counter() - start:.0f} |",
            flush=True,
        )
    print(
        f"\n{misses} model(s) outside 10 points of the truth; wall time {time.perf_counter() - total:.0f} s; "
        f"store: {results}"
    )


if __name__ == "__main__":
    main()
