"""What a rerun that computes nothing costs: `bench run` on a store that already holds
every cell, timed, with the imports that take its time.

    python benchmarks/noop_rerun.py                      # digits, logit_squeeze, the quick matrix
    python benchmarks/noop_rerun.py --matrix fast --runs 5

The first run fills a temporary results folder; each later run finds everything stored.
It prints the wall time of each no-op run (the target is at most 3 s on a 2-core
machine), then, from `python -X importtime`, the share of one no-op run spent importing
and the slowest top-level imports, so a regression says where it comes from.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = [sys.executable, "-m", "bench.cli"]


def _run(args: list[str], cwd: Path, importtime: bool = False) -> tuple[float, str]:
    cmd = [sys.executable, "-X", "importtime", "-m", "bench.cli", *args] if importtime else [*BENCH, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", default="logit_squeeze")
    parser.add_argument("--matrix", default="quick")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="noop-"))
    command = ["run", "--defense", args.defense, "--matrix", args.matrix]
    try:
        first, _ = _run(command, work)
        print(f"first run (trains and attacks): {first:.1f} s")
        times = [_run(command, work)[0] for _ in range(args.runs)]
        print(
            f"no-op reruns: {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s "
            f"(target: at most 3 s)"
        )
        seconds, log = _run(command, work, importtime=True)
        rows = []
        for line in log.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            _, cumulative, name = line.split("|")
            if not cumulative.strip().isdigit():  # the header line
                continue
            depth = len(name) - len(name.lstrip())
            if depth <= 1:  # a top-level import of the command
                rows.append((int(cumulative.strip()), name.strip()))
        total = sum(us for us, _ in rows) / 1e6
        print(
            f"one no-op run with -X importtime: {seconds:.2f} s, of which imports {total:.2f} s "
            f"({100 * total / seconds:.0f}%)"
        )
        print("| import | seconds |\n|---|---:|")
        for us, name in sorted(rows, reverse=True)[: args.top]:
            print(f"| {name} | {us / 1e6:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
