"""`bench perf`: attack steps per second, and whether the fast path is honest.

One process, one model and one set of inputs per comparison:

- race: our PGD (through `fastpath.craft`, the path every cell takes) against
  torchattacks' PGD with the same steps, eps, step size and random start, on a robust
  digits model trained here (pgd_at when registered, else logit_squeeze with noise).
  Early stop off is equal work (every sample takes every step); early stop on is what
  the bench runs. Figures are images x steps per second and their ratio.
- matrix: the digits `full` matrix for one defense in a temporary results folder.
- scaling: time against images and against steps, with a least-squares line.
- precision: robust accuracy crafted in fp32 and in bf16 on the same samples; the
  recommended setting is the fastest that agrees with fp32 within half a point.
- gpu (CUDA only): FLOPs per image (FlopCounterMode), seconds for PGD-20 on 10,000
  CIFAR-shaped inputs with ResNet-18 and WideResNet-28-10 and the fraction of the
  device's bf16 peak that is, seconds per epoch of 7-step PGD training of ResNet-18,
  and the race on ResNet-18.

Progress goes to stderr, figures to stdout (`--json`: one JSON object).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from bench.core.data import get_spec, load_dataset
from bench.errors import BenchError
from bench.core.matrix import make_cell
from bench.core.models import build_model
from bench.registry import DEFENSES
from bench.run.bench import Bench, resolve_device
from bench.engine.evaluate import craft, frozen, predict
from bench.run.recipe import RunSpec, resolve
from bench.run.driver import ensure_checkpoint, load_model, run_defense


@dataclass(frozen=True)
class PerfSize:
    """How much `bench perf` measures; `default` takes a few minutes on two CPU cores."""

    race_images: int = 720
    """Digits test images (tiled) in the race."""
    race_steps: int = 20
    repeats: int = 7
    """Timed runs per variant (after one warm-up); the median is reported."""
    robust_epochs: int = 10
    """Epochs of the robust digits model trained for the race."""
    matrix: str = "full"
    matrix_epochs: int | None = None
    """Training epochs of the matrix's defense; None keeps its recipe."""
    scale_images: tuple[int, ...] = (180, 360, 720, 1440)
    scale_steps: tuple[int, ...] = (5, 10, 20, 40)
    scale_fixed_steps: int = 20
    scale_fixed_images: int = 720
    gpu_images: int = 10_000
    gpu_steps: int = 20
    gpu_archs: tuple[str, ...] = ("resnet18", "wrn28_10")
    gpu_batch: dict = dataclasses.field(default_factory=lambda: {"resnet18": 4096, "wrn28_10": 2048})
    gpu_fp32_archs: tuple[str, ...] = ("resnet18",)
    """Models on which the plain fp32 path is timed too."""
    gpu_compile: bool = True
    """Also time torch.compile on ResNet-18 (costs a minute of compiling)."""
    gpu_ablations: bool = False
    """Also time the fast path without BN folding and without channels-last."""
    train_images: int = 50_000
    train_runs: tuple[tuple[int, int], ...] = ((512, 2), (128, 2))
    """(batch size, epochs) of the ResNet-18 7-step PGD training runs."""


SIZES = {
    "default": PerfSize(),
    "tiny": PerfSize(race_images=48, race_steps=3, repeats=1, robust_epochs=1, matrix="quick",
                     matrix_epochs=1, scale_images=(16, 32), scale_steps=(2, 4), scale_fixed_steps=2,
                     scale_fixed_images=16, gpu_images=256, gpu_steps=2, gpu_archs=("resnet18",),
                     gpu_batch={"resnet18": 128}, gpu_compile=False, train_images=512,
                     train_runs=((128, 1),)),
}

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), by a piece of
# the device name; the measured large-matmul rate is reported beside it.
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                         "L40S": 362.1, "RTX 4090": 165.2}


