"""How much faster `bench run --defense all` is on Ray than in one process.

    python benchmarks/scale_out.py                                   # digits, --matrix full
    python benchmarks/scale_out.py --matrix quick --set epochs=2     # a smoke test

Runs the same `bench run --defense all --matrix M` twice, each into a fresh results
folder: with the local executor (one job after another), then with `--executor ray`
on a local Ray cluster of this machine's cores (one worker per core, one torch thread
per task; Ray's start-up is inside the timing, as a user pays it). Prints both wall
times, their ratio, and whether the two stores hold the same numbers bit for bit (they
must: same recipes, same seeds, same thread count). The target on a 2-core machine is
a ratio of at least 1.6. This is a measurement, not a test: nothing fails when it is slow,
but it exits 1 when the two stores disagree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.store.db import Store


def _run(executor: str, results: Path, matrix: str, sets: list[str]) -> float:
    bench = shutil.which("bench", path=os.path.dirname(sys.executable)) or "bench"
    argv = [
        bench,
        "run",
        "--defense",
        "all",
        "--matrix",
        matrix,
        "--results",
        str(results),
        "--executor",
        executor,
        *[a for s in sets for a in ("--set", s)],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the tests: one intra-op thread per process
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def _numbers(results: Path) -> dict:
    store = Store(f"sqlite:///{results / 'bench.db'}")
    keys = {c.id: (c.key, c.sha256) for c in store.checkpoints()}
    return {
        (keys[e.checkpoint_id], e.cell_key): (e.clean_acc, e.robust_acc, e.correct_bits) for e in store.evaluations()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default="full", help="matrix of the run (default full)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every defense")
    parser.add_argument("--keep", action="store_true", help="keep the two results folders")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    try:
        local = _run("local", root / "local", args.matrix, args.sets)
        ray = _run("ray", root / "ray", args.matrix, args.sets)
        a, b = _numbers(root / "local"), _numbers(root / "ray")
        same = a == b
        checkpoints = len({k[0] for k in a})
        print(f"bench run --defense all --matrix {args.matrix} {' '.join('--set ' + s for s in args.sets)}".rstrip())
        print(f"  {checkpoints} checkpoints, {len(a)} cells, {os.cpu_count()} CPU cores")
        print(f"  local executor:              {local:8.1f} s")
        print(f"  ray, {os.cpu_count()} workers:               {ray:8.1f} s")
        print(f"  speed-up of ray over local:  {local / ray:8.2f}x  (target 1.6x on 2 cores)")
        print(f"  the two stores agree bit for bit: {'yes' if same else 'NO'}")
        if args.keep:
            print(f"  results kept in {root}")
        if not same:
            sys.exit(1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
