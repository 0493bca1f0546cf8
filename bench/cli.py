"""The `bench` command line: thin; each subcommand calls one library function.

Exit status 0 on success; 2 on bad input, with one line saying what was wrong and how
to mend it, and no traceback unless --debug.
"""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from bench.errors import BenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train defended classifiers, attack them with a standard matrix, keep every number.")
# Piped output (CI logs, `| less`) gets a wide console so cell keys are not folded.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

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
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="digits (default), mnist, cifar10, cifar100, svhn.")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Architecture (default: the dataset's).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of initialization, data order and noise.")]
Executor = Annotated[str, typer.Option("--executor", envvar="BENCH_EXECUTOR",
                                       help="Where trainings and cells run: local (this process) or ray (Ray tasks).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", envvar="BENCH_RAY_ADDRESS",
                                                   help="Ray cluster to join: auto or host:port (unset: start a local one).")]
RayGpus = Annotated[float, typer.Option("--ray-gpus", envvar="BENCH_RAY_GPUS",
                                        help="GPUs per Ray task on CUDA; a fraction shares a GPU (e.g. 0.25).")]
MAX_THREADS = 1024
"""More than any machine has; torch overflows on values past a C int."""


def _bench(results, db, device, data_root, progress=None, threads: int = 1):
    import torch

    from bench.run.bench import Bench

    # One thread by default: the intra-op thread count changes float summation order and
    # so the trained weights, and on shared cores OpenMP threads spin-waiting for each
    # other made a digits run twenty times slower (see tests/conftest.py).
    if not 1 <= threads <= MAX_THREADS:
        raise BenchError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    torch.set_num_threads(threads)
    return Bench.open(results, db=db, device=device, data_root=data_root, progress=progress)


def _executor(kind: str, ray_address: str | None, threads: int, ray_gpus: float):
    """The executor the options ask for (a context manager: a local Ray cluster it starts
    is stopped on exit). Each Ray task gets --threads CPUs and as many torch threads."""
    from bench.run.executors import make_executor

    return make_executor(kind, ray_address=ray_address, threads=threads, gpus_per_task=ray_gpus)


def _progress():
    """Progress bars on a terminal; nothing in logs and pipes, where bars are noise."""
    import contextlib

    if not err.is_terminal:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True)


@app.command("ls")
def ls(what: Annotated[str, typer.Argument(help="defenses, attacks, matrices, datasets or presets")] = "defenses"):
    """List defenses, attacks, matrices, datasets or presets."""
    from bench.core.data import DATASETS
    from bench.core.matrix import BUILTIN, load_matrix
    from bench.core.presets import all_presets
    from bench.registry import ATTACKS, DEFENSES

    if what == "defenses":
        for name in DEFENSES.names():
            out.print(f"{name:18} {DEFENSES.get(name).doc.splitlines()[0] if DEFENSES.get(name).doc else ''}")
    elif what == "attacks":
        for name in ATTACKS.names():
            out.print(f"{name:18} {ATTACKS.get(name).doc.splitlines()[0] if ATTACKS.get(name).doc else ''}")
    elif what == "matrices":
        for name in BUILTIN:
            out.print(f"{name:8} {len(load_matrix(name)[1])} cell tables")
    elif what == "datasets":
        for name, spec in DATASETS.items():
            out.print(f"{name:9} {spec.num_classes:3} classes  {spec.threat.name:14} arch {spec.default_arch}")
    elif what == "presets":
        for name, p in all_presets().items():
            out.print(f"{name:40} {p.defense:16} {p.dataset:9} {p.source}")
    else:
        raise BenchError(f"cannot list {what!r}: choose defenses, attacks, matrices, datasets or presets")


@app.command("train")
def train_cmd(defense: Defense, preset: Preset = None, set_: Set = None, dataset: Dataset = None,
              arch: Arch = None, seed: Seed = 0, results: Results = "results", db: Db = None,
              data_root: DataRoot = None, device: Device = "auto", threads: Threads = 1,
              executor: Executor = "local", ray_address: RayAddress = None, ray_gpus: RayGpus = 1.0):
    """Train (or find) the checkpoint of one recipe."""
    from bench.run.recipe import RunSpec, resolve
    from bench.run.driver import ensure_checkpoint

    spec = RunSpec(defense, dataset, preset, tuple(set_ or ()), arch, seed)
    recipe = resolve(spec)
    with _progress() as progress:
        bench = _bench(results, db, device, data_root, progress, threads)
        with _executor(executor, ray_address, threads, ray_gpus) as ex:
            row, trained = ensure_checkpoint(bench, recipe, ex)
    verb = "trained" if trained else "found"
    out.print(f"{verb} {row.defense} [{row.key}] clean accuracy {row.meta['clean_acc']:.4f} "
              f"({row.train_seconds:.1f} s training) at {row.path}")