class Log:
    def __init__(self, stream):
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[perf {time.perf_counter() - self.start:6.1f}s] {msg}", file=self.stream, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _median_times(variants: dict[str, Callable[[], Any]], repeats: int, device: str) -> tuple[dict, dict]:
    """One warm-up call of each, then `repeats` rounds, interleaved so that drift in the
    machine's load falls on every variant alike. Returns (median seconds, last outputs)."""
    outs = {k: fn() for k, fn in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            dt, outs[k] = _timed(fn, device)
            times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def _fit(xs: list[float], ts: list[float]) -> dict:
    """Least-squares t = a + b x, its R^2, and t/t0 against x/x0."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ts, float), 1)
    pred = intercept + slope * np.asarray(xs, float)
    ss_res = float(((np.asarray(ts) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(ts) - np.mean(ts)) ** 2).sum())
    return {"slope_s": float(slope), "intercept_s": float(intercept),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "time_ratios": [t / ts[0] for t in ts], "size_ratios": [x / xs[0] for x in xs]}


def _torchattacks_pgd(model, x, y, cfg, batch_size: int) -> torch.Tensor:
    import torchattacks

    atk = torchattacks.PGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           random_start=cfg.random_start)
    return torch.cat([atk(x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _robust(model, x_adv, x, y, bench: Bench) -> float:
    """Robust accuracy of (x_adv, x) verified in fp32, as fastpath.evaluate counts it."""
    bs = bench.batch_size()
    clean = predict(model, x, device=bench.device, batch_size=bs).argmax(1) == y.cpu()
    adv = predict(model, x_adv, device=bench.device, batch_size=bs).argmax(1) == y.cpu()
    return float((clean & adv).float().mean())


def race(model, x, y, threat, bench: Bench, *, steps: int, repeats: int, batch_size: int,
         fast: dict | None = None, log: Log) -> dict:
    """Our PGD (craft, early stop off and on) against torchattacks' PGD, same inputs."""
    fast = bench.fast if fast is None else fast
    off = make_cell("pgd", {"steps": steps, "early_stop": False}, threat)
    on = make_cell("pgd", {"steps": steps}, threat)
    x, y = x.to(bench.device), y.to(bench.device)
    dev = bench.device

    def ours(cell, kw=fast):
        return lambda: craft(model, cell, x, y, device=dev, batch_size=batch_size, seed=0, **kw)

    def theirs():
        with frozen(model):
            return _torchattacks_pgd(model, x, y, on.config, batch_size)

    variants = {"torchattacks": theirs, "ours_equal_work": ours(off), "ours_early_stop": ours(on)}
    if fast.get("exact_rewrites"):  # what the graph rewrites alone are worth
        variants["ours_equal_work_unrewritten"] = ours(off, dict(fast, exact_rewrites=False))
    log(f"race: {len(x)} images x {steps} steps, {repeats} timed rounds")
    t, outs = _median_times(variants, repeats, dev)
    work = len(x) * steps
    res = {"images": len(x), "steps": steps, "eps": on.config.eps, "step_size": on.config.step_size,
           "random_start": True, "batch_size": batch_size, "fast_path": fast,
           "seconds": t, "images_steps_per_s": {k: work / v for k, v in t.items()},
           "ratio_equal_work": t["torchattacks"] / t["ours_equal_work"],
           "ratio_early_stop": t["torchattacks"] / t["ours_early_stop"],
           "ratio_equal_work_unrewritten": (t["torchattacks"] / t["ours_equal_work_unrewritten"]
                                            if "ours_equal_work_unrewritten" in t else None),
           "robust_acc": {k: _robust(model, v, x, y, bench) for k, v in outs.items()}}
    log(f"race: ratio {res['ratio_equal_work']:.2f} at equal work, "
        f"{res['ratio_early_stop']:.2f} with early stop")
    return res


def precision_check(model, x, y, threat, bench: Bench, *, cells: list[dict], batch_size: int,
                    repeats: int, log: Log) -> dict:
    """Robust accuracy crafted in fp32 and in bf16 on the same samples, with times; the
    recommended setting is the fastest whose accuracy is within half a point of fp32 on
    every cell."""
    out: dict[str, Any] = {"cells": {}, "tolerance": 0.005}
    settings = {"fp32": dict(bench.fast, precision="fp32"), "bf16": dict(bench.fast, precision="bf16")}
    seconds = {k: 0.0 for k in settings}
    agree = True
    for params in cells:
        cell = make_cell("pgd", params, threat)
        row = {}
        for name, fast in settings.items():
            t, outs = _median_times({name: lambda: craft(model, cell, x, y, device=bench.device,
                                                         batch_size=batch_size, **fast)}, repeats, bench.device)
            row[name] = {"seconds": t[name], "robust_acc": _robust(model, outs[name], x, y, bench)}
            seconds[name] += t[name]
        row["difference"] = row["bf16"]["robust_acc"] - row["fp32"]["robust_acc"]
        agree &= abs(row["difference"]) <= out["tolerance"]
        out["cells"][cell.key] = row
        log(f"precision {cell.key}: fp32 {row['fp32']['robust_acc']:.4f} bf16 {row['bf16']['robust_acc']:.4f}")
    out["seconds"] = seconds
    out["bf16_agrees"] = bool(agree)
    candidates = ["fp32"] + (["bf16"] if agree else [])
    out["recommended"] = min(candidates, key=lambda k: seconds[k])
    out["bench_default"] = bench.precision
    return out


def scaling(model, x, y, threat, bench: Bench, size: PerfSize, log: Log) -> dict:
    """Seconds of our PGD (early stop off: equal work per image and step) as images and
    steps grow, with a least-squares line through each. The sizes of a series are timed
    in interleaved rounds, so a change in the machine's load falls on all of them alike
    instead of bending the line."""
    def job(n, steps):
        cell = make_cell("pgd", {"steps": steps, "early_stop": False}, threat)
        xs, ys = _tile(x, y, n)
        xs, ys = xs.to(bench.device), ys.to(bench.device)
        return lambda: craft(model, cell, xs, ys, device=bench.device, batch_size=bench.batch_size(), **bench.fast)

    log(f"scaling: images {size.scale_images} at {size.scale_fixed_steps} steps, "
        f"steps {size.scale_steps} at {size.scale_fixed_images} images")
    t_n = _median_times({n: job(n, size.scale_fixed_steps) for n in size.scale_images}, size.repeats, bench.device)[0]
    t_s = _median_times({s: job(size.scale_fixed_images, s) for s in size.scale_steps}, size.repeats, bench.device)[0]
    by_n = [{"images": n, "steps": size.scale_fixed_steps, "seconds": t_n[n]} for n in size.scale_images]
    by_s = [{"images": size.scale_fixed_images, "steps": s, "seconds": t_s[s]} for s in size.scale_steps]
    return {"images": by_n, "steps": by_s,
            "fit_images": _fit([r["images"] for r in by_n], [r["seconds"] for r in by_n]),
            "fit_steps": _fit([r["steps"] for r in by_s], [r["seconds"] for r in by_s])}


def _tile(x, y, n):
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n], y.repeat(reps)[:n]


