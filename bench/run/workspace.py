"""Workspace: the environment a command runs in (results folder, store, device and fast-path
settings). Every stage of a run takes one."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.data import get_spec
from bench.engine.device import check_precision, default_precision, resolve_device
from bench.engine.fast import FastPath
from bench.engine.outcome import CellOutcome
from bench.errors import BenchError
from bench.store.db import Checkpoint, Store
from bench.store.examples import examples_path, write_examples

BATCH_PIXELS = 3 * 32 * 32
"""The image size (CIFAR's) up to which the default batches hold their whole size."""


@dataclass
class Workspace:
    """Where a command's work is kept and how it runs: the results folder, the store, the
    device and the fast path. Every stage of a run takes one (`ws`)."""

    results: Path
    store: Store
    device: str
    data_root: str | None
    progress: Any = None
    """A rich Progress (or None) to show training and attack progress on."""
    eval_batch: int = 0
    """Evaluation batch size (--batch-size); 0 picks one for the device and the image size."""
    precision: str = ""
    """The fast path's arithmetic for crafting attacks and for training: `fp32`, or `bf16`
    (autocast; weights and the attack's iterates stay fp32). Empty picks the device's
    default: bf16 on a CUDA device that has it (`bench perf` checks that PGD's robust
    accuracy agrees with fp32 within half a point), fp32 on the CPU, always. Stored
    accuracies are verified in fp32 whatever crafted the inputs."""
    channels_last: bool | None = None
    """NHWC activations and weights for convolutions; unset means on for CUDA, off on the
    CPU (where fp32 results must stay bit for bit what they were)."""
    fold_bn: bool | None = None
    """Attack a copy of the frozen model with each eval-mode batch norm folded into the
    convolution before it (the same function, a third fewer memory passes); unset means
    on for CUDA, off on the CPU."""
    compile: bool = False
    """torch.compile the model for attacks (off by default: it costs about a minute per
    model; `bench perf` times it)."""
    exact_rewrites: bool = True
    """Rewrite the frozen model's graph in ways that change no bit of any logit or input
    gradient (ReLU after max pooling; CPU max pooling in NHWC; see bench.engine.rewrite). On
    everywhere; off only to measure what it saves."""

    def __post_init__(self):
        if not self.precision:
            self.precision = default_precision(self.device)
        check_precision(self.precision)
        if self.channels_last is None:
            self.channels_last = self.device.startswith("cuda")
        if self.fold_bn is None:
            self.fold_bn = self.device.startswith("cuda")

    @property
    def fast(self) -> FastPath:
        """The fast path of craft and run_cell, as this workspace sets it."""
        return FastPath(
            precision=self.precision,
            channels_last=self.channels_last,
            fold_bn=self.fold_bn,
            compile=self.compile,
            exact_rewrites=self.exact_rewrites,
        )

    @classmethod
    def open(
        cls,
        results: str | os.PathLike,
        db: str | None = None,
        device: str = "auto",
        data_root: str | None = None,
        progress: Any = None,
        **fast: Any,
    ) -> Workspace:
        path = Path(results)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise BenchError(
                f"results folder {str(path)!r} is not writable ({exc.strerror}); "
                "pass --results DIR or set BENCH_RESULTS to a folder you can write"
            ) from exc
        return cls(path, Store.for_results(path, db), resolve_device(device), data_root, progress, **fast)

    def commit_cell(self, row: Checkpoint, outcome: CellOutcome) -> None:
        """Store one cell of a checkpoint: the inputs that broke its images beside the
        checkpoint first (bench.store.examples), then its row, so that no stored row lacks
        the examples it kept."""
        # A plain cell run with the folder to keep them in wrote them as it judged.
        if outcome.breaks is not None and outcome.breaks.kept != examples_path(row.path, outcome.cell_key):
            write_examples(row.path, outcome.cell_key, outcome.threat, outcome.breaks)
        self.store.add_evaluation(row.id, **outcome.row_fields())

    def batch_size(self, dataset: str | None = None) -> int:
        """The evaluation batch: `eval_batch` (--batch-size) where set, else one for the
        device, whole up to CIFAR's image size and shrunk in proportion above it (ImageNet's
        224 px: 20 on the CPU, 83 on a GPU). At 1,024 images of 224 px each tensor of a
        batch is 0.6 GB, and an attack and its admission checks hold several at once: a
        one-FGSM evaluation of 5,000 images peaked at 4.8 GiB (benchmarks/imagenet_io.py)."""
        if self.eval_batch:
            return self.eval_batch
        base = 4096 if self.device.startswith("cuda") else 1024
        if dataset is None:
            return base
        return max(1, min(base, base * BATCH_PIXELS // math.prod(get_spec(dataset).shape)))
