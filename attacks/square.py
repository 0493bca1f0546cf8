"""Square Attack (Andriushchenko et al., 2020) through the `pyautoattack` package.

A query-based attack: it reads only the model's logits (random square-shaped updates at
the corners of the eps-ball, kept when the margin loss improves), so masked gradients
cannot stop it. AutoAttack runs it last and only on what its gradient attacks left
standing; as a cell of its own it runs on every sample, and enters the worst case like
any other cell. Seeded from the cell's generator; torch's global generator, which the
package reseeds, is saved and restored around the run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from pyautoattack.square import SquareAttack

from bench.plugin import NORMS, Crafted, Role, at_least, in_range, one_of, radius, register_attack, seed_from


@dataclass(frozen=True)
class Square:
    role: ClassVar[Role] = Role.QUERY
    """A black-box search, compared sample by sample with the white-box cells."""
    queries_only: ClassVar[bool] = True
    """Reads only the model's outputs: on a randomized model it faces the noise as it is,
    with no EOT wrapper around the model (bench.science.adaptive)."""
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    queries: int = 5000
    """Queries per sample at most (AutoAttack's standard version: 5,000)."""
    p_init: float = 0.8
    """Initial fraction of pixels a square covers (the paper's 0.8)."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        at_least("queries", self.queries, 1)
        radius("eps", self.eps, self.norm)
        in_range("p_init", self.p_init, 0, 1, low_open=True)

    def with_threat(self, threat) -> Square:
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"


@register_attack("square", config=Square)
def perturb(model, x, y, cfg: Square, *, generator=None) -> Crafted:
    """Square Attack on the margin loss, every sample, seeded from the generator."""
    devices = [x.device] if x.device.type == "cuda" else []
    seed = seed_from(generator)
    with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False), torch.no_grad():
        attack = SquareAttack(
            model,
            norm="Linf" if cfg.norm == "linf" else "L2",
            eps=cfg.eps,
            n_queries=cfg.queries,
            p_init=cfg.p_init,
            n_restarts=1,
            seed=seed,
            verbose=False,
            device=x.device,
        )
        x_adv = attack.perturb(x.float(), y)
    return Crafted(x_adv.clamp(0, 1).detach())