def robust_digits_model(bench: Bench, size: PerfSize, log: Log):
    """A robust digits model trained here: pgd_at if registered, else logit_squeeze."""
    defense = "pgd_at" if "pgd_at" in DEFENSES.names() else "logit_squeeze"
    spec = RunSpec(defense, "digits", overrides=(f"epochs={size.robust_epochs}",))
    log(f"training the robust digits model ({defense}, {size.robust_epochs} epochs)")
    row, _ = ensure_checkpoint(bench, resolve(spec))
    return load_model(row, bench.device), {"defense": defense, "epochs": size.robust_epochs,
                                           "key": row.key, "train_seconds": row.train_seconds,
                                           "clean_acc": row.meta["clean_acc"]}


def matrix_timing(bench: Bench, size: PerfSize, log: Log, defense: str = "logit_squeeze") -> dict:
    """`bench run --defense <defense> --matrix <size.matrix>` in the perf's temporary
    results folder: training plus every cell, on the bench's fast path."""
    overrides = (f"epochs={size.matrix_epochs}",) if size.matrix_epochs else ()
    log(f"matrix: {defense} x {size.matrix} (train and every cell)")
    recipe = resolve(RunSpec(defense, "digits", overrides=overrides))
    t0 = time.perf_counter()
    error = None
    try:
        run_defense(bench, RunSpec(defense, "digits", overrides=overrides), size.matrix)
    except (RuntimeError, ValueError, BenchError) as exc:  # an attack that fails is reported, not fatal
        error = f"{type(exc).__name__}: {exc}"
        log(f"matrix: a cell failed ({error[:200]}); the cells before it are kept")
    wall = time.perf_counter() - t0
    row = bench.store.checkpoint(recipe.key)
    evals = bench.store.evaluations([row.id]) if row else []
    return {"defense": defense, "matrix": size.matrix, "cells": len(evals), "checkpoint": recipe.key,
            "error": error, "train_seconds": row.train_seconds if row else None,
            "attack_seconds": sum(e.seconds for e in evals), "wall_seconds": wall,
            "cell_seconds": {e.cell_key: e.seconds for e in evals},
            "robust_acc": {e.cell_key: e.robust_acc for e in evals}}


