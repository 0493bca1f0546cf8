"""What `bench perf` measures, in order: the robust digits model, the race, scaling, the
matrix, and on CUDA the precision checks and the GPU figures."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch

from bench.core.data import get_spec, load_dataset
from bench.core.matrix import load_matrix, matrix_cells
from bench.engine.cell import run_cell
from bench.errors import BenchError
from bench.perf.gpu import gpu_models, matmul_peak, out_peak, train_timing
from bench.perf.races import precision_check, race, scaling
from bench.perf.sizes import PerfSize
from bench.perf.timing import Log, _tile
from bench.registry import DEFENSES
from bench.run.driver import run_defense
from bench.run.recipe import TrainRequest, resolve
from bench.run.training import ensure_checkpoint, load_model
from bench.run.workspace import Workspace


def robust_digits_model(ws: Workspace, size: PerfSize, log: Log):
    """A robust digits model trained here: pgd_at if registered, else logit_squeeze."""
    defense = "pgd_at" if "pgd_at" in DEFENSES.names() else "logit_squeeze"
    spec = TrainRequest(defense, "digits", overrides=(f"epochs={size.robust_epochs}",))
    log(f"training the robust digits model ({defense}, {size.robust_epochs} epochs)")
    row, _ = ensure_checkpoint(ws, resolve(spec))
    return load_model(row, ws.device), {
        "defense": defense,
        "epochs": size.robust_epochs,
        "key": row.key,
        "train_seconds": row.train_seconds,
        "clean_acc": row.meta["clean_acc"],
    }


def matrix_timing(ws: Workspace, size: PerfSize, log: Log, defense: str = "logit_squeeze") -> dict:
    """`bench run --defense <defense> --matrix <size.matrix>` in the perf's temporary
    results folder: training plus every cell, on the bench's fast path."""
    overrides = (f"epochs={size.matrix_epochs}",) if size.matrix_epochs else ()
    log(f"matrix: {defense} x {size.matrix} (train and every cell)")
    recipe = resolve(TrainRequest(defense, "digits", overrides=overrides))
    t0 = time.perf_counter()
    error = None
    try:
        run_defense(ws, TrainRequest(defense, "digits", overrides=overrides), load_matrix(size.matrix))
    except (RuntimeError, ValueError, BenchError) as exc:  # an attack that fails is reported, not fatal
        error = f"{type(exc).__name__}: {exc}"
        log(f"matrix: a cell failed ({error[:200]}); the cells before it are kept")
    wall = time.perf_counter() - t0
    row = ws.store.checkpoint(recipe.key)
    evals = ws.store.evaluations([row.id]) if row else []
    return {
        "defense": defense,
        "matrix": size.matrix,
        "cells": len(evals),
        "checkpoint": recipe.key,
        "error": error,
        "train_seconds": row.train_seconds if row else None,
        "attack_seconds": sum(e.seconds for e in evals),
        "wall_seconds": wall,
        "cell_seconds": {e.cell_key: e.seconds for e in evals},
        "robust_acc": {e.cell_key: e.robust_acc for e in evals},
    }


def matrix_in_fp32(ws: Workspace, matrix: dict, log: Log) -> dict:
    """Every cell of the timed matrix again on the same checkpoint, crafted on the plain
    fp32 path: what the fast path's precision changes, cell by cell."""
    row = ws.store.checkpoint(matrix["checkpoint"])
    model = load_model(row, ws.device)
    spec = get_spec(row.dataset)
    x, y = load_dataset(row.dataset, "test", ws.data_root)
    log(f"matrix again in fp32 on the same checkpoint ({matrix['cells']} cells)")
    cells = {}
    for cell in matrix_cells(matrix["matrix"], spec.threat):
        if cell.key not in matrix["robust_acc"]:
            continue
        r = run_cell(model, cell, x, y, device=ws.device, batch_size=ws.batch_size(row.dataset))
        fast = matrix["robust_acc"].get(cell.key)
        cells[cell.key] = {
            "fp32": r.robust_acc,
            "fast": fast,
            "fp32_seconds": r.seconds,
            "fast_seconds": matrix["cell_seconds"].get(cell.key),
        }
    diffs = [abs(c["fast"] - c["fp32"]) for c in cells.values() if c["fast"] is not None]
    return {
        "fast_path": asdict(ws.fast),
        "cells": cells,
        "max_abs_difference": max(diffs) if diffs else None,
        "fast_never_higher_by_more_than_half_a_point": all(
            c["fast"] - c["fp32"] <= 0.005 for c in cells.values() if c["fast"] is not None
        ),
    }


def _measure(device: str, size: PerfSize, log: Log) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        ws = Workspace.open(tmp, device=device)
        dev = ws.device
        report: dict[str, Any] = {
            "device": dev,
            "device_name": _device_label(dev),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchattacks": importlib.metadata.version("torchattacks"),
            "size": dataclasses.asdict(size),
            "fast_path": asdict(ws.fast),
            "batch_size": ws.batch_size(),
        }
        log(f"device {report['device_name']}, fast path {asdict(ws.fast)}")
        digits = get_spec("digits")
        model, info = robust_digits_model(ws, size, log)
        xt, yt = load_dataset("digits", "test")
        x, y = _tile(xt, yt, size.race_images)
        report["race"] = dict(
            race(
                model,
                x,
                y,
                digits.threat,
                ws,
                steps=size.race_steps,
                repeats=size.repeats,
                batch_size=ws.batch_size(),
                log=log,
            ),
            model=info,
        )
        report["scaling"] = scaling(model, xt, yt, digits.threat, ws, size, log)
        report["matrix"] = matrix_timing(ws, size, log)
        if dev.startswith("cuda"):
            report["precision"] = precision_check(
                model,
                x.to(dev),
                y.to(dev),
                digits.threat,
                ws,
                batch_size=ws.batch_size(),
                repeats=1,
                log=log,
                cells=[{"steps": size.race_steps}, {"steps": size.race_steps, "loss": "cw"}],
            )
            # Informative: on 360 digits one sample is 0.28 points, so a cell can move by
            # two samples through a different gradient path alone.
            report["precision"]["matrix"] = matrix_in_fp32(ws, report["matrix"], log)
            peak = matmul_peak(dev)
            log(f"bf16 matmul: {peak:.0f} TFLOP/s")
            train_report, trained = train_timing(ws, size, log)
            report["gpu"] = {"matmul_bf16_tflops": peak, "datasheet_bf16_tflops": out_peak(dev), "train": train_report}
            report["gpu"]["models"] = gpu_models(ws, size, trained, peak, log)
            # The recommendation stands on every PGD comparison: digits and ResNet-18.
            checks = [report["precision"]] + [
                m["precision"] for m in report["gpu"]["models"].values() if "precision" in m
            ]
            agree = all(c["bf16_agrees"] for c in checks)
            faster = sum(c["seconds"]["bf16"] for c in checks) < sum(c["seconds"]["fp32"] for c in checks)
            report["precision"]["overall"] = {
                "bf16_agrees": agree,
                "recommended": "bf16" if agree and faster else "fp32",
                "bench_default": ws.precision,
            }
        else:
            report["precision"] = {
                "bench_default": ws.precision,
                "recommended": "fp32",
                "bf16_agrees": None,
                "note": "bf16 is never the default on the CPU; compare on a GPU",
            }
    return report


def _device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
