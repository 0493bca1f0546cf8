"""Clocks for `bench perf`: its progress log, synchronised timing, interleaved medians,
least-squares lines, and tiling inputs to a size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


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
    return {
        "slope_s": float(slope),
        "intercept_s": float(intercept),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "time_ratios": [t / ts[0] for t in ts],
        "size_ratios": [x / xs[0] for x in xs],
    }


def _tile(x, y, n):
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n], y.repeat(reps)[:n]
