"""How much faster one training runs data-parallel on two workers than in one.

    python benchmarks/ddp_speedup.py                         # resnet18 on digits, CPU
    python benchmarks/ddp_speedup.py --dataset mnist5k --arch resnet8 --epochs 3   # compute-bound steps
    python benchmarks/ddp_speedup.py --arch resnet8 --epochs 2   # a smoke test
    python benchmarks/ddp_speedup.py --device cuda --workers 8   # a GPU node or cluster

Trains natural digits (or `--dataset mnist5k`) with the given architecture (default
resnet18: 11M weights, a few hundred milliseconds per step on one core; on 8 x 8 digits
its all-reduce weighs as much as its compute, while resnet8's steps on 28 x 28 mnist5k are
compute-bound) three ways, each through bench.run.distributed as `bench train --workers N`
does, on a local Ray cluster (or `--ray-address`):

- one worker at the per-worker batch B (the same work per step and per worker),
- one worker at the global batch B * N (the same steps as N workers take),
- N workers at B each.

It prints the training throughput of each in images/s (the epochs after the first, which
pays for warm-up, timed by rank 0's loop, so the time waiting on the other workers is
in), and the ratio of N workers to one at the global batch: the speed-up a user gets for
the same recipe. Ray's start-up (seconds, paid once per training) is printed apart. Each
worker gets `--threads` CPUs and as many torch threads. On the CPU the workers must have
a core each to gain anything: the figures say nothing when other work shares the cores.
This is a measurement, not a test: nothing fails when it is slow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.core.data import get_spec, load_dataset
from bench.engine.device import default_precision, resolve_device
from bench.engine.train import TrainConfig, steps_per_epoch
from bench.registry import DEFENSES
from bench.run.distributed import DataParallelTraining, train_data_parallel


def _measure(args, workers: int, batch: int, root: Path) -> tuple[float, float, list[float]]:
    """(images/s over the epochs after the first, wall seconds of the whole training, losses)."""
    spec = get_spec(args.dataset)
    entry = DEFENSES.get("natural")
    device = resolve_device(args.device)
    training = DataParallelTraining(
        args.arch,
        spec,
        entry.fn,
        entry.make_config({}),
        TrainConfig(epochs=args.epochs, batch_size=batch, lr=1e-3),
        seed=0,
        workers=workers,
        device=device,
        data_root=None,
        threads=args.threads,
        precision=default_precision(device),
        channels_last=device.startswith("cuda"),
    )
    n = len(load_dataset(args.dataset, "train")[1])
    full, rest = divmod(n, batch * workers)
    images = full * batch * workers + (rest if steps_per_epoch(n, batch, workers) > full else 0)
    start = time.perf_counter()
    _, result = train_data_parallel(training, root / f"w{workers}-b{batch}")
    wall = time.perf_counter() - start
    timed = result.epoch_seconds[1:] or result.epoch_seconds
    return images / statistics.median(timed), wall, result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="an embedded dataset: digits (8 x 8) or mnist5k (28 x 28)")
    parser.add_argument("--arch", default="resnet18", help="an architecture for it (resnet18, resnet8, digits_cnn)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training (the first is not timed)")
    parser.add_argument("--batch", type=int, default=128, help="per-worker batch B")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPUs and torch threads of each worker")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per worker)")
    parser.add_argument("--ray-address", default=None, help="a running cluster (auto, host:port); unset: a local one")
    args = parser.parse_args()

    import ray

    ray.init(
        address=args.ray_address or "local",
        num_cpus=None if args.ray_address else max(os.cpu_count() or 1, args.workers * args.threads),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    print(
        f"natural {args.dataset}, {args.arch}, {args.epochs} epochs, batch {args.batch} per worker, "
        f"{args.threads} thread(s) per worker, device {args.device}; load average now "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    runs = [(1, args.batch), (1, args.batch * args.workers), (args.workers, args.batch)]
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        for workers, batch in runs:
            rate, wall, losses = _measure(args, workers, batch, Path(root))
            rates[workers, batch] = rate
            print(
                f"{workers} worker(s) x batch {batch:4d}: {rate:8.1f} images/s in training; "
                f"{wall:6.1f} s wall with Ray's start-up; losses {', '.join(f'{x:.4f}' for x in losses)}",
                flush=True,
            )
    ray.shutdown()
    one = rates[1, args.batch * args.workers]
    many = rates[args.workers, args.batch]
    print(f"speed-up of {args.workers} workers over one at the same global batch: {many / one:.2f}x")
    print(f"(over one worker at batch {args.batch}: {many / rates[1, args.batch]:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
