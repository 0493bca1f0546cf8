"""The options several commands share, as typer annotations."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

Results = Annotated[str, typer.Option("--results", envvar="BENCH_RESULTS", help="Results folder (bench.db, checkpoints/).")]
Db = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL of the store (default: sqlite in --results).")]
DataRoot = Annotated[Optional[str], typer.Option("--data-root", envvar="BENCH_DATA", help="Folder holding MNIST/CIFAR/SVHN files.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Threads = Annotated[int, typer.Option("--threads", envvar="BENCH_THREADS",
                                      help="CPU threads for torch (default 1: reproducible weights on any machine; "
                                           "raise it for large models on a CPU).")]
Defense = Annotated[str, typer.Option("--defense", help="Defense name (`bench ls defenses`), or `all` for run.")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="Preset name (`bench ls presets`) or TOML file.")]
Set = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value (repeatable).")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="digits (default), mnist5k, mnist, cifar10, cifar100, svhn.")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Architecture (default: the dataset's).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of initialization, data order and noise.")]
Executor = Annotated[str, typer.Option("--executor", envvar="BENCH_EXECUTOR",
                                       help="Where trainings and cells run: local (this process) or ray (Ray tasks).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", envvar="BENCH_RAY_ADDRESS",
                                                   help="Ray cluster to join: auto or host:port (unset: start a local one).")]
RayGpus = Annotated[float, typer.Option("--ray-gpus", envvar="BENCH_RAY_GPUS",
                                        help="GPUs per Ray task on CUDA; a fraction shares a GPU (e.g. 0.25).")]
Matrix = Annotated[str, typer.Option("--matrix", help="quick, full, paper or a TOML file.")]
