"""Check every stored worst case against AutoAttack runs with seeds the matrix never drew.

    bench run --defense all --matrix full                 # the zoo (minutes on a CPU)
    python benchmarks/worst_vs_autoattack.py              # ./results
    python benchmarks/worst_vs_autoattack.py --results /tmp/res --dataset digits --seeds 3

The matrix's own AutoAttack cell is one of the cells the worst case ANDs over, so running
AutoAttack again with that cell's seed could only agree. This script runs it with seeds
the matrix never hands pyautoattack, straight from the package (through
attacks.autoattack.run_autoattack, outside the bench's scheduler and store), on every
test image:

- the matrix's seeds: an eval job crafts every cell from a generator seeded with the
  cell's own seed (`Cell.seed`, derived from its key; a randomized model's extra rounds
  use that seed plus 1, 2, ...), and the AutoAttack plugin gives pyautoattack
  `seed_from(generator)`, a draw in [0, 2**31 - 1), one per batch. `matrix_seeds`
  collects the first 16 draws of the generators of every AutoAttack cell of the built-in
  matrices on every dataset (and of its randomized form), for its first 16 rounds, on
  the CPU and on CUDA where there is one;
- the independent seeds: the smallest integers from 1 up that are not among them
  (1, 2, 3 for `--seeds 3`; `independent_seeds` asserts the full matrix's first draw is
  not one of them).

Per checkpoint it runs the standard version at each independent seed and the `plus`
version (APGD-CE and APGD-DLR with 5 restarts each, FAB, Square, APGD-T, FAB-T; the
matrix has no cell of it) at the first, and prints the worst case (the per-sample AND
over every stored cell), each run's robust accuracy, whether the worst case is at or
below it (`<=`) or by how many samples above (`+N`), how many of the worst case's
surviving samples the run broke, and the max-min spread of the standard runs in samples,
AutoAttack's own seed-to-seed noise on that checkpoint. Exit status 1 if a worst case is
above any run by more than that spread (or by more than `--tolerance` samples). The
store is only read. A randomized model is judged by one pass here, which its stored
majority-of-passes cells do not use: its row is marked and left out of the verdict.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from attacks.autoattack import run_autoattack
from bench.core.cells import make_cell
from bench.core.data import DATASETS, get_spec, load_dataset
from bench.core.matrix import BUILTIN, matrix_cells
from bench.plugin import seed_from
from bench.reporting.results import result_rows
from bench.run.training import load_model
from bench.science.adaptive import adapt_cells
from bench.science.admitted import is_randomized
from bench.store.db import Store
from bench.store.evidence import worst_case

RANDOMIZED = {"randomized": {"share_prediction_changed": 1.0, "max_output_diff": 1.0}}
"""An admission record that says randomized: what makes a cell take its randomized form."""


def autoattack_cell_seeds() -> set[int]:
    """The seeds of every AutoAttack cell of the built-in matrices, on every dataset, in
    its plain and its randomized form (`Cell.seed`, derived from the key)."""
    seeds = set()
    for spec, name in itertools.product(DATASETS.values(), BUILTIN):
        cells = [c for c in matrix_cells(name, spec.threat) if c.attack == "autoattack"]
        seeds |= {c.seed for c in [*cells, *adapt_cells(cells, RANDOMIZED)]}
    return seeds


def first_full_draw() -> int:
    """What pyautoattack gets for the first batch of the full matrix's L-inf AutoAttack
    cell on digits, on the CPU."""
    spec = get_spec("digits")
    cell = next(
        c for c in matrix_cells("full", spec.threat) if c.attack == "autoattack" and c.threat == spec.threat.name
    )
    return seed_from(torch.Generator().manual_seed(cell.seed))


def matrix_seeds(rounds: int = 16, draws: int = 16) -> set[int]:
    """Every seed a matrix AutoAttack cell can give pyautoattack: `seed_from` draws (one
    per batch) of generators seeded with each cell's seed plus 0 (the cell) to 15 (a
    randomized model's rounds)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    used = set()
    for device, seed, r in itertools.product(devices, autoattack_cell_seeds(), range(rounds)):
        gen = torch.Generator(device=device).manual_seed(seed + r)
        used.update(seed_from(gen) for _ in range(draws))
    return used


