"""What every attack run through the `pyautoattack` package shares (AutoAttack, APGD,
APGD-T): the conditions under which the package behaves like a bench attack.

- Seeded, and the global RNG left alone. The package seeds torch's global generators
  (`torch.random.manual_seed` before each sub-attack) and draws its random starts from
  them, so their state is saved and restored around the run (`fork_rng`, the CPU
  generator and the batch's CUDA device).
- fp32 whatever the caller's autocast: the cell must be the package's own result.
- Quiet, with its sanity checks kept. The checks (randomized or dynamic model,
  probabilities instead of logits, zero gradients, Square beating the gradient attacks)
  log to the `auto-attack` logger; while a run is in progress that logger's only
  handler collects them, and `reraise` turns them into `AutoAttackWarning`s, which
  bench.engine.cell.run_cell records with the cell. Nothing is printed (the
  package's stderr fallback for unhandled log records included).
- Its dynamic-defense check traces calls with sys.settrace and counts them in a
  module-level dict it never resets, so one traced model would make every later run in
  the process warn; the counts are zeroed before each run, and any tracer already
  installed (coverage, a debugger) is put back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import torch
from pyautoattack import checks

LOGGER = "auto-attack"
"""The logger the package's checks write to (pyautoattack.autoattack.AutoAttack's own)."""


class AutoAttackWarning(UserWarning):
    """One of pyautoattack's own sanity checks, as a Python warning."""


class _ToWarnings(logging.Handler):
    """Collects the `auto-attack` logger's warnings while a run is in progress."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def package_run(x: torch.Tensor) -> Iterator[list[str]]:
    """The context of one run of the package on the batch `x`; yields the list the
    package's warnings are collected into (filled as the run goes)."""
    logger = logging.getLogger(LOGGER)
    handler = _ToWarnings()
    saved = (logger.handlers[:], logger.propagate, logger.level, logger.disabled)
    logger.handlers[:] = [handler]
    logger.propagate = False
    # logging.config.dictConfig disables every logger that exists when it runs unless told
    # otherwise (import-linter's CLI does so in-process): the checks must still be heard.
    logger.disabled = False
    logger.setLevel(logging.WARNING)  # its progress lines are debug/info: skip them
    tracer = sys.gettrace()
    for name in checks.funcs:
        checks.funcs[name] = 0
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
            yield handler.messages
    finally:
        sys.settrace(tracer)
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
        logger.disabled = saved[3]


def reraise(messages: list[str]) -> None:
    """Each distinct message of a run once, as an AutoAttackWarning."""
    for message in dict.fromkeys(messages):
        warnings.warn(AutoAttackWarning(message), stacklevel=3)
