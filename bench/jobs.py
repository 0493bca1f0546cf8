"""Jobs: the units of work the driver hands to an executor. Each has `run() -> result`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bench.fastpath import evaluate
from bench.matrix import Cell


@dataclass
class EvalJob:
    """Attack one model with one cell on (x, y); returns the row the store keeps."""

    model: torch.nn.Module
    cell: Cell
    x: torch.Tensor
    y: torch.Tensor
    device: str
    batch_size: int
    seed: int = 0
    fast: dict = dataclasses.field(default_factory=dict)
    """Fast-path keywords for evaluate (see Bench.fast)."""

    def run(self) -> dict:
        return evaluate(self.model, self.cell, self.x, self.y, device=self.device,
                        batch_size=self.batch_size, seed=self.seed, **self.fast)
