"""AutoAttack (Croce & Hein, 2020) through the `pyautoattack` package.

The standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5,000
queries), each run only on the samples the earlier ones left unbroken. Every sample
keeps its own adversary (x itself where nothing broke it), so the cell stores
per-sample results like any other and enters the worst case.

Three things are done around the package so it behaves like a bench attack:
- Seeded from the cell's generator. pyautoattack seeds torch's global generator
  before each sub-attack, so the global state is saved and restored around the run.
- Its own sanity checks (randomized or dynamic model, probabilities instead of logits,
  zero gradients, Square beating the gradient attacks) go to the `auto-attack` logger,
  not to Python warnings; they are re-raised as `AutoAttackWarning`s so that
  bench.engine.evaluate.evaluate records them and flags.autoattack_warning fires. Nothing is
  printed (the package's stderr fallback for unhandled log records included).
- Its dynamic-defense check traces calls with sys.settrace and counts them in a
  module-level dict it never resets, so one traced model would make every later run
  in the process warn; the counts are zeroed before each run, and any tracer already
  installed (coverage, a debugger) is put back afterwards.
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, replace

import torch
from pyautoattack import AutoAttack as PackageAutoAttack
from pyautoattack import checks

from bench.plugin import NORMS, one_of, radius, register_attack, seed_from


class AutoAttackWarning(UserWarning):
    """One of pyautoattack's own sanity checks, as a Python warning."""


@dataclass(frozen=True)
class AutoAttack:
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    version: str = "standard"
    """pyautoattack's version: `standard` (APGD-CE, APGD-T, FAB-T, Square), `plus`
    (adds APGD-DLR and untargeted FAB, with 5 restarts each; slower) or `rand` (for
    randomized models: APGD-CE and APGD-DLR, each gradient averaged over 20 passes)."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        one_of("version", self.version, ("standard", "plus", "rand"))
        radius("eps", self.eps, self.norm)

    def with_threat(self, threat) -> "AutoAttack":
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"

    def for_randomized(self) -> "AutoAttack":
        """AutoAttack's own version for randomized models, which averages its gradients
        over passes itself (bench.science.adaptive then adds no EOT wrapper)."""
        return replace(self, version="rand")


class _ToWarnings(logging.Handler):
    """Collects the `auto-attack` logger's warnings while a run is in progress."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_autoattack(model, x, y, cfg: AutoAttack, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(x_adv, the package's warnings) for one batch; the global RNG is left untouched."""
    logger = logging.getLogger("auto-attack")
    handler = _ToWarnings()
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # its progress lines are debug/info: skip them
    tracer = sys.gettrace()
    for name in checks.funcs:
        checks.funcs[name] = 0
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        # fp32 whatever the caller's autocast: the cell must be the package's own result.
        with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
            attack = PackageAutoAttack(model, norm="Linf" if cfg.norm == "linf" else "L2", eps=cfg.eps,
                                       version=cfg.version, seed=seed, device=x.device)
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
    finally:
        sys.settrace(tracer)
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    return x_adv, handler.messages


@register_attack("autoattack", config=AutoAttack)
def perturb(model, x, y, cfg: AutoAttack, *, generator=None):
    """AutoAttack at the cell's eps, in the cell's version (standard, plus or rand),
    seeded from the generator."""
    x_adv, messages = run_autoattack(model, x, y, cfg, seed_from(generator))
    for message in dict.fromkeys(messages):
        warnings.warn(AutoAttackWarning(message), stacklevel=2)
    # Its sub-attacks clamp to [0, 1] themselves, so this is an exact no-op kept as a
    # guard; nothing else is touched (x + (x_adv - x) could move a pixel by a rounding
    # step and flip a borderline prediction against pyautoattack's own verdict).
    return x_adv.clamp(0, 1).detach()