def matrix_in_fp32(bench: Bench, matrix: dict, log: Log) -> dict:
    """Every cell of the timed matrix again on the same checkpoint, crafted on the plain
    fp32 path: what the fast path's precision changes, cell by cell."""
    from bench.core.matrix import matrix_cells
    from bench.engine.evaluate import evaluate

    row = bench.store.checkpoint(matrix["checkpoint"])
    model = load_model(row, bench.device)
    spec = get_spec(row.dataset)
    x, y = load_dataset(row.dataset, "test", bench.data_root)
    log(f"matrix again in fp32 on the same checkpoint ({matrix['cells']} cells)")
    cells = {}
    for cell in matrix_cells(matrix["matrix"], spec.threat):
        if cell.key not in matrix["robust_acc"]:
            continue
        r = evaluate(model, cell, x, y, device=bench.device, batch_size=bench.batch_size())
        fast = matrix["robust_acc"].get(cell.key)
        cells[cell.key] = {"fp32": r["robust_acc"], "fast": fast, "fp32_seconds": r["seconds"],
                           "fast_seconds": matrix["cell_seconds"].get(cell.key)}
    diffs = [abs(c["fast"] - c["fp32"]) for c in cells.values() if c["fast"] is not None]
    return {"fast_path": bench.fast, "cells": cells, "max_abs_difference": max(diffs) if diffs else None,
            "fast_never_higher_by_more_than_half_a_point": all(
                c["fast"] - c["fp32"] <= 0.005 for c in cells.values() if c["fast"] is not None)}


# --- GPU -------------------------------------------------------------------------------
def flops_per_image(model, shape, device: str) -> dict:
    """Forward FLOPs and one PGD step's FLOPs (forward + input gradient) per image,
    counted by FlopCounterMode on a frozen model in fp32 (the count is the same in bf16)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 4
    x = torch.rand((n, *shape), device=device)
    with frozen(model):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(x)
        xg = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as step:
            loss = torch.nn.functional.cross_entropy(model(xg), torch.zeros(n, dtype=torch.long, device=device))
            loss.backward()  # only xg needs a gradient: the weights are frozen
    return {"forward": fwd.get_total_flops() / n, "pgd_step": step.get_total_flops() / n}


def matmul_peak(device: str, n: int = 8192) -> float:
    """bf16 TFLOP/s of a large matrix product on random data (the measured ceiling)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 10
    t, _ = _timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n ** 3 * reps / t / 1e12