@app.command("run")
def run_cmd(defense: Defense, matrix: Annotated[str, typer.Option("--matrix", help="quick, full, paper or a TOML file.")] = "quick",
            preset: Preset = None, set_: Set = None, dataset: Dataset = None, arch: Arch = None,
            seed: Seed = 0, results: Results = "results", db: Db = None,
            data_root: DataRoot = None, device: Device = "auto", threads: Threads = 1,
            executor: Executor = "local", ray_address: RayAddress = None, ray_gpus: RayGpus = 1.0):
    """Train what is missing, run every missing cell of the matrix, print the results."""
    from bench.registry import DEFENSES
    from bench.reporting.results import result_rows
    from bench.run.recipe import RunSpec
    from bench.run.driver import plan_run, run_defenses

    names = DEFENSES.names() if defense == "all" else [defense]
    if defense != "all":
        DEFENSES.get(defense)
    specs = [RunSpec(name, dataset, preset if defense != "all" else None, tuple(set_ or ()), arch, seed)
             for name in names]
    for spec in specs:  # every recipe and cell checked before the store is opened
        plan_run(spec, matrix, data_root)
    with _progress() as progress:
        bench = _bench(results, db, device, data_root, progress, threads)
        with _executor(executor, ray_address, threads, ray_gpus) as ex:
            reports = run_defenses(bench, specs, matrix, ex)
    failed = 0
    for spec, report in zip(specs, reports):
        err.print(f"{spec.defense} [{report.checkpoint.key[:8]}]: "
                  f"{'trained' if report.trained else 'checkpoint found'}, "
                  f"{len(report.cells_run)} of {report.cells_total} cells run", markup=False)
        for cell, reason in report.failures.items():
            err.print(f"  failed {cell}: {reason}", markup=False, highlight=False, soft_wrap=True)
            failed += 1
    _print_rows(result_rows(bench.store, checkpoint_keys={r.checkpoint.key for r in reports}), "table")
    if failed:
        err.print(f"{failed} cell(s) failed (reasons above); the others are stored. Fix the attack "
                  "and run again to fill them in", markup=False)
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(model: Annotated[str, typer.Option("--model", help="MODULE:FUNCTION; FUNCTION returns an nn.Module "
                                                "taking [0, 1] inputs and returning logits. MODULE is a module "
                                                "name or a .py path.")],
             name: Annotated[str, typer.Option("--name", help="The name your model goes by on the boards.")],
             weights: Annotated[Optional[str], typer.Option("--weights", help="A .safetensors file of the model's "
                                                            "state_dict (never a pickle).")] = None,
             dataset: Annotated[str, typer.Option("--dataset", help="digits (default), mnist, cifar10, cifar100, svhn.")] = "digits",
             matrix: Annotated[str, typer.Option("--matrix", help="quick, full, paper or a TOML file.")] = "full",
             results: Results = "results", db: Db = None, data_root: DataRoot = None, device: Device = "auto",
             threads: Threads = 1, executor: Executor = "local", ray_address: RayAddress = None,
             ray_gpus: RayGpus = 1.0):
    """Judge your own model with the same matrix; stored by name and weights hash."""
    import torch

    from bench.core.matrix import matrix_cells
    from bench.run.outside import evaluate_outside, prepare
    from bench.reporting.results import result_rows
    from bench.run.surrogates import check_transfer

    torch.set_num_threads(max(threads, 1))
    # Everything the user gave is checked before the results folder or store is touched.
    candidate = prepare(model, name, dataset, weights, data_root)
    matrix_cells(matrix, candidate.dataset.threat)
    check_transfer(matrix, candidate.dataset)
    with _progress() as progress:
        bench = _bench(results, db, device, data_root, progress, threads)
        with _executor(executor, ray_address, threads, ray_gpus) as ex:
            report = evaluate_outside(bench, candidate, matrix, ex)
    err.print(f"{name} [{report.checkpoint.key[:8]}]: {'added' if report.added else 'found'}, "
              f"{len(report.cells_run)} of {report.cells_total} cells run", markup=False)
    for cell, reason in report.failures.items():
        err.print(f"  failed {cell}: {reason}", markup=False, highlight=False, soft_wrap=True)
    _print_rows(result_rows(bench.store, checkpoint_keys={report.checkpoint.key}), "table")
    if report.failures:
        err.print(f"{len(report.failures)} cell(s) failed (reasons above); the others are stored. Fix the "
                  "attack and run again to fill them in", markup=False)
        raise typer.Exit(1)


