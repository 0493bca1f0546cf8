"""The cheating zoo on digits: worst case before and after adaptive evaluation, against an adaptive attack.

    python benchmarks/cheating_zoo.py                   # every model (tens of minutes on 2 CPU cores)
    python benchmarks/cheating_zoo.py noisy natural     # some of them
    python benchmarks/cheating_zoo.py --matrix fast     # judged by the fast cascade and its escalation

The cheaters of tests/cheats.py wrap a trained digits model (rounded inputs, saturated
logits, input noise, rounding under noise, straight-through and reversed custom
backwards, random resizing and padding, stochastic activation pruning, a staircase
activation); the honest controls are a natural and a PGD-AT model. For each it prints:

- before: the per-sample AND over the `full` matrix as it was without adaptive
  evaluation (AutoAttack on a 100-image subset, no Square cell, no transfers, every
  cell judged by one pass, no EOT);
- after: the worst case `bench.evaluate(model, matrix=...)` stores (`full` unless
  --matrix says otherwise), and its flags; under `fast`, also whether it escalated and
  why, and "before" is left out (it is the old `full`);
- adaptive: the attack written for the cheat (tests/cheats.py names each), outside the
  bench, on all 360 images. For the honest controls: AutoAttack straight
  from pyautoattack at seeds the matrix never draws (standard at 1, 2 and 3, plus at 1;
  see benchmarks/worst_vs_autoattack.py for how they are proven unused), so that it can
  disagree with the stored worst case, which holds the matrix's own AutoAttack cell.
  Their row's adaptive column is the lowest of these runs; a line under it gives each
  run, whether the worst case is at or below it (`<=`) or how many samples above (`+N`),
  and the standard runs' max-min spread, AutoAttack's own seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cheats import BY_NAME, CHEATS
from conftest import train_digits
from worst_vs_autoattack import autoattack_runs, independent_seeds

import bench
from bench.core.cells import make_cell
from bench.core.data import get_spec, load_dataset
from bench.core.matrix import matrix_cells
from bench.core.presets import default_preset
from bench.engine.cell import run_cell
from bench.science.flags import MASKING
from bench.store.db import Store
from bench.store.evidence import worst_case
from bench.store.rows import CellRow

SPEC = get_spec("digits")


def before(model, x, y) -> float:
    """The old full matrix: AutoAttack on 100 images, no Square, no transfers, one pass."""
    cells = [c for c in matrix_cells("full", SPEC.threat) if c.attack not in ("autoattack", "square")]
    cells.append(make_cell("autoattack", {"subset": 100}, SPEC.threat))
    rows = []
    for c in cells:
        r = run_cell(model, c, x, y, device="cpu", batch_size=1024)
        rows.append(CellRow.build(**r.row_fields()))
    return worst_case(SPEC.threat.name, rows, len(y)).robust_acc


def adaptive(kind: str, model, natural, x, y) -> float | list[tuple[str, int]]:
    """Robust accuracy under the attack written for the cheat (tests/cheats.py); for the
    honest controls, (label, robust samples) of each independent AutoAttack run."""
    if kind in BY_NAME:
        return BY_NAME[kind].truth(model, natural, x, y)
    return [(label, int(r.sum())) for label, r, _ in autoattack_runs(model, x, y, SPEC.threat, independent_seeds(3))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="the models to run (all when none)")
    parser.add_argument("--matrix", default="full", help="the matrix that judges them (default: full)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = load_dataset("digits", "test")
    natural = train_digits("natural")
    robust_base = train_digits("pgd_at", epochs=8, **default_preset("pgd_at", "digits").config)
    torch.manual_seed(0)
    zoo = [(c.name, c.build(natural, robust_base)) for c in CHEATS]
    zoo += [("natural", natural), ("pgd_at", robust_base)]
    only = set(args.models)
    zoo = [z for z in zoo if not only or z[0] in only]
    results = Path(tempfile.mkdtemp(prefix="zoo-"))
    print(f"{'model':10} {'before':>7} {'after':>7} {'adaptive':>9} {'s':>6}  masking flags")
    total = time.perf_counter()
    for kind, model in zoo:
        model.eval()
        start = time.perf_counter()
        b = before(model, x, y) if args.matrix == "full" else None
        rows = bench.evaluate(model, name=f"zoo_{kind}", matrix=args.matrix, results=results, device="cpu")
        wc = [r for r in rows if r["attack"] == "worst_case"][-1]  # the checkpoint's own (an L2 one may come before)
        a = runs = adaptive(kind, model, natural, x, y)
        if isinstance(runs, list):
            a = min(n for _, n in runs) / len(y)
        flags = sorted(set(wc["flags"]) & set(MASKING))
        escalated = ""
        if args.matrix != "full":
            (ck,) = [c for c in Store.for_results(results).checkpoints() if c.defense == f"zoo_{kind}"]
            escalated = f"  escalated: {ck.meta.get('escalated') or 'no'}"
        shown_before = f"{100 * b:6.2f}%" if b is not None else f"{'-':>7}"
        print(
            f"{kind:10} {shown_before} {100 * wc['robust_acc']:6.2f}% {100 * a:8.2f}% "
            f"{time.perf_counter() - start:6.1f}  {', '.join(flags) or '-'}{escalated}",
            flush=True,
        )
        if isinstance(runs, list):  # compared in samples: accuracies are k/n through float32
            worst = round(wc["robust_acc"] * len(y))
            standard = [n for label, n in runs if label.startswith("standard")]
            print(
                f"{'':10} worst case {worst}/{len(y)} vs AutoAttack "
                + ", ".join(f"{label} {n} ({'<=' if worst <= n else f'+{worst - n}'})" for label, n in runs)
                + f"; standard spread {max(standard) - min(standard)}, worst case within it of every run: "
                f"{'yes' if all(worst - n <= max(standard) - min(standard) for _, n in runs) else 'NO'}",
                flush=True,
            )
    print(f"wall time {time.perf_counter() - total:.0f} s; store: {results}")


if __name__ == "__main__":
    main()