def synthetic_cifar(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped data a network can learn: each class a smooth random colour pattern,
    under per-pixel noise. Only for timing and for comparing precisions; no claim about
    CIFAR itself."""
    g = torch.Generator().manual_seed(0)
    templates = torch.nn.functional.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32,
                                                mode="bilinear", align_corners=False)
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 + 0.25 * (templates[y] - 0.5) + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp_(0, 1).to(device), y.to(device)


def train_timing(bench: Bench, size: PerfSize, log: Log) -> tuple[dict, torch.nn.Module]:
    """Seconds per epoch of pgd_at-style 7-step PGD training of ResNet-18 on CIFAR-shaped
    synthetic data, through bench.engine.train with the bench's fast path."""
    from bench.engine.train import TrainConfig, TrainContext, train
    from defenses._parts import pgd_adversary

    spec = get_spec("cifar10")
    th = spec.threat
    x, y = synthetic_cifar(size.train_images, 1, bench.device)

    def at_loss(model, xb, yb, cfg, ctx):  # Madry et al.: the adversary's loss only
        xa = pgd_adversary(model, xb, yb, eps=th.eps, steps=7, step_size=th.step_size, generator=ctx.generator)
        return torch.nn.functional.cross_entropy(model(xa), yb)

    runs, kept = [], None
    for batch, epochs in size.train_runs:
        torch.manual_seed(0)
        model = build_model("resnet18", spec).to(bench.device)
        tcfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                           schedule="constant", augment="crop_flip")
        ctx = TrainContext(10, th, torch.Generator(device=bench.device).manual_seed(0))
        per_epoch = []
        for e in range(epochs):
            res = train(model, at_loss, None, tcfg, x, y, ctx, precision=bench.precision,
                        channels_last=bench.channels_last)
            _sync(bench.device)
            per_epoch.append(res.seconds)
            log(f"train resnet18 batch {batch}: epoch {e + 1} {res.seconds:.2f} s (loss {res.losses[-1]:.3f})")
        steady = per_epoch[1:] or per_epoch
        runs.append({"batch_size": batch, "images": len(x), "attack_steps": 7, "epoch_seconds": per_epoch,
                     "seconds_per_epoch": statistics.mean(steady),
                     "note": "first epoch includes warm-up" if len(per_epoch) > 1 else "one epoch, warm-up included"})
        if kept is None:
            kept = model
    # An epoch costs 8 forward and 8 backward passes per image (7 adversary steps, 1 update).
    return {"recipe": "ResNet-18, 7-step L-inf PGD training (eps 8/255, step 2/255), SGD, crop+flip",
            "data": "CIFAR-shaped synthetic (class colour patterns + noise)", "precision": bench.precision,
            "channels_last": bench.channels_last, "runs": runs}, kept.eval()


