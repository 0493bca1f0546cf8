"""The commands: each parses its options, calls one function of bench.api and prints."""

from __future__ import annotations

from typing import Annotated

import typer

from bench.cli.app import app
from bench.cli.console import err, out
from bench.cli.options import (
    Arch,
    BatchSize,
    DataRoot,
    Dataset,
    DatasetFilter,
    DatasetOf,
    Db,
    Defense,
    Device,
    Eps,
    Executor,
    Matrix,
    Preset,
    RayAddress,
    RayGpus,
    Results,
    Seed,
    Set,
    Threads,
    Workers,
)
from bench.errors import BenchError

LIST_WIDTHS = {
    "defenses": (18, 0),
    "attacks": (18, 0),
    "matrices": (8, 0),
    "datasets": (9, 0, 14, 0),
    "presets": (40, 16, 9, 0),
}


def _load():
    """bench.api and the printing helpers, imported only once typer has checked the
    arguments: they import torch (seconds), and `--help` or a usage error must answer at
    once."""
    from bench import api
    from bench.cli import output

    return api, output


def _where(
    results="results",
    db=None,
    data_root=None,
    device="auto",
    threads=1,
    executor="local",
    ray_address=None,
    ray_gpus=1.0,
    batch_size=0,
):
    api, _ = _load()
    return api.Where(results, db, data_root, device, threads, executor, ray_address, ray_gpus, batch_size)


@app.command("ls")
def ls(
    what: Annotated[
        str, typer.Argument(metavar="WHAT", help="defenses, attacks, matrices, datasets or presets")
    ] = "defenses",
):
    """List defenses, attacks, matrices, datasets or presets."""
    api, output = _load()
    output.listing(api.listing(what), LIST_WIDTHS.get(what, ()))


@app.command("train")
def train_cmd(
    defense: Defense,
    preset: Preset = None,
    set_: Set = None,
    dataset: Dataset = None,
    arch: Arch = None,
    seed: Seed = 0,
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    threads: Threads = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    ray_gpus: RayGpus = 1.0,
    batch_size: BatchSize = 0,
    workers: Workers = 1,
):
    """Train (or find) the checkpoint of one recipe."""
    api, output = _load()
    request = api.TrainRequest(defense, dataset, preset, tuple(set_ or ()), arch, seed, workers)
    where = _where(results, db, data_root, device, threads, executor, ray_address, ray_gpus, batch_size)
    with output.progress() as progress:
        row, trained = api.train(request, where, progress)
    verb = "trained" if trained else "found"
    out.print(  # no markup: rich would take a key like [fe3fc99c662cc70f] for a style tag
        f"{verb} {row.defense} [{row.key}] clean accuracy {row.meta['clean_acc']:.4f} "
        f"({row.train_seconds:.1f} s training) at {row.path}",
        markup=False,
    )


@app.command("run")
def run_cmd(
    defense: Defense,
    matrix: Matrix = "full",
    eps: Eps = None,
    preset: Preset = None,
    set_: Set = None,
    dataset: Dataset = None,
    arch: Arch = None,
    seed: Seed = 0,
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    threads: Threads = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    ray_gpus: RayGpus = 1.0,
    batch_size: BatchSize = 0,
    workers: Workers = 1,
):
    """Train what is missing, run every missing cell of the matrix, print the results."""
    api, output = _load()
    request = api.TrainRequest(defense, dataset, preset, tuple(set_ or ()), arch, seed, workers)
    where = _where(results, db, data_root, device, threads, executor, ray_address, ray_gpus, batch_size)
    with output.progress() as progress:
        reports, rows = api.run(defense, matrix, request, where, progress, eps=eps)
    output.surrogates(reports[0].surrogates_trained if reports else [])
    failed = 0
    for report in reports:
        output.summary(
            report.checkpoint.defense,
            report.checkpoint.key,
            "trained" if report.trained else "checkpoint found",
            len(report.cells_run),
            report.cells_total,
            output.missing_cells(rows, report.checkpoint.key),
        )
        output.failures(report.failures)
        failed += len(report.failures)
    output.rows(rows, "table")
    if failed:
        output.failed_total(failed)
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            metavar="REF",
            help="MODULE:FUNCTION (FUNCTION returns an nn.Module returning logits; MODULE "
            "a module name, found in the current folder too, or a .py path), FILE.onnx, "
            "timm:NAME or torchvision:NAME (with --weights), or "
            "robustbench:DATASET/THREAT/NAME (weights from --robustbench-models).",
        ),
    ],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="The name your model goes by on the boards.")],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="FILE",
            help="The model's state_dict: .safetensors, or a torch checkpoint read weights-only (never "
            "a pickle that runs code).",
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            metavar="M[,M...]",
            help="Per-channel mean the network expects its inputs normalized by (with --std); "
            "default: the library's own for timm/torchvision, none otherwise.",
        ),
    ] = None,
    std: Annotated[str | None, typer.Option("--std", metavar="S[,S...]", help="Per-channel std, with --mean.")] = None,
    robustbench_models: Annotated[
        str | None,
        typer.Option(
            "--robustbench-models",
            metavar="DIR",
            help="RobustBench's models/ folder (<DIR>/<dataset>/<threat>/<NAME>.pt); default ./models.",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            metavar="NAME",
            help="digits, mnist5k, mnist, cifar10, cifar100, svhn, imagenet (default: the one a "
            "robustbench model names, else digits).",
        ),
    ] = None,
    matrix: Matrix = "full",
    eps: Eps = None,
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    threads: Threads = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    ray_gpus: RayGpus = 1.0,
    batch_size: BatchSize = 0,
):
    """Judge a model you hold (a factory, ONNX, timm, torchvision, RobustBench) with the same matrix."""
    api, output = _load()
    where = _where(results, db, data_root, device, threads, executor, ray_address, ray_gpus, batch_size)
    with output.progress() as progress:
        report, rows = api.eval_outside(
            model,
            name=name,
            dataset=dataset,
            matrix=matrix,
            weights=weights,
            mean=mean,
            std=std,
            robustbench_models=robustbench_models,
            where=where,
            progress=progress,
            eps=eps,
        )
    output.surrogates(report.surrogates_trained)
    output.summary(
        name,
        report.checkpoint.key,
        "added" if report.added else "found",
        len(report.cells_run),
        report.cells_total,
        output.missing_cells(rows, report.checkpoint.key),
    )
    output.failures(report.failures)
    output.rows(rows, "table")
    if report.failures:
        output.failed_total(len(report.failures))
        raise typer.Exit(1)


