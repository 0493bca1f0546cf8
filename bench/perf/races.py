"""The PGD comparisons of `bench perf` (on any device; gpu.py runs them on ResNet-18
too): the race of our PGD against torchattacks' PGD, the fp32 against bf16 check, and
how time scales with images and steps."""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from typing import Any

import torch

from bench.core.cells import make_cell
from bench.engine.cell import craft
from bench.engine.device import frozen
from bench.engine.fast import FastPath
from bench.engine.verdicts import predict
from bench.perf.sizes import PerfSize
from bench.perf.timing import Log, _fit, _median_times, _tile
from bench.run.workspace import Workspace


def _torchattacks_pgd(model, x, y, cfg, batch_size: int) -> torch.Tensor:
    # Imported here: torchattacks (and the scipy.stats it loads) takes about a second to
    # import, and only `bench perf`'s race needs it, never a run.
    import torchattacks

    atk = torchattacks.PGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, random_start=cfg.random_start)
    return torch.cat([atk(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _robust(model, x_adv, x, y, ws: Workspace) -> float:
    """Robust accuracy of (x_adv, x) verified in fp32, as bench.engine.cell.run_cell counts it."""
    bs = ws.batch_size()
    clean = predict(model, x, device=ws.device, batch_size=bs).argmax(1) == y.cpu()
    adv = predict(model, x_adv, device=ws.device, batch_size=bs).argmax(1) == y.cpu()
    return float((clean & adv).float().mean())


def race(
    model,
    x,
    y,
    threat,
    ws: Workspace,
    *,
    steps: int,
    repeats: int,
    batch_size: int,
    fast: FastPath | None = None,
    log: Log,
) -> dict:
    """Our PGD (craft, early stop off and on) against torchattacks' PGD, same inputs."""
    fast = ws.fast if fast is None else fast
    off = make_cell("pgd", {"steps": steps, "early_stop": False}, threat)
    on = make_cell("pgd", {"steps": steps}, threat)
    x, y = x.to(ws.device), y.to(ws.device)
    dev = ws.device

    def ours(cell, path=fast):
        return lambda: craft(model, cell, x, y, device=dev, batch_size=batch_size, seed=0, fast=path)

    def theirs():
        with frozen(model):
            return _torchattacks_pgd(model, x, y, on.config, batch_size)

    variants = {"torchattacks": theirs, "ours_equal_work": ours(off), "ours_early_stop": ours(on)}
    if fast.exact_rewrites:  # what the graph rewrites alone are worth
        variants["ours_equal_work_unrewritten"] = ours(off, replace(fast, exact_rewrites=False))
    log(f"race: {len(x)} images x {steps} steps, {repeats} timed rounds")
    t, outs = _median_times(variants, repeats, dev)
    work = len(x) * steps
    res = {
        "images": len(x),
        "steps": steps,
        "eps": on.config.eps,
        "step_size": on.config.step_size,
        "random_start": True,
        "batch_size": batch_size,
        "fast_path": asdict(fast),
        "seconds": t,
        "images_steps_per_s": {k: work / v for k, v in t.items()},
        "ratio_equal_work": t["torchattacks"] / t["ours_equal_work"],
        "ratio_early_stop": t["torchattacks"] / t["ours_early_stop"],
        "ratio_equal_work_unrewritten": (
            t["torchattacks"] / t["ours_equal_work_unrewritten"] if "ours_equal_work_unrewritten" in t else None
        ),
        "robust_acc": {k: _robust(model, v, x, y, ws) for k, v in outs.items()},
    }
    log(f"race: ratio {res['ratio_equal_work']:.2f} at equal work, {res['ratio_early_stop']:.2f} with early stop")
    return res


def precision_check(
    model, x, y, threat, ws: Workspace, *, cells: list[dict], batch_size: int, repeats: int, log: Log
) -> dict:
    """Robust accuracy crafted in fp32 and in bf16 on the same samples, with times; the
    recommended setting is the fastest whose accuracy is within half a point of fp32 on
    every cell."""
    out: dict[str, Any] = {"cells": {}, "tolerance": 0.005}
    settings = {"fp32": replace(ws.fast, precision="fp32"), "bf16": replace(ws.fast, precision="bf16")}
    seconds = {k: 0.0 for k in settings}
    agree = True
    for params in cells:
        cell = make_cell("pgd", params, threat)
        row = {}
        for name, fast in settings.items():
            t, outs = _median_times(
                {name: functools.partial(craft, model, cell, x, y, device=ws.device, batch_size=batch_size, fast=fast)},
                repeats,
                ws.device,
            )
            row[name] = {"seconds": t[name], "robust_acc": _robust(model, outs[name], x, y, ws)}
            seconds[name] += t[name]
        row["difference"] = row["bf16"]["robust_acc"] - row["fp32"]["robust_acc"]
        agree &= abs(row["difference"]) <= out["tolerance"]
        out["cells"][cell.key] = row
        log(f"precision {cell.key}: fp32 {row['fp32']['robust_acc']:.4f} bf16 {row['bf16']['robust_acc']:.4f}")
    out["seconds"] = seconds
    out["bf16_agrees"] = bool(agree)
    candidates = ["fp32"] + (["bf16"] if agree else [])
    out["recommended"] = min(candidates, key=lambda k: seconds[k])
    out["bench_default"] = ws.precision
    return out


def scaling(model, x, y, threat, ws: Workspace, size: PerfSize, log: Log) -> dict:
    """Seconds of our PGD (early stop off: equal work per image and step) as images and
    steps grow, with a least-squares line through each. The sizes of a series are timed
    in interleaved rounds, so a change in the machine's load falls on all of them alike
    instead of bending the line."""

    def job(n, steps):
        cell = make_cell("pgd", {"steps": steps, "early_stop": False}, threat)
        xs, ys = _tile(x, y, n)
        xs, ys = xs.to(ws.device), ys.to(ws.device)
        return lambda: craft(model, cell, xs, ys, device=ws.device, batch_size=ws.batch_size(), fast=ws.fast)

    log(
        f"scaling: images {size.scale_images} at {size.scale_fixed_steps} steps, "
        f"steps {size.scale_steps} at {size.scale_fixed_images} images"
    )
    t_n = _median_times({n: job(n, size.scale_fixed_steps) for n in size.scale_images}, size.repeats, ws.device)[0]
    t_s = _median_times({s: job(size.scale_fixed_images, s) for s in size.scale_steps}, size.repeats, ws.device)[0]
    by_n = [{"images": n, "steps": size.scale_fixed_steps, "seconds": t_n[n]} for n in size.scale_images]
    by_s = [{"images": size.scale_fixed_images, "steps": s, "seconds": t_s[s]} for s in size.scale_steps]
    return {
        "images": by_n,
        "steps": by_s,
        "fit_images": _fit([r["images"] for r in by_n], [r["seconds"] for r in by_n]),
        "fit_steps": _fit([r["steps"] for r in by_s], [r["seconds"] for r in by_s]),
    }