def gpu_models(bench: Bench, size: PerfSize, trained: torch.nn.Module | None, peak: float, log: Log) -> dict:
    spec = get_spec("cifar10")
    out: dict[str, Any] = {}
    x, y = synthetic_cifar(size.gpu_images, 2, bench.device)
    datasheet = out_peak(bench.device)
    for arch in size.gpu_archs:
        if arch == "resnet18" and trained is not None:
            model, weights = trained, "trained here (7-step PGD training, synthetic CIFAR-shaped data)"
        else:
            torch.manual_seed(0)
            model, weights = build_model(arch, spec).to(bench.device).eval(), "random (seeded init)"
        flops = flops_per_image(model, spec.shape, bench.device)
        batch = size.gpu_batch.get(arch, bench.batch_size())
        steps = size.gpu_steps
        total_flops = (steps * flops["pgd_step"] + flops["forward"]) * len(x)
        res: dict[str, Any] = {"weights": weights, "flops_per_image": flops, "images": len(x), "steps": steps,
                               "batch_size": batch, "pgd_flops_total": total_flops, "variants": {}}
        # (label, fast-path keywords, early stop); equal work (early stop off) is what the
        # FLOP rate and the targets are measured on.
        variants = [("default", bench.fast, False), ("default_early_stop", bench.fast, True)]
        if arch in size.gpu_fp32_archs:
            variants.append(("fp32_plain", {"precision": "fp32", "channels_last": False, "fold_bn": False,
                                            "compile": False, "exact_rewrites": False}, False))
        if bench.fold_bn and size.gpu_ablations:
            variants.append(("default_without_bn_folding", dict(bench.fast, fold_bn=False), False))
        if bench.channels_last and size.gpu_ablations:
            variants.append(("default_nchw", dict(bench.fast, channels_last=False), False))
        if size.gpu_compile and arch == "resnet18":
            variants.append(("default_compiled", dict(bench.fast, compile=True), False))
        for label, fast, early in variants:
            cell = make_cell("pgd", {"steps": steps, "early_stop": early}, spec.threat)
            log(f"{arch}: PGD-{steps} on {len(x)} images, {label}")
            f = lambda: craft(model, cell, x, y, device=bench.device, batch_size=batch, **fast)  # noqa: E731
            first, _ = _timed(f, bench.device)  # warm-up (and compiling, if asked)
            t, outs = _median_times({"t": f}, 1 if arch != "resnet18" else 2, bench.device)
            sec = t["t"]
            row = {"seconds": sec, "first_call_seconds": first, "fast_path": fast, "early_stop": early,
                   "images_steps_per_s": len(x) * steps / sec,
                   "robust_acc": _robust(model, outs["t"], x, y, bench)}
            if not early:
                row["achieved_tflops"] = total_flops / sec / 1e12
                row["fraction_of_measured_peak"] = row["achieved_tflops"] / peak
                if datasheet:
                    row["fraction_of_datasheet_peak"] = row["achieved_tflops"] / datasheet
            res["variants"][label] = row
            log(f"{arch} {label}: {sec:.2f} s ({row.get('achieved_tflops', float('nan')):.0f} TFLOP/s)")
        if arch == "resnet18":
            res["race"] = race(model, x, y, spec.threat, bench, steps=steps, repeats=1, batch_size=batch, log=log)
            if trained is not None:
                res["precision"] = precision_check(
                    model, x, y, spec.threat, bench, batch_size=batch, repeats=1, log=log,
                    cells=[{"steps": steps}, {"steps": steps, "loss": "cw"}])
        out[arch] = res
        del model
        torch.cuda.empty_cache()
    return out


