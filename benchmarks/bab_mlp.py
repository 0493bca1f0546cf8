"""Branch and bound against the MILP alone on fully connected MNIST nets 784-256xk-10
(bench.verify: complete.py's BaB path, bab.py), naturally and PGD trained.

    python benchmarks/bab_mlp.py --limit-images 30
    python benchmarks/bab_mlp.py --depth 6 --training natural --eps 0.05 --limit-images 10 --method bab
    python benchmarks/bab_mlp.py --method bab --device cuda --batch 1024   # the search on a GPU

Each net is trained with the bench's own loop (bench.engine.train.train, seeded as
train_model seeds it) and the defense's mnist5k preset (`natural_mnist5k`,
`pgd_at_mnist5k`: PGD-10 at eps 0.3, half clean), and kept in --cache. The architecture
registry has no such MLPs, so the net is built here the way bench.core.models builds
its own: Normalize with the dataset's statistics, then Flatten and the Linear/ReLU stack.

Per (depth, training, eps) and method, a markdown row: decided fraction, robust / not
robust / unknown, per-image seconds (median, p90, max), the median unstable ReLUs, and
what decided the images. "milp" is today's path (BaB disabled); "bab" the verifier as
it now is, which takes the BaB path for chains with at least BaBConfig.min_unstable
unstable ReLUs. Any disagreement between the two methods' decided verdicts is printed
and counted as wrong; with --verdicts each row is followed by its per-image verdicts (r,
n or ? an image) as an HTML comment, so that runs made apart (one method per core) can be
held to each other the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from bench.core.data import get_spec, load_dataset
from bench.core.models import Normalize
from bench.core.presets import default_preset
from bench.core.trainsets import InMemory
from bench.engine.device import resolve_device
from bench.engine.train import TrainConfig, TrainContext, train
from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.verify import to_graph, verify_images
from bench.verify.bab import BaBConfig
from bench.verify.complete import Verdict

DATASET = "mnist5k"
WIDTH = 256
LETTER = {"robust": "r", "not_robust": "n", "unknown": "?"}


def mlp(depth: int) -> nn.Module:
    """784 -> 256 x depth -> 10, ReLU, behind the dataset's Normalize."""
    spec = get_spec(DATASET)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 28 * 28
    for _ in range(depth):
        layers += [nn.Linear(fan_in, WIDTH), nn.ReLU()]
        fan_in = WIDTH
    layers.append(nn.Linear(fan_in, spec.num_classes))
    return nn.Sequential(Normalize(spec.mean, spec.std), nn.Sequential(*layers))


def trained(depth: int, defense: str, seed: int, cache: Path) -> nn.Module:
    preset = default_preset(defense, DATASET)
    config, schedule = (dict(preset.config), dict(preset.train)) if preset else ({}, {})
    path = cache / f"{DATASET}-mlp{depth}x{WIDTH}-{defense}-s{seed}.pt"
    torch.manual_seed(seed)  # as train_model: the seed fixes the initialization
    model = mlp(depth)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    spec, entry = get_spec(DATASET), DEFENSES.get(defense)
    x, y = load_dataset(DATASET, "train")
    ctx = TrainContext(spec.num_classes, spec.threat, torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    train(model, entry.fn, entry.make_config(config), TrainConfig(**schedule), InMemory(x, y), ctx)
    print(f"  trained mlp{depth} with {defense} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, verdicts: list[Verdict], limit: float) -> str:
    status = Counter(v.status for v in verdicts)
    seconds = [v.seconds for v in verdicts]
    by = ", ".join(f"{k} {n}" for k, n in sorted(Counter(v.decided_by for v in verdicts).items()))
    decided = 1 - status["unknown"] / len(verdicts)
    over = max(seconds) - limit
    return (
        f"| {name} | {decided:.0%} | {status['robust']} / {status['not_robust']} / {status['unknown']} "
        f"| {statistics.median(seconds):.2f} / {quantile(seconds, 0.9):.2f} / {max(seconds):.2f}"
        f"{f' (over by {over:.1f})' if over > 0 else ''} "
        f"| {statistics.median(v.unstable for v in verdicts):.0f} | {by} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[2, 4, 6], help="hidden layers k")
    parser.add_argument("--training", nargs="+", default=["natural", "pgd_at"], help="defenses (mnist5k presets)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.05])
    parser.add_argument("--method", nargs="+", default=["milp", "bab"], choices=["milp", "bab"])
    parser.add_argument("--limit-shallow", type=float, default=60.0, help="seconds per image for k <= 2")
    parser.add_argument("--limit-deep", type=float, default=10.0, help="seconds per image for k > 2")
    parser.add_argument("--limit-images", type=int, default=30, help="verify the first N test images")
    parser.add_argument(
        "--min-unstable", type=int, default=BaBConfig.min_unstable, help="unstable ReLUs from which BaB runs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verdicts", action="store_true", help="print each row's per-image verdicts (r, n, ?) as an HTML comment"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device", default="cpu", help="auto, cpu or cuda: where the model runs, and so the search (default cpu)"
    )
    parser.add_argument(
        "--batch", type=int, default=BaBConfig.batch, help="domains split per round (a GPU takes many more)"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench-bab-models")
    args = parser.parse_args(argv)
    # One line and exit status 2 for a value the run cannot take (no usage block above it).
    if args.batch < 1:
        parser.exit(2, f"{parser.prog}: --batch must be at least 1 (domains split per round), got {args.batch}\n")
    try:
        device = resolve_device(args.device)
    except BenchError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    torch.set_num_threads(args.threads)
    x, y = load_dataset(DATASET, "test")
    x, y = x[: args.limit_images], y[: args.limit_images]
    wrong = 0
    for depth in args.depth:
        limit = args.limit_shallow if depth <= 2 else args.limit_deep
        for defense in args.training:
            model = trained(depth, defense, args.seed, args.cache)
            g = to_graph(model, tuple(x.shape[1:]))
            model.to(device)
            with torch.no_grad():
                clean = float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
            for eps in args.eps:
                print(
                    f"\n### 784-{WIDTH}x{depth}-10, {defense} (clean {clean:.1%}), eps {eps:g}, {limit:g} s per image"
                )
                print(f"{len(x)} images, on {device}, {args.batch} domains a round\n")
                print(
                    "| method | decided | robust / not robust / unknown | s per image: median / p90 / max "
                    "| unstable (median) | decided by |"
                )
                print("|---|---|---|---|---|---|")
                runs = {}
                for method in args.method:
                    bab = BaBConfig(min_unstable=args.min_unstable, batch=args.batch) if method == "bab" else None
                    runs[method] = verify_images(g, model, x, y, eps, time_limit=limit, bab=bab)
                    print(row(method, runs[method], limit), flush=True)
                    if args.verdicts:  # one letter an image, to hold separate runs to each other
                        print(f"<!-- {method} verdicts: {''.join(LETTER[v.status] for v in runs[method])} -->")
                if len(runs) == 2:
                    for i, (a, b) in enumerate(zip(*runs.values(), strict=True)):
                        if "unknown" not in (a.status, b.status) and a.status != b.status:
                            wrong += 1
                            print(f"  DISAGREE image {i}: milp {a.status}, bab {b.status}")
    print(f"\ndisagreements: {wrong}")


if __name__ == "__main__":
    main()
