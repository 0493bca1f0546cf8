"""The public Python calls: one function per `bench` command, plus the names scripts use.

    from bench import load_dataset, load_checkpoint, evaluate
    from bench import BPDA   # for model authors: an exact forward, an approximate backward

The command line (bench.cli) parses options, calls exactly one function here and prints
what it returns; everything a command checks, opens or runs happens in these calls.
Every user error is a one-line BenchError, raised before the store is opened or
anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.core.data import DATASETS, load_dataset
from bench.core.matrix import BUILTIN, load_matrix
from bench.core.presets import all_presets
from bench.errors import BenchError
from bench.perf import SIZES, run_perf
from bench.registry import ATTACKS, DEFENSES
from bench.reporting.diagnosis import diagnosis_rows
from bench.reporting.export import Export, worst_case_inputs
from bench.reporting.results import result_rows
from bench.reporting.site import build_site
from bench.reporting.site.names import cell_label
from bench.run import distributed
from bench.run.diagnosing import ensure_diagnostics
from bench.run.driver import RunReport, plan_run, run_defenses
from bench.run.executors import make_executor
from bench.run.outside import EvalReport, plan_outside, run_outside
from bench.run.recipe import TrainRequest, resolve
from bench.run.training import ensure_checkpoint
from bench.run.transfer import TransferReport, run_transfers
from bench.run.workspace import Workspace
from bench.science.adaptive import BPDA
from bench.store.checkpoints import load_checkpoint
from bench.store.db import Checkpoint
from bench.store.evidence import load_evidence

__all__ = ["BPDA", "evaluate", "load_checkpoint", "load_dataset"]

MAX_THREADS = 1024
"""More than any machine has; torch overflows on values past a C int."""


@dataclass(frozen=True)
class Where:
    """Where a command keeps its results and runs its work (the shared options)."""

    results: str | os.PathLike = "results"
    db: str | None = None
    data_root: str | None = None
    device: str = "auto"
    threads: int = 1
    """Intra-op CPU threads for torch; also the CPUs of each Ray task."""
    executor: str = "local"
    ray_address: str | None = None
    ray_gpus: float = 1.0
    batch_size: int = 0
    """Images per attack batch; 0 picks one for the device and the image size."""


class IncompleteEvaluation(RuntimeError):
    """Some cells of an outside model's matrix failed: its worst case is incomplete. The
    stored rows are `rows` (the `worst_case` row says `complete: false`) and each failed
    cell's one-line reason is in `failures`; nothing is dropped."""

    def __init__(self, rows: list[dict], failures: dict[str, str]):
        first = next(iter(failures.items()))
        super().__init__(
            f"{len(failures)} cell(s) failed, so the worst case is incomplete; first: {first[0]}: {first[1]}"
        )
        self.rows, self.failures = rows, failures


def open_workspace(where: Where, progress: Any = None) -> Workspace:
    """The run environment, with torch's thread count set from `where.threads`."""
    # One thread by default: the intra-op thread count changes float summation order and
    # so the trained weights, and on shared cores OpenMP threads spin-waiting for each
    # other made a digits run twenty times slower (see tests/conftest.py).
    if not 1 <= where.threads <= MAX_THREADS:
        raise BenchError(f"--threads must be between 1 and {MAX_THREADS}, got {where.threads}")
    if where.batch_size < 0:
        raise BenchError(f"--batch-size must be at least 1 (or 0 for the default), got {where.batch_size}")
    torch.set_num_threads(where.threads)
    return Workspace.open(
        where.results,
        db=where.db,
        device=where.device,
        data_root=where.data_root,
        progress=progress,
        eval_batch=where.batch_size,
    )


def executor(where: Where):
    """The executor `where` asks for (a context manager: a local Ray cluster it starts is
    stopped on exit). Each Ray task gets `threads` CPUs and as many torch threads."""
    return make_executor(
        where.executor, ray_address=where.ray_address, threads=where.threads, gpus_per_task=where.ray_gpus
    )