def independent_seeds(k: int = 3) -> tuple[int, ...]:
    """The k smallest positive integers the matrix never gives pyautoattack (1, 2, 3)."""
    used = matrix_seeds()
    seeds = tuple(itertools.islice((s for s in itertools.count(1) if s not in used), k))
    assert first_full_draw() not in seeds
    return seeds


def autoattack_runs(model, x, y, threat, seeds, plus: bool = True) -> list[tuple[str, torch.Tensor, float]]:
    """(label, per-sample robust bits, seconds) of AutoAttack standard at each seed and,
    with `plus`, its plus version at the first; a sample counts as robust only if the
    model also classifies it correctly unattacked, as in the bench's cells."""
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    runs = [("standard", s) for s in seeds] + ([("plus", seeds[0])] if plus else [])
    out = []
    for version, seed in runs:
        cfg = make_cell("autoattack", {"version": version}, threat).config
        start = time.perf_counter()
        x_adv, _ = run_autoattack(model, x, y, cfg, seed)
        with torch.no_grad():
            robust = (model(x_adv).argmax(1) == y) & clean
        out.append((f"{version} seed {seed}", robust, time.perf_counter() - start))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seeds", type=int, default=3, help="independent seeds of the standard version (default 3)")
    ap.add_argument("--no-plus", action="store_true", help="skip the plus version (the slowest run)")
    ap.add_argument(
        "--tolerance",
        type=int,
        default=None,
        help="samples a worst case may be above a run (default: the standard runs' max-min spread)",
    )
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    torch.set_num_threads(1)
    store = Store.for_results(Path(args.results))
    spec = get_spec(args.dataset)
    x, y = load_dataset(args.dataset, "test")
    seeds = independent_seeds(args.seeds)
    worst = {
        r["checkpoint"]: r["robust_acc"]
        for r in result_rows(store, dataset=args.dataset)
        if r["attack"] == "worst_case"
    }
    print(
        f"AutoAttack at seeds {', '.join(map(str, seeds))} (the matrix's cell drew "
        f"{first_full_draw()}; none of the "
        f"{len(matrix_seeds())} seeds the matrix can draw is among them), on all {len(x)} images"
    )
    above = 0
    for ck in store.checkpoints(dataset=args.dataset):
        if ck.key not in worst:
            continue
        model = load_model(ck, "cpu").eval()
        incoming = [t for t in store.transfers([ck.id]) if t.target_id == ck.id]  # not those it sourced
        bits = torch.from_numpy(worst_case(ck.threat, [*store.evaluations([ck.id]), *incoming], len(x)).bits)
        # Accuracies are k/n stored through float32: compare in samples, not in floats.
        n_worst = round(worst[ck.key] * len(x))
        assert int(bits.sum()) == n_worst, "the stored worst case and its bits disagree"
        randomized = is_randomized(ck.admission)
        runs = autoattack_runs(model, x, y, spec.threat, seeds, plus=not args.no_plus)
        standard = [int(r.sum()) for label, r, _ in runs if label.startswith("standard")]
        tol = max(standard) - min(standard) if args.tolerance is None else args.tolerance
        note = "  (randomized: stored cells use majority votes; left out of the verdict)" if randomized else ""
        print(f"\n{ck.defense} {ck.key[:8]}: worst case {100 * worst[ck.key]:.2f}% ({n_worst} of {len(x)}){note}")
        print(f"  {'AutoAttack run':22} {'robust':>15} {'worst case':>11} {'survivors broken':>17} {'s':>6}")
        over = 0
        for label, robust, seconds in runs:
            n_aa, gap = int(robust.sum()), n_worst - int(robust.sum())
            over += gap > tol
            print(
                f"  {label:22} {100 * robust.float().mean():7.2f}% ({n_aa:3}) {'<=' if gap <= 0 else f'+{gap}':>11} "
                f"{int((bits & ~robust).sum()):>9} of {n_worst:<4} {seconds:6.1f}"
            )
        above += bool(over) and not randomized
        print(
            f"  standard runs' spread {max(standard) - min(standard)} samples; tolerance {tol}: "
            f"{'ABOVE' if over else 'at or below'} every run within it"
        )
    print(f"\n{above} worst case(s) above an independent AutoAttack run by more than the tolerance")
    return 1 if above else 0


if __name__ == "__main__":
    sys.exit(main())
