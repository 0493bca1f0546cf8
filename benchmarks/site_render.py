"""How long `bench site` takes on a large store: 1,000 checkpoints with 30 cells each.

    python benchmarks/site_render.py                      # the default size, timed
    python benchmarks/site_render.py --checkpoints 200    # smaller
    python benchmarks/site_render.py --compare-matplotlib # also time matplotlib plots

Builds a synthetic store in a temporary folder (the same shapes `bench run` stores:
FGSM, PGD-5..1000 on cross-entropy and CW, restarts, an SPSA subset cell, AutoAttack,
an unbounded eps sweep, L2 PGD, logit histograms, flags, a transfer grid), then times
build_site and prints the figures. The budget is 10 s for the default size. This is a
measurement, not a test: nothing fails when it is slow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from bench.reporting.site import build_site
from bench.reporting.site.svg import svg_hist, svg_lines
from bench.science.flags import FLAG_TEXT
from bench.store.bits import pack_bits
from bench.store.db import Checkpoint, Evaluation, Flag, Store, Transfer

TEST_SIZE = 1000
DEFENSES = ["natural", "label_smoothing", "logit_squeeze", "gaussian_noise", "alp", "lrm"]


def _pgd(steps, loss="xent", restarts=1, norm="linf", eps=0.2):
    step = 0.05 if norm == "linf" else 2.5 * eps / steps
    return {
        "eps": eps,
        "steps": steps,
        "step_size": step,
        "loss": loss,
        "norm": norm,
        "random_start": True,
        "restarts": restarts,
        "early_stop": True,
    }


def _cells(cells: int) -> list[tuple[str, dict, str, int]]:
    """(attack, params, threat, subset) for one checkpoint, `cells` of them."""
    out = [("fgsm", {"eps": 0.2, "loss": "xent"}, "linf-0.2", 0)]
    for loss in ("xent", "cw"):
        out += [("pgd", _pgd(s, loss), "linf-0.2", 0) for s in (5, 10, 20, 50, 200, 1000)]
    out += [
        ("pgd", _pgd(20, restarts=10), "linf-0.2", 0),
        ("spsa", {"eps": 0.2, "steps": 100, "samples": 128}, "linf-0.2", 100),
        ("autoattack", {"eps": 0.2, "norm": "linf", "version": "standard"}, "linf-0.2", 0),
    ]
    out += [("unbounded", {"eps": e, "steps": 100}, "unbounded-linf", 0) for e in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)]
    out += [("pgd", _pgd(s, loss, norm="l2", eps=1.5), "l2-1.5", 0) for s in (10, 20, 50) for loss in ("xent", "cw")]
    while len(out) < cells:  # more PGD step counts if asked for more cells
        out.append(("pgd", _pgd(2000 + len(out), "xent"), "linf-0.2", 0))
    return out[:cells]


def _key(attack, params, subset):
    parts = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items() if k != "early_stop"]
    return f"{attack}:" + ",".join(sorted(parts + ([f"subset={subset}"] if subset else [])))


def synthetic_store(folder: Path, checkpoints: int = 1000, cells: int = 30, transfers: int = 8, seed: int = 0) -> Store:
    """A store shaped like real runs, with random but plausible numbers."""
    rng = np.random.default_rng(seed)
    store = Store(f"sqlite:///{folder / 'bench.db'}")
    edges = np.linspace(-20, 20, 41).round(5).tolist()
    subset_idx = np.sort(rng.permutation(TEST_SIZE)[:100]).tolist()
    with store.Session.begin() as s:
        cks = []
        for i in range(checkpoints):
            defense = DEFENSES[i % len(DEFENSES)]
            clean = rng.uniform(0.85, 0.99)
            ck = Checkpoint(
                key=f"{i:016x}",
                dataset="digits" if i % 10 else "mnist",
                defense=defense,
                preset=f"{defense}_digits" if i % 3 == 0 else None,
                arch="digits_cnn",
                seed=i // len(DEFENSES),
                threat="linf-0.2",
                config={"beta": float(rng.uniform(0, 1)), "sigma": 0.5},
                train_config={"epochs": 30, "lr": 0.003, "batch_size": 64},
                path=f"/tmp/ck/{i}",
                sha256=f"{i:064x}",
                epochs=30,
                train_seconds=float(rng.uniform(30, 3000)),
                device="cpu (2 cores)",
                meta={
                    "clean_acc": clean,
                    "package_version": "0.1.0",
                    "torch_version": "2.3.0",
                    "git_commit": "abc123",
                    "train_losses": [1.0, 0.5, 0.2],
                    "logit_stats": {"mean": 0.1, "variance": 20.0},
                    "paper": {"clean": 0.9, "fgsm": 0.5, "pgd20": 0.4} if i % 3 == 0 else {},
                },
            )
            s.add(ck)
            cks.append((ck, clean))
        s.flush()
        rows = []
        for ck, clean in cks:
            level = rng.uniform(0.0, 0.6)
            correct = rng.random(TEST_SIZE) < clean
            for attack, params, threat, subset in _cells(cells):
                strength = (0.5 + np.log10(params.get("steps", 1) + 1) / 6) if attack == "pgd" else 0.8
                bits = correct & (rng.random(TEST_SIZE) < max(level, 1 - strength))
                n = subset or TEST_SIZE
                if subset:
                    bits = bits[subset_idx]
                hist = {
                    "edges": edges,
                    "clean": rng.integers(0, 500, 40).tolist(),
                    "adv": rng.integers(0, 500, 40).tolist(),
                }
                rows.append(
                    dict(
                        checkpoint_id=ck.id,
                        cell_key=_key(attack, params, subset),
                        attack=attack,
                        params=params,
                        threat=threat,
                        clean_acc=clean,
                        robust_acc=float(bits.mean()),
                        n=n,
                        seconds=float(rng.uniform(0.1, 60)),
                        correct_bits=pack_bits(bits),
                        indices=subset_idx if subset else None,
                        device="cpu",
                        extra={"logit_hist": hist, "adv_logit_stats": {"mean": 0.0}, "warnings": []},
                    )
                )
            for name in rng.choice(sorted(FLAG_TEXT), size=rng.integers(0, 3), replace=False):
                s.add(Flag(checkpoint_id=ck.id, name=str(name), message=FLAG_TEXT[name], numbers={"accuracy": 0.1}))
        s.execute(insert(Evaluation), rows)  # one bulk insert: 30,000 ORM objects would take a minute
        grid = [ck for ck, _ in cks if ck.dataset == "digits"][:transfers]
        for src in grid:
            for tgt in grid:
                bits = rng.random(TEST_SIZE) < 0.5
                s.add(
                    Transfer(
                        source_id=src.id,
                        target_id=tgt.id,
                        cell_key=_key("pgd", _pgd(10), 0),
                        attack="pgd",
                        params=_pgd(10),
                        threat="linf-0.2",
                        clean_acc=0.9,
                        robust_acc=float(bits.mean()),
                        n=TEST_SIZE,
                        seconds=1.0,
                        correct_bits=pack_bits(bits),
                        extra={},
                    )
                )
    return store


def time_matplotlib(samples: int = 40) -> float:
    """CPU seconds per plot for matplotlib (Agg, one reused figure, SVG out) drawing what the site draws.

    Only savefig is timed: clearing and re-plotting the axes is left out, in matplotlib's favour.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(3.6, 2.3), dpi=100)
    times = []
    for i in range(samples):
        ax.clear()
        if i % 2:
            steps = [5, 10, 20, 50, 200, 1000]
            for loss in ("xent", "cw"):
                ax.plot(steps, rng.uniform(0, 1, 6) * 100, marker="o", label=loss)
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.legend()
        else:
            edges = np.linspace(-20, 20, 41)
            ax.stairs(rng.integers(0, 500, 40), edges, fill=True, alpha=0.3, label="clean")
            ax.stairs(rng.integers(0, 500, 40), edges, fill=True, alpha=0.3, label="adversarial")
            ax.legend()
        start = time.process_time()
        fig.savefig(io.StringIO(), format="svg")
        times.append(time.process_time() - start)
    plt.close(fig)
    return statistics.median(times)