def listing(what: str) -> list[tuple[str, ...]]:
    """The rows `bench ls WHAT` prints."""
    if what == "defenses":
        return [(n, (DEFENSES.get(n).doc.splitlines() or [""])[0]) for n in DEFENSES.names()]
    if what == "attacks":
        return [(n, (ATTACKS.get(n).doc.splitlines() or [""])[0]) for n in ATTACKS.names()]
    if what == "matrices":  # each cell by its short name, on digits, grouped by threat model
        threat, rows = DATASETS["digits"].threat, []
        for name in BUILTIN:
            matrix = load_matrix(name)
            cells = matrix.cells(threat)
            by_threat: dict[str, list[str]] = {}
            for c in cells:
                by_threat.setdefault(c.threat, []).append(cell_label(c.attack, vars(c.config)))
            threats: dict[tuple[str, ...], list[str]] = {}  # threat models with the same cells share a line
            for t, labels in by_threat.items():
                counted = dict.fromkeys(labels)
                names = tuple(n if labels.count(n) == 1 else f"{n} ×{labels.count(n)}" for n in counted)
                threats.setdefault(names, []).append(t)
            parts = [f"{', '.join(ts)}: {', '.join(names)}" for names, ts in threats.items()]
            sources, crafted = matrix.transfer.surrogates, matrix.transfer_cells(threat)
            if sources:
                parts.append(
                    f"transfer from {', '.join(sources)}: "
                    + ", ".join(cell_label(c.attack, vars(c.config)) for c in crafted)
                )
            rows.append((name, f"{len(cells) + len(sources) * len(crafted)} cells on digits; " + "; ".join(parts)))
        return rows
    if what == "datasets":
        return [(n, f"{s.num_classes:3} classes", s.threat.name, f"arch {s.default_arch}") for n, s in DATASETS.items()]
    if what == "presets":
        return [(n, p.defense, p.dataset, p.source) for n, p in all_presets().items()]
    raise BenchError(f"cannot list {what!r}: choose defenses, attacks, matrices, datasets or presets")


def train(request: TrainRequest, where: Where = Where(), progress: Any = None) -> tuple[Checkpoint, bool]:
    """`bench train`: the stored checkpoint of one recipe, trained if missing. (row, trained?)
    `request.workers` > 1 trains it data-parallel on Ray Train: on the cluster of
    `--executor ray --ray-address`, else on a local Ray cluster started for the call."""
    recipe = resolve(request)
    ws = open_workspace(where, progress)
    with executor(where) as ex, distributed.cluster(recipe.workers):
        return ensure_checkpoint(ws, recipe, ex)


def run(
    defense: str,
    matrix: str,
    request: TrainRequest,
    where: Where = Where(),
    progress: Any = None,
    eps: float | None = None,
) -> tuple[list[RunReport], list[dict]]:
    """`bench run`: train what is missing and run every missing cell for one defense or
    `all`; returns the reports and the result rows of their checkpoints. `eps` is the
    run's own L-inf radius (`--eps`), over the matrix's and the dataset's. Each missing
    checkpoint trains on `request.workers` data-parallel workers (see `train`)."""
    names = DEFENSES.names() if defense == "all" else [DEFENSES.get(defense).name]
    requests = [
        TrainRequest(
            name,
            request.dataset,
            request.preset if defense != "all" else None,
            request.overrides,
            request.arch,
            request.seed,
            request.workers,
        )
        for name in names
    ]
    parsed = load_matrix(matrix, eps=eps)
    plans = [plan_run(r, parsed, where.data_root) for r in requests]  # checked before the store is opened
    ws = open_workspace(where, progress)
    with executor(where) as ex, distributed.cluster(request.workers):
        reports = run_defenses(ws, plans, parsed, ex)
    return reports, result_rows(ws.store, checkpoint_keys={r.checkpoint.key for r in reports})


def eval_outside(
    model: torch.nn.Module | str,
    *,
    name: str,
    dataset: str | None = None,
    matrix: str = "full",
    weights: str | None = None,
    mean: str | tuple[float, ...] | None = None,
    std: str | tuple[float, ...] | None = None,
    robustbench_models: str | None = None,
    where: Where = Where(),
    progress: Any = None,
    workspace: Workspace | None = None,
    eps: float | None = None,
) -> tuple[EvalReport, list[dict]]:
    """`bench eval`: store an outside model by name and identity and run the matrix cells it
    lacks; returns the report and its result rows, the `worst_case` row last. `dataset`
    unset: the one a RobustBench entry names, else digits; `eps`: the run's own L-inf
    radius, as for `run`."""
    # Everything the user gave is checked before the results folder or store is touched.
    parsed = load_matrix(matrix, eps=eps)
    plan = plan_outside(model, name, dataset, weights, where.data_root, parsed, (mean, std), robustbench_models)
    ws = workspace or open_workspace(where, progress)
    with executor(where) as ex:
        report = run_outside(ws, plan, parsed, ex)
    return report, result_rows(ws.store, checkpoint_keys={report.checkpoint.key})


