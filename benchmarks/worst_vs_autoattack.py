"""Check that no stored worst case is above AutoAttack run directly on the whole test set.

    bench run --defense all --matrix full                 # the zoo (minutes on a CPU)
    python benchmarks/worst_vs_autoattack.py              # ./results
    python benchmarks/worst_vs_autoattack.py --results /tmp/res --dataset digits

For every stored checkpoint of the dataset (trained or outside), AutoAttack's standard
version runs straight from the pyautoattack package on every test image, outside the
bench's scheduler and store, and its robust accuracy is printed beside the stored worst
case (the per-sample AND over every cell), seeded as the bench seeds its own cell.
Exit status 1 if any worst case is above
AutoAttack's figure. The store is only read. A randomized model is judged by one pass
here, which its stored majority-of-passes cells do not use: its row is marked and left
out of the verdict.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.plugin import seed_from
from bench.science.admission import is_randomized
from bench.core.data import get_spec, load_dataset
from bench.reporting.results import result_rows
from bench.run.training import load_model
from bench.store.db import Store


def autoattack_direct(model, x, y, eps: float) -> float:
    from pyautoattack import AutoAttack

    # The seed the bench's AutoAttack cell gets (the first draw of a generator seeded 0),
    # so the two runs differ only in who drives them.
    seed = seed_from(torch.Generator().manual_seed(0))
    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu")
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
    with torch.no_grad():
        return float(((model(x_adv).argmax(1) == y) & clean).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--dataset", default="digits")
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = Store.for_results(Path(args.results))
    spec = get_spec(args.dataset)
    x, y = load_dataset(args.dataset, "test")
    worst = {r["checkpoint"]: r["robust_acc"] for r in result_rows(store, dataset=args.dataset)
             if r["attack"] == "worst_case"}
    print(f"{'checkpoint':28} {'worst case':>10} {'AA direct':>10} {'gap':>7} {'AA s':>6}")
    above = 0
    for ck in store.checkpoints(dataset=args.dataset):
        if ck.key not in worst:
            continue
        model = load_model(ck, "cpu")
        start = time.perf_counter()
        aa = autoattack_direct(model, x, y, spec.threat.eps)
        seconds = time.perf_counter() - start
        gap = worst[ck.key] - aa
        randomized = is_randomized(ck.admission)
        note = "  (randomized: stored cells use majority votes)" if randomized else ""
        # Accuracies are k/n stored through float32: compare in samples, not in floats.
        above += round(gap * len(x)) > 0 and not randomized
        print(f"{ck.defense[:18] + ' ' + ck.key[:8]:28} {100 * worst[ck.key]:9.2f}% {100 * aa:9.2f}% "
              f"{100 * gap:+6.2f} {seconds:6.1f}{note}")
    print(f"{above} worst case(s) above AutoAttack run directly on all {len(x)} images")
    return 1 if above else 0


if __name__ == "__main__":
    sys.exit(main())
