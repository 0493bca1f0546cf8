"""Exact robust accuracy by complete verification (bench.verify) against the certified
floor (CROWN) and plain interval bounds, on the digits test set.

    python benchmarks/verify_digits.py --arch digits_mlp --defense natural pgd_at --time-limit 10
    python benchmarks/verify_digits.py --dataset mnist5k --arch mnist_small --eps 0.3 --limit-images 50

Each model is trained with the bench's own loop and the defense's preset for the dataset
(`<defense>_<dataset>`, the bench defaults), seeded, and kept in --cache so a second run
reuses it. Prints, per defense: clean accuracy, the CROWN-certified and IBP-certified
fractions, the verifier's robust / not robust / unknown counts, the decided fraction,
what decided each image, per-image seconds (median, p90, max), the median number of
unstable ReLUs and of binaries, and the wall times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench.core.data import get_spec, load_dataset
from bench.core.models import build_model
from bench.core.presets import default_preset
from bench.engine.train import TrainConfig, train_model
from bench.registry import DEFENSES
from bench.verify import certify, to_graph, verify_images


def trained(dataset: str, arch: str, defense: str, seed: int, epochs: int | None, cache: Path) -> torch.nn.Module:
    spec = get_spec(dataset)
    preset = default_preset(defense, dataset)
    config = dict(preset.config) if preset else {}
    train = dict(preset.train) if preset else {}
    if epochs is not None:
        train["epochs"] = epochs
    path = cache / f"{dataset}-{arch}-{defense}-s{seed}-e{train.get('epochs', 'default')}.pt"
    if path.is_file():
        model = build_model(arch, spec)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    entry = DEFENSES.get(defense)
    x, y = load_dataset(dataset, "train")
    start = time.perf_counter()
    model, _ = train_model(arch, spec, entry.fn, entry.make_config(config), TrainConfig(**train), x, y, seed=seed)
    print(f"  trained {arch} with {defense} ({train}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, time_limit: float) -> dict:
    g = to_graph(model, tuple(x.shape[1:]))
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    start = time.perf_counter()
    bits, _ = certify(g, x, y, eps)
    certify_s = time.perf_counter() - start
    ibp, _ = certify(g, x, y, eps, method="ibp")  # beyond the fp32 tolerance, as the certify cell
    done = []

    def tick(i: int) -> None:
        done.append(i)
        if len(done) % 20 == 0 or len(done) == len(x):
            print(f"  {len(done)}/{len(x)} images", file=sys.stderr)

    start = time.perf_counter()
    verdicts = verify_images(g, model, x, y, eps, time_limit=time_limit, on_image=tick)
    wall = time.perf_counter() - start
    status = Counter(v.status for v in verdicts)
    seconds = [v.seconds for v in verdicts]
    milp = [v for v in verdicts if v.binaries > 0]
    return {
        "images": len(x),
        "clean": round(clean, 4),
        "certified_crown": round(float(bits.float().mean()), 4),
        "certified_ibp": round(float(ibp.float().mean()), 4),
        "robust": status["robust"],
        "not_robust": status["not_robust"],
        "unknown": status["unknown"],
        "robust_fraction": round(status["robust"] / len(x), 4),
        "decided_fraction": round(1 - status["unknown"] / len(x), 4),
        "decided_by": dict(Counter(v.decided_by for v in verdicts)),
        "seconds_median": round(statistics.median(seconds), 3),
        "seconds_p90": round(quantile(seconds, 0.9), 3),
        "seconds_max": round(max(seconds), 3),
        "unstable_median": statistics.median(v.unstable for v in verdicts),
        "unstable_median_milp": statistics.median(v.unstable for v in milp) if milp else 0,
        "binaries_median_milp": statistics.median(v.binaries for v in milp) if milp else 0,
        "certify_wall_s": round(certify_s, 2),
        "verify_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits or mnist5k (both embedded)")
    parser.add_argument("--arch", default="digits_mlp")
    parser.add_argument("--defense", nargs="+", default=["natural", "pgd_at"])
    parser.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the dataset's threat model)")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per image")
    parser.add_argument("--limit-images", type=int, default=None, help="verify only the first N test images")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (HiGHS runs single-threaded)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench-verify-models")
    parser.add_argument("--json", action="store_true", help="print one JSON object per defense instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = get_spec(args.dataset)
    eps = spec.threat.eps if args.eps is None else args.eps
    x, y = load_dataset(args.dataset, "test")
    if args.limit_images is not None:
        x, y = x[: args.limit_images], y[: args.limit_images]
    print(f"{args.dataset} / {args.arch}: {len(x)} test images, L-inf eps {eps:g}, {args.time_limit:g} s per image")
    for defense in args.defense:
        model = trained(args.dataset, args.arch, defense, args.seed, args.epochs, args.cache)
        r = {
            "dataset": args.dataset,
            "arch": args.arch,
            "defense": defense,
            "eps": eps,
            **report(model, x, y, eps, args.time_limit),
        }
        if args.json:
            print(json.dumps(r))
            continue
        print(f"\n{defense}:")
        print(
            f"  clean {r['clean']:.1%}   certified: CROWN {r['certified_crown']:.1%}, IBP {r['certified_ibp']:.1%}"
            f"   (certify {r['certify_wall_s']} s)"
        )
        print(
            f"  verified: robust {r['robust']}, not robust {r['not_robust']}, unknown {r['unknown']}"
            f"   -> robust {r['robust_fraction']:.1%}, decided {r['decided_fraction']:.1%}"
        )
        print(f"  decided by: {', '.join(f'{k} {v}' for k, v in sorted(r['decided_by'].items()))}")
        print(f"  seconds per image: median {r['seconds_median']}, p90 {r['seconds_p90']}, max {r['seconds_max']}")
        print(
            f"  unstable ReLUs: median {r['unstable_median']} (where the MILP ran: {r['unstable_median_milp']}),"
            f" binaries where the MILP ran: median {r['binaries_median_milp']}"
        )
        print(f"  wall: verify {r['verify_wall_s']} s")


if __name__ == "__main__":
    main()