def evaluate(
    model: torch.nn.Module | str,
    *,
    name: str,
    dataset: str | None = None,
    matrix: str = "full",
    weights: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    robustbench_models: str | None = None,
    results: str | os.PathLike = "results",
    db: str | None = None,
    device: str = "auto",
    data_root: str | None = None,
    workspace: Workspace | None = None,
    eps: float | None = None,
) -> list[dict]:
    """Judge your own model: store it by name and weights hash, run the matrix, return its rows.

    `model` is an nn.Module returning logits, or a reference as `bench eval --model`
    takes it ('MODULE:FUNCTION', 'FILE.onnx', 'timm:NAME', 'torchvision:NAME',
    'robustbench:DATASET/THREAT/NAME'). `mean`/`std` put it behind its input
    normalization (one value per channel), so it is attacked on [0, 1] pixels. Returns the rows `bench results --format json` prints for
    it, the `worst_case` row of its own threat model last (an L2 worst case, where the
    matrix has L2 cells, and one at `eps`, the run's own L-inf radius, where given, just
    before it). Raises IncompleteEvaluation, carrying the rows and the
    failed cells, when any cell failed: an incomplete worst case is never returned as if
    it were whole.
    """
    where = Where(results=results, db=db, device=device, data_root=data_root, threads=torch.get_num_threads())
    report, rows = eval_outside(
        model,
        name=name,
        dataset=dataset,
        matrix=matrix,
        weights=weights,
        mean=mean,
        std=std,
        robustbench_models=robustbench_models,
        where=where,
        workspace=workspace,
        eps=eps,
    )
    if report.failures:
        raise IncompleteEvaluation(rows, report.failures)
    return rows


def results(where: Where = Where(), defense: str | None = None, dataset: str | None = None) -> list[dict]:
    """`bench results`: every stored cell and each checkpoint's worst case. A filter that
    matches no stored checkpoint is an error that names what is stored."""
    store = open_workspace(replace(where, device="cpu")).store
    rows = result_rows(store, defense=defense, dataset=dataset)
    stored = store.checkpoints() if not rows and (defense or dataset) else []
    if stored and not store.checkpoints(dataset=dataset, defense=defense):
        given = " ".join(f"--{k} {v!r}" for k, v in (("defense", defense), ("dataset", dataset)) if v)
        raise BenchError(
            f"no stored checkpoint matches {given}; stored defenses: "
            f"{', '.join(sorted({c.defense for c in stored}))}; stored datasets: "
            f"{', '.join(sorted({c.dataset for c in stored}))}"
        )
    return rows


def export(checkpoint: str, out: str | os.PathLike, threat: str | None = None, where: Where = Where()) -> Export:
    """`bench export`: the worst case's adversarial inputs of one checkpoint (a key or key
    prefix), written with torch.save as one (N, C, H, W) float32 tensor index-aligned with
    the test set (RobustBench's layout for an outside evaluation). Written atomically:
    nothing is left half-written, and nothing is written when a cell kept no examples."""
    target = Path(out)
    if target.suffix != ".pt" or not target.parent.is_dir():
        raise BenchError(f"--out {str(out)!r} must be a .pt file in an existing folder")
    store = open_workspace(replace(where, device="cpu")).store
    chosen = [c for c in store.checkpoints() if checkpoint and c.key.startswith(checkpoint)]
    if len(chosen) != 1:
        found = f"{len(chosen)} checkpoints match" if chosen else "none matches"
        raise BenchError(
            f"--checkpoint {checkpoint!r} must name one stored checkpoint by its key or a prefix of it "
            f"({found}); `bench results` lists them"
        )
    (ck,) = chosen
    ev = load_evidence(store, [ck])[ck.id]
    x, _ = load_dataset(ck.dataset, "test", where.data_root)
    exported = worst_case_inputs(ev, x, {c.id: c.key for c in store.checkpoints()}, threat)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    torch.save(exported.inputs, tmp)
    os.replace(tmp, target)
    return exported


def diagnose(name: str, dataset: str | None = None, where: Where = Where()) -> list[dict]:
    """`bench diagnose`: Table 1 rows of the checkpoints `name` selects, computing the
    diagnostics that are missing."""
    ws = open_workspace(where)
    return diagnosis_rows(ws.store, ensure_diagnostics(ws, name, dataset))


def transfer(
    source: str,
    target: str = "all",
    attack: str | None = None,
    dataset: str = "digits",
    where: Where = Where(),
    progress: Any = None,
) -> TransferReport:
    """`bench transfer`: craft on every source, judge every target on its examples."""
    ws = open_workspace(where, progress)
    with executor(where) as ex:
        return run_transfers(ws, source, target, attack, dataset, executor=ex)


def site(out_dir: str | os.PathLike = "site", where: Where = Where()) -> Path:
    """`bench site`: render the leaderboard from the store into `out_dir`."""
    return build_site(open_workspace(replace(where, device="cpu")).store, out_dir)


def perf(*, device: str = "auto", as_json: bool = False, size: str = "default", threads: int | None = None) -> dict:
    """`bench perf`: our attacks against torchattacks on the same model and inputs."""
    if size not in SIZES:
        raise BenchError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BenchError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    return run_perf(device=device, as_json=as_json, size=size, threads=threads)