def out_peak(device: str) -> float | None:
    """The datasheet's dense bf16 TFLOP/s for this device, where the table knows it."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


# --- the command -----------------------------------------------------------------------
def run_perf(device: str = "auto", as_json: bool = False, size: str | PerfSize = "default",
             threads: int | None = None, out=None, err=None) -> dict:
    """Measure everything above and print it; returns the same figures as a dict.

    On the CPU both contenders run on one torch thread unless `threads` says otherwise:
    the digits model's tensors are too small for a second OpenMP thread to pay, and on
    shared cores its spin-waits make every operation 10 to 20 times slower.
    """
    out = out or sys.stdout
    size = SIZES[size] if isinstance(size, str) else size
    before = torch.get_num_threads()
    if threads is None and resolve_device(device) == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        report = _measure(device, size, Log(err or sys.stderr))
    finally:
        torch.set_num_threads(before)
    if as_json:
        print(json.dumps(report, indent=1, default=float), file=out)
    else:
        print(render(report), file=out)
    return report


def _measure(device: str, size: PerfSize, log: Log) -> dict:
    import torchattacks

    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        bench = Bench.open(tmp, device=device)
        dev = bench.device
        report: dict[str, Any] = {
            "device": dev, "device_name": _device_label(dev), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchattacks": torchattacks.__version__, "size": dataclasses.asdict(size),
            "fast_path": bench.fast, "batch_size": bench.batch_size(),
        }
        log(f"device {report['device_name']}, fast path {bench.fast}")
        digits = get_spec("digits")
        model, info = robust_digits_model(bench, size, log)
        xt, yt = load_dataset("digits", "test")
        x, y = _tile(xt, yt, size.race_images)
        report["race"] = dict(race(model, x, y, digits.threat, bench, steps=size.race_steps, repeats=size.repeats,
                                   batch_size=bench.batch_size(), log=log), model=info)
        report["scaling"] = scaling(model, xt, yt, digits.threat, bench, size, log)
        report["matrix"] = matrix_timing(bench, size, log)
        if dev.startswith("cuda"):
            report["precision"] = precision_check(
                model, x.to(dev), y.to(dev), digits.threat, bench, batch_size=bench.batch_size(),
                repeats=1, log=log, cells=[{"steps": size.race_steps}, {"steps": size.race_steps, "loss": "cw"}])
            # Informative: on 360 digits one sample is 0.28 points, so a cell can move by
            # two samples through a different gradient path alone.
            report["precision"]["matrix"] = matrix_in_fp32(bench, report["matrix"], log)
            peak = matmul_peak(dev)
            log(f"bf16 matmul: {peak:.0f} TFLOP/s")
            train_report, trained = train_timing(bench, size, log)
            report["gpu"] = {"matmul_bf16_tflops": peak, "datasheet_bf16_tflops": out_peak(dev),
                             "train": train_report}
            report["gpu"]["models"] = gpu_models(bench, size, trained, peak, log)
            # The recommendation stands on every PGD comparison: digits and ResNet-18.
            checks = [report["precision"]] + [m["precision"] for m in report["gpu"]["models"].values()
                                              if "precision" in m]
            agree = all(c["bf16_agrees"] for c in checks)
            faster = sum(c["seconds"]["bf16"] for c in checks) < sum(c["seconds"]["fp32"] for c in checks)
            report["precision"]["overall"] = {"bf16_agrees": agree, "recommended": "bf16" if agree and faster else "fp32",
                                              "bench_default": bench.precision}
        else:
            report["precision"] = {"bench_default": bench.precision, "recommended": "fp32", "bf16_agrees": None,
                                   "note": "bf16 is never the default on the CPU; compare on a GPU"}
    return report


def _device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def render(r: dict) -> str:
    """The report as a few short tables of plain text."""
    lines = [f"bench perf on {r['device_name']} (torch {r['torch']}, torchattacks {r['torchattacks']}), "
             f"fast path {r['fast_path']}"]
    rc = r["race"]
    lines += ["", f"PGD race: {rc['images']} digits images x {rc['steps']} steps, eps {rc['eps']:g}, "
              f"step {rc['step_size']:g}, random start; model {rc['model']['defense']} "
              f"(clean {rc['model']['clean_acc']:.3f})",
              f"  {'':27} {'seconds':>9} {'img*steps/s':>12} {'robust acc':>10}"]
    for k in rc["seconds"]:
        lines.append(f"  {k:27} {rc['seconds'][k]:9.3f} {rc['images_steps_per_s'][k]:12.0f} {rc['robust_acc'][k]:10.4f}")
    lines.append(f"  ratio (torchattacks time / ours): {rc['ratio_equal_work']:.2f} at equal work, "
                 f"{rc['ratio_early_stop']:.2f} with early stop"
                 + (f"; {rc['ratio_equal_work_unrewritten']:.2f} at equal work without the exact graph rewrites"
                    if rc.get("ratio_equal_work_unrewritten") else ""))
    sc = r["scaling"]
    lines += ["", "Scaling (ours, early stop off):"]
    for key, unit in (("images", "images"), ("steps", "steps")):
        rows = sc[key]
        fit = sc[f"fit_{key}"]
        lines.append("  " + "  ".join(f"{row[unit]} {unit}: {row['seconds']:.3f}s" for row in rows))
        lines.append(f"  fit t = {fit['intercept_s']:.4f} + {fit['slope_s']:.6f} * {unit}  (R^2 {fit['r2']:.4f}); "
                     f"time ratios {', '.join(f'{t:.2f}' for t in fit['time_ratios'])} for size ratios "
                     f"{', '.join(f'{s:g}' for s in fit['size_ratios'])}")
    m = r["matrix"]
    lines += ["", f"Matrix {m['matrix']} on {m['defense']}: {m['cells']} cells, train {m['train_seconds'] or 0:.1f} s, "
              f"attacks {m['attack_seconds']:.1f} s, wall {m['wall_seconds']:.1f} s"
              + (f"; stopped by an error: {m['error']}" if m["error"] else "")]
    pm = r["precision"].get("matrix")
    if pm:
        lines.append(f"  the same cells crafted in fp32: largest robust-accuracy difference {pm['max_abs_difference']}")
    p = r["precision"]
    lines += ["", f"Precision: bench default {p['bench_default']}, recommended {p['recommended']}"
              + (f", bf16 agrees with fp32 within {p['tolerance'] * 100:g} points: {p['bf16_agrees']}" if "cells" in p else
                 f" ({p.get('note', '')})")]
    if "overall" in p:
        o = p["overall"]
        lines.append(f"  every PGD comparison (digits and ResNet-18): bf16 agrees {o['bf16_agrees']}, "
                     f"recommended {o['recommended']}, bench default {o['bench_default']}")
    for key, row in p.get("cells", {}).items():
        lines.append(f"  {key}: fp32 {row['fp32']['robust_acc']:.4f} ({row['fp32']['seconds']:.2f}s)  "
                     f"bf16 {row['bf16']['robust_acc']:.4f} ({row['bf16']['seconds']:.2f}s)")
    g = r.get("gpu")
    if g:
        lines += ["", f"GPU: bf16 matmul {g['matmul_bf16_tflops']:.0f} TFLOP/s measured, "
                  f"{g['datasheet_bf16_tflops']} datasheet"]
        for run in g["train"]["runs"]:
            lines.append(f"  train {g['train']['recipe']}, batch {run['batch_size']}: "
                         f"{run['seconds_per_epoch']:.2f} s/epoch on {run['images']} images "
                         f"(epochs {', '.join(f'{s:.2f}' for s in run['epoch_seconds'])})")
        for arch, res in g["models"].items():
            fl = res["flops_per_image"]
            lines.append(f"  {arch} ({res['weights']}): {fl['forward'] / 1e9:.2f} GFLOP forward, "
                         f"{fl['pgd_step'] / 1e9:.2f} GFLOP per PGD step, per image")
            for label, row in res["variants"].items():
                extra = (f", {row['achieved_tflops']:.0f} TFLOP/s = {row['fraction_of_measured_peak']:.0%} of measured peak"
                         if "achieved_tflops" in row else "")
                lines.append(f"    PGD-{res['steps']} x {res['images']} {label}: {row['seconds']:.2f} s "
                             f"(first call {row['first_call_seconds']:.1f} s){extra}, robust acc {row['robust_acc']:.4f}")
            if "race" in res:
                rr = res["race"]
                lines.append(f"    vs torchattacks (fp32): {rr['ratio_equal_work']:.2f}x at equal work, "
                             f"{rr['ratio_early_stop']:.2f}x with early stop")
            if "precision" in res:
                for key, row in res["precision"]["cells"].items():
                    lines.append(f"    precision {key}: fp32 {row['fp32']['robust_acc']:.4f}  bf16 {row['bf16']['robust_acc']:.4f}")
    return "\n".join(lines)