def time_handwritten(samples: int = 400) -> float:
    """CPU seconds per plot for the site's own SVG writer, on the same plots."""
    rng = np.random.default_rng(0)
    start = time.process_time()
    for i in range(samples):
        if i % 2:
            svg_lines(
                [
                    (loss, list(zip([5, 10, 20, 50, 200, 1000], rng.uniform(0, 1, 6), strict=True)))
                    for loss in ("xent", "cw")
                ],
                xlabel="PGD steps",
                ylabel="robust accuracy (%)",
                logx=True,
            )
        else:
            svg_hist(
                np.linspace(-20, 20, 41).tolist(),
                [("clean", rng.integers(0, 500, 40).tolist()), ("adversarial", rng.integers(0, 500, 40).tolist())],
                xlabel="logit value",
                ylabel="count",
            )
    return (time.process_time() - start) / samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=2, help="time build_site this many times")
    ap.add_argument("--compare-matplotlib", action="store_true", help="also time matplotlib per plot")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="site-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        store = synthetic_store(tmp, args.checkpoints, args.cells)
        print(
            f"synthetic store: {args.checkpoints} checkpoints x {args.cells} cells "
            f"in {time.perf_counter() - start:.1f} s"
        )
        walls, cpus = [], []
        for _ in range(args.repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            build_site(store, tmp / "site")
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        files = sum(1 for p in (tmp / "site").rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in (tmp / "site").rglob("*") if p.is_file())
        # CPU time is the figure to trust on a busy machine; wall time includes waiting.
        print(f"build_site wall: {', '.join(f'{t:.2f}' for t in walls)} s (best {min(walls):.2f} s, budget 10 s)")
        print(f"build_site CPU:  {', '.join(f'{t:.2f}' for t in cpus)} s; {files} files, {size / 2**20:.1f} MiB")
    plots = 4 * args.checkpoints
    hand = time_handwritten()
    print(f"hand-written SVG: {hand * 1e3:.3f} ms CPU a plot, {hand * plots:.2f} s for {plots} plots")
    if args.compare_matplotlib:
        mpl = time_matplotlib()
        print(f"matplotlib SVG:   {mpl * 1e3:.1f} ms CPU a plot, {mpl * plots:.0f} s for {plots} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