@app.command("results")
def results_cmd(format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
                defense: Annotated[Optional[str], typer.Option("--defense")] = None,
                dataset: Dataset = None, results: Results = "results", db: Db = None):
    """Print stored results: every cell, plus each checkpoint's worst case."""
    from bench.reporting.results import result_rows

    if format not in ("table", "csv", "json"):
        raise BenchError(f"--format must be table, csv or json, got {format!r}")
    bench = _bench(results, db, "cpu", None)
    _print_rows(result_rows(bench.store, defense=defense, dataset=dataset), format)


@app.command("diagnose")
def diagnose_cmd(defense: Annotated[str, typer.Option("--defense", help="Defense name, checkpoint key (prefix), or all.")],
                 format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
                 dataset: Dataset = None, results: Results = "results", db: Db = None,
                 data_root: DataRoot = None, device: Device = "auto", threads: Threads = 1):
    """Shafahi et al.'s Table 1 row: logit gap, gradient gap, epsilon_L, predicted vs measured accuracy."""
    from bench.reporting.diagnosis import diagnose_rows

    if format not in ("table", "json"):
        raise BenchError(f"--format must be table or json, got {format!r}")
    bench = _bench(results, db, device, data_root, None, threads)
    rows = diagnose_rows(bench, defense, dataset)
    if format == "json":
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    def num(v, fmt):
        return "" if v is None else f"{v:{fmt}}"

    table = Table(title="linearized robustness (Shafahi et al. Eq. 4, Table 1), medians over the test set")
    for col in ("defense", "checkpoint", "dataset", "eps", "logit gap", "gradient gap", "eps_L", "coherence",
                "predicted", "FGSM", "PGD"):
        table.add_column(col, justify="left" if col in ("defense", "checkpoint", "dataset") else "right")
    for r in rows:
        table.add_row(r["defense"], r["checkpoint"][:8], r["dataset"], f"{r['eps']:g}",
                      num(r["median_logit_gap"], ".3g"), num(r["median_grad_gap"], ".3g"),
                      num(r["median_eps_l"], ".3g"), num(r["median_coherence"], ".2f"),
                      num(r["predicted_acc"], ".3f"), num(r["fgsm_acc"], ".3f"), num(r["pgd_acc"], ".3f"))
    out.print(table)


@app.command("transfer")
def transfer_cmd(source: Annotated[str, typer.Option("--source", help="Defense name, checkpoint key, or all.")],
                 target: Annotated[str, typer.Option("--target", help="Defense name, checkpoint key, or all.")] = "all",
                 attack: Annotated[Optional[str], typer.Option("--attack", help="Cell key to craft with (default PGD-10).")] = None,
                 dataset: Annotated[str, typer.Option("--dataset")] = "digits",
                 results: Results = "results", db: Db = None, data_root: DataRoot = None, device: Device = "auto",
                 threads: Threads = 1, executor: Executor = "local", ray_address: RayAddress = None,
                 ray_gpus: RayGpus = 1.0):
    """Black-box transfer: craft on each source checkpoint, evaluate every target on it."""
    from bench.run.transfer import run_transfers

    with _progress() as progress:
        bench = _bench(results, db, device, data_root, progress, threads)
        with _executor(executor, ray_address, threads, ray_gpus) as ex:
            report = run_transfers(bench, source, target, attack, dataset, executor=ex)
    err.print(f"crafted {report.crafted} source set(s), reused {report.reused}; "
              f"evaluated {report.evaluated} source/target pair(s), {report.skipped} already stored", markup=False)
    _print_grid(report.grid)


