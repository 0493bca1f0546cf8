"""How much `bench perf` measures: the sizes it knows by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    "tiny": PerfSize(
        race_images=48,
        race_steps=3,
        repeats=1,
        robust_epochs=1,
        matrix="quick",
        matrix_epochs=1,
        scale_images=(16, 32),
        scale_steps=(2, 4),
        scale_fixed_steps=2,
        scale_fixed_images=16,
        gpu_images=256,
        gpu_steps=2,
        gpu_archs=("resnet18",),
        gpu_batch={"resnet18": 128},
        gpu_compile=False,
        train_images=512,
        train_runs=((128, 1),),
    ),
}
