"""`bench perf`: attack steps per second, and whether the fast path is honest.

One process, one model and one set of inputs per comparison:

- race: our PGD (through `bench.engine.cell.craft`, the path every cell takes) against
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

Where each part lives: `sizes` (how much is measured), `timing` (clocks and fits),
`races` (the race, the precision check, scaling), `gpu` (the CUDA-only figures),
`measure` (the order of it all), `render` (the text report); `run_perf` here.
"""

from __future__ import annotations

import json
import sys

import torch

from bench.engine.device import resolve_device
from bench.perf.measure import _measure
from bench.perf.render import render
from bench.perf.sizes import SIZES, PerfSize
from bench.perf.timing import Log

__all__ = ["SIZES", "PerfSize", "run_perf"]


# --- the command -----------------------------------------------------------------------
def run_perf(
    device: str = "auto",
    as_json: bool = False,
    size: str | PerfSize = "default",
    threads: int | None = None,
    out=None,
    err=None,
) -> dict:
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