def _print_grid(grid: list[dict]) -> None:
    from rich.table import Table

    from rich.markup import escape  # names such as lrm[b425ac] are not markup

    sources = list(dict.fromkeys(g["source"] for g in grid))
    table = Table(title="robust accuracy of target (rows) on examples crafted on source (columns)")
    table.add_column("target \\ source")
    for s in sources:
        table.add_column(escape(s), justify="right")
    for t in dict.fromkeys(g["target"] for g in grid):
        cells = {g["source"]: g["robust_acc"] for g in grid if g["target"] == t}
        table.add_row(escape(t), *[f"{cells[s]:.3f}" if s in cells else "" for s in sources])
    out.print(table)


@app.command("perf")
def perf_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for machines.")] = False,
             device: Device = "auto",
             size: Annotated[str, typer.Option("--size", help="default (a few minutes on 2 CPU cores) or tiny (a smoke test).")] = "default",
             threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: 1 on the CPU, where the digits model is too small for more to pay).")] = None):
    """Time our attacks against torchattacks on the same model and inputs, and the fast path."""
    from bench.perf import SIZES, run_perf

    if size not in SIZES:
        raise BenchError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BenchError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    run_perf(device=device, as_json=as_json, size=size, threads=threads)


@app.command("site")
def site_cmd(out_dir: Annotated[str, typer.Option("--out", help="Folder to write the static site into.")] = "site",
             results: Results = "results", db: Db = None):
    """Render the static leaderboard from the store (reads only the store, writes only --out)."""
    from bench.reporting.site import build_site

    bench = _bench(results, db, "cpu", None)
    index = build_site(bench.store, out_dir)
    out.print(f"wrote the leaderboard to {index}")


def _print_rows(rows: list[dict], fmt: str) -> None:
    from bench.reporting.results import COLUMNS

    if fmt == "json":
        print(json.dumps(rows, indent=1))
        return
    if fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS + ["flags"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "flags": ";".join(r.get("flags", []))})
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("defense", "checkpoint", "attack", "clean", "robust", "n", "s"):
        table.add_column(col, justify="right" if col in ("clean", "robust", "n", "s") else "left",
                         overflow="fold")
    for r in rows:
        attack = r["attack"]
        if attack == "worst_case" and r.get("flags"):
            attack += f" (flags: {', '.join(r['flags'])})"
        table.add_row(r["defense"], r["checkpoint"][:8], escape(attack),
                      f"{r['clean_acc']:.3f}" if r["clean_acc"] is not None else "",
                      f"{r['robust_acc']:.3f}", str(r["n"]),
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    if not rows:
        out.print("no results stored yet: run `bench run --defense NAME`")
        return
    out.print(table)


def _usage_line(exc: BaseException) -> str:
    """One line for a usage error of the CLI library: what was wrong, then where help is.

    The library's own text (usage block, then "Error: ...") is several lines. Recent typer
    carries its own copy of click and older typer raises click's classes (click itself may
    not even be installed), so the exception is recognised by what both give it (an exit
    code and format_message), never by importing either module.
    """
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "bench"
    return f"error: {message or type(exc).__name__}; see `{command} --help`"


def _is_usage_error(exc: BaseException) -> bool:
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _class_names(exc: BaseException) -> set[str]:
    return {k.__name__ for k in type(exc).__mro__}


def _interrupted() -> None:
    err.print("interrupted: every cell committed so far is kept; run again to finish")
    sys.exit(130)


def main() -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        # Not standalone, so that every error comes here and leaves as one line; the
        # library then returns what a command's `typer.Exit(code)` asked for (or 130 where
        # it caught a Ctrl-C itself, as recent typer does) instead of calling sys.exit.
        code = app(standalone_mode=False, prog_name="bench")
    except BenchError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:  # the CLI library's own errors: usage (2), abort (Ctrl-C, EOF)
        if debug:
            raise
        names = _class_names(exc)
        if "NoArgsIsHelpError" in names:  # bare `bench`: its message is the help text
            print(exc.format_message())
            sys.exit(0)
        if "Abort" in names:
            _interrupted()
        if not _is_usage_error(exc):
            raise
        err.print(_usage_line(exc), markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