@app.command("results")
def results_cmd(
    format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="table|wide|csv|json",
            help="table (short cell names, percent), wide (the same with "
            "canonical cell keys), csv or json (canonical keys, "
            "fractions).",
        ),
    ] = "table",
    defense: Annotated[
        str | None,
        typer.Option("--defense", metavar="NAME", help="Only checkpoints of this defense (default: every one)."),
    ] = None,
    dataset: DatasetFilter = None,
    results: Results = "results",
    db: Db = None,
):
    """Print stored results: each checkpoint's worst case, then every cell."""
    if format not in ("table", "wide", "csv", "json"):
        raise BenchError(f"--format must be table, wide, csv or json, got {format!r}")
    api, output = _load()
    output.rows(api.results(_where(results, db), defense=defense, dataset=dataset), format)


@app.command("diagnose")
def diagnose_cmd(
    defense: Annotated[
        str, typer.Option("--defense", metavar="NAME|KEY|all", help="Defense name, checkpoint key (prefix), or all.")
    ],
    format: Annotated[str, typer.Option("--format", metavar="table|json", help="table or json.")] = "table",
    dataset: DatasetFilter = None,
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    threads: Threads = 1,
):
    """Shafahi et al.'s Table 1 row: logit gap, gradient gap, epsilon_L, predicted vs measured accuracy."""
    if format not in ("table", "json"):
        raise BenchError(f"--format must be table or json, got {format!r}")
    api, output = _load()
    output.diagnosis(api.diagnose(defense, dataset, _where(results, db, data_root, device, threads)), format)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", metavar="KEY", help="The checkpoint's key, or a prefix of it.")
    ],
    path: Annotated[str, typer.Option("--out", metavar="FILE.pt", help="Where to write the tensor (torch.save).")],
    threat: Annotated[
        str | None,
        typer.Option(
            "--threat", metavar="THREAT", help="The worst case's threat model (default the checkpoint's own)."
        ),
    ] = None,
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
):
    """Write a worst case's adversarial inputs, index-aligned with the test set (RobustBench's layout)."""
    api, _ = _load()
    done = api.export(checkpoint, path, threat, _where(results, db, data_root, "cpu", 1))
    out.print(
        f"wrote {path}: {tuple(done.inputs.shape)} float32, {done.replaced} adversarial inputs; "
        f"worst case {done.threat} {100 * done.robust_acc:.2f}%",
        highlight=False,
    )


@app.command("transfer")
def transfer_cmd(
    source: Annotated[
        str, typer.Option("--source", metavar="NAME|KEY|all", help="Defense name, checkpoint key, or all.")
    ],
    target: Annotated[
        str, typer.Option("--target", metavar="NAME|KEY|all", help="Defense name, checkpoint key, or all.")
    ] = "all",
    attack: Annotated[
        str | None, typer.Option("--attack", metavar="CELL", help="Cell key to craft with (default PGD-10).")
    ] = None,
    dataset: DatasetOf = "digits",
    results: Results = "results",
    db: Db = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    threads: Threads = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    ray_gpus: RayGpus = 1.0,
    batch_size: BatchSize = 0,
):
    """Black-box transfer: craft on each source checkpoint, evaluate every target on it."""
    api, output = _load()
    where = _where(results, db, data_root, device, threads, executor, ray_address, ray_gpus, batch_size)
    with output.progress() as progress:
        report = api.transfer(source, target, attack, dataset, where, progress)
    err.print(
        f"crafted {report.crafted} source set(s), reused {report.reused}; evaluated "
        f"{report.evaluated} source/target pair(s), {report.skipped} already stored",
        markup=False,
    )
    output.grid(report.grid)


@app.command("perf")
def perf_cmd(
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object for machines.")] = False,
    device: Device = "auto",
    size: Annotated[
        str,
        typer.Option(
            "--size", metavar="default|tiny", help="default (a few minutes on 2 CPU cores) or tiny (a smoke test)."
        ),
    ] = "default",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            metavar="N",
            help="CPU threads for torch (default: 1 on the CPU, where the digits model is too small for more to pay).",
        ),
    ] = None,
):
    """Time our attacks against torchattacks on the same model and inputs, and the fast path."""
    api, _ = _load()
    api.perf(device=device, as_json=as_json, size=size, threads=threads)


@app.command("site")
def site_cmd(
    out_dir: Annotated[
        str, typer.Option("--out", metavar="DIR", help="Folder to write the static site into.")
    ] = "site",
    results: Results = "results",
    db: Db = None,
):
    """Render the static leaderboard from the store (reads only the store, writes only --out)."""
    api, _ = _load()
    out.print(f"wrote the leaderboard to {api.site(out_dir, _where(results, db))}")
