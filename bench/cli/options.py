"""The options several commands share, as typer annotations."""

from __future__ import annotations

from typing import Annotated

import typer

Results = Annotated[
    str,
    typer.Option("--results", envvar="BENCH_RESULTS", metavar="DIR", help="Results folder (bench.db, checkpoints/)."),
]
Db = Annotated[
    str | None, typer.Option("--db", metavar="URL", help="SQLAlchemy URL of the store (default: sqlite in --results).")
]
DataRoot = Annotated[
    str | None,
    typer.Option(
        "--data-root", envvar="BENCH_DATA", metavar="DIR", help="Folder holding MNIST, CIFAR, SVHN or ImageNet files."
    ),
]
Device = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto, cpu or cuda.")]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        metavar="N",
        help="Images per attack batch (default: 1024 on the CPU, 4096 on a GPU, fewer for images "
        "larger than CIFAR's: 20 and 83 for ImageNet).",
    ),
]
Threads = Annotated[
    int,
    typer.Option(
        "--threads",
        envvar="BENCH_THREADS",
        metavar="N",
        help="CPU threads for torch (default 1: reproducible weights on any machine; "
        "raise it for large models on a CPU).",
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        metavar="N",
        help="Train each checkpoint data-parallel on N Ray Train workers (one GPU each on "
        "cuda): each step's global batch is N times the batch size, and N enters the "
        "checkpoint key (default 1: one process, as always).",
    ),
]
Defense = Annotated[
    str, typer.Option("--defense", metavar="NAME", help="Defense name (`bench ls defenses`), or `all` for run.")
]
Preset = Annotated[
    str | None, typer.Option("--preset", metavar="NAME|FILE", help="Preset name (`bench ls presets`) or TOML file.")
]
Set = Annotated[
    list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a setting: key=value (repeatable).")
]
DATASET_NAMES = "digits, mnist5k, mnist, cifar10, cifar100, svhn, imagenet"
"""Every dataset of bench.core.data.DATASETS, written out because importing that module
imports torch, and `--help` must answer at once (tests/test_cli_output.py checks the list)."""
Dataset = Annotated[
    str | None,
    typer.Option("--dataset", metavar="NAME", help=f"{DATASET_NAMES} (default digits; `bench ls datasets`)."),
]
DatasetOf = Annotated[str, typer.Option("--dataset", metavar="NAME", help=f"{DATASET_NAMES} (`bench ls datasets`).")]
DatasetFilter = Annotated[
    str | None,
    typer.Option(
        "--dataset", metavar="NAME", help=f"Only checkpoints of this dataset: {DATASET_NAMES} (default: every dataset)."
    ),
]
Arch = Annotated[str | None, typer.Option("--arch", metavar="NAME", help="Architecture (default: the dataset's).")]
Eps = Annotated[
    float | None,
    typer.Option(
        "--eps",
        metavar="EPS",
        help="The run's own L-inf radius in [0, 1] pixel units (e.g. 0.1): every cell that sets "
        "no eps attacks at it, its step scaled with it; the worst case, bracket and flags "
        "of that radius sit beside the dataset's. Default: the matrix's eps, else the dataset's.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of initialization, data order and noise.")]
Executor = Annotated[
    str,
    typer.Option(
        "--executor",
        envvar="BENCH_EXECUTOR",
        metavar="local|ray",
        help="Where trainings and cells run: local (this process) or ray (Ray tasks).",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="BENCH_RAY_ADDRESS",
        metavar="auto|HOST:PORT",
        help="Ray cluster to join: auto or host:port (unset: start a local one).",
    ),
]
RayGpus = Annotated[
    float,
    typer.Option(
        "--ray-gpus",
        envvar="BENCH_RAY_GPUS",
        metavar="N",
        help="GPUs per Ray task on CUDA; a fraction shares a GPU (e.g. 0.25).",
    ),
]
Matrix = Annotated[
    str,
    typer.Option(
        "--matrix",
        metavar="NAME|FILE",
        help="quick, fast, full, paper, truth or a TOML file (`bench ls matrices` lists "
        "their cells). Default full, for run and eval alike: the standard matrix the "
        "boards and the worst case are meant for; fast is a cheap cascade for screening "
        "that escalates to full on masking; quick (FGSM, PGD-10/20) is a smoke test "
        "that overstates robustness.",
    ),
]
