"""Outside models: a model the user already holds, judged by the same matrix as trained
checkpoints.

`bench eval --model REF --name NAME` and `bench.evaluate(model, name=...)`, where REF is
`MODULE:FUNCTION` (+ `--weights`), an `.onnx` file, `timm:NAME` or `torchvision:NAME`
(+ `--weights`), or `robustbench:DATASET/THREAT/NAME` (bench.store.sources builds each).
`--mean/--std` (or the library's own metadata) put the network behind its input
normalization, so the attacks work on [0, 1] pixels and the budget stays in pixel units.
The model is known by NAME plus its source's identity (the ONNX file's sha256, or the
sha256 of the network's weights and buffers: every state_dict tensor, in sorted key
order, with its dtype and shape) and its normalization, so the same model is evaluated
once and a changed one under the same name is a new entry beside the old. It is stored
like a trained checkpoint (same folder layout, same store row, `defense` = NAME, `arch` =
"outside"), with its source's record, the files it keeps (a factory's .py, the ONNX
file) and the weights as safetensors, so that `bench transfer` can rebuild it as a
source or a target. Nothing is written before the model has been built, fed a batch of
the dataset and found to answer with one logit per class; every user error is a
one-line BenchError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core.cells import Cell
from bench.core.data import DatasetSpec, get_spec, load_dataset
from bench.core.matrix import Matrix
from bench.core.provenance import device_name, git_commit, package_version
from bench.engine.verdicts import predict
from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.run.attacking import attack_checkpoint, witness_after_black_box
from bench.run.escalation import escalate
from bench.run.plan import checked_cells
from bench.run.surrogates import transfer_cells
from bench.run.workspace import Workspace
from bench.store import checkpoints as ckpt
from bench.store.factories import SOURCE_FILE, first_line
from bench.store.sources import Normalization, Source, dataset_of, parse_normalization, parse_source, wrapped
from bench.store.sources.zoo import ZooSource

ARCH = "outside"
"""The `arch` column of an outside model's row: what marks it as not trained here."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def outside_key(name: str, dataset: str, digest: str, normalization: Normalization | None = None) -> str:
    fields = {"schema": ckpt.KEY_SCHEMA, "outside": name, "dataset": dataset, "weights": digest}
    if normalization is not None:  # in the key only when set: a plain model keeps the key it always had
        fields["normalize"] = {"mean": list(normalization.mean), "std": list(normalization.std)}
    payload = ckpt.canonical(fields)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise BenchError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if name in DEFENSES.names():
        raise BenchError(f"--name {name!r} is a built-in defense; choose a name of your own (e.g. my_{name})")


def check_answers(model: torch.nn.Module, spec: DatasetSpec, where: str) -> None:
    """A batch of the dataset's shape goes through and comes back as one score per class.
    The batch is seeded noise in [0, 1], not test images: the check is of shapes, and a
    rerun that finds every cell stored then loads no data (nor the reader it needs)."""
    batch = torch.rand((2, *spec.shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model.eval()(batch)
    except Exception as exc:  # a shape or dtype mismatch inside the user's model
        raise BenchError(
            f"{where} fails on a {spec.name} batch of shape {tuple(batch.shape)}: "
            f"{type(exc).__name__}: {first_line(exc)[:200]}; the model must take "
            f"(N, {', '.join(map(str, spec.shape))}) inputs in [0, 1]"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.shape != (len(batch), spec.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(
            f"{where} answers a {spec.name} batch of shape {tuple(batch.shape)} with {got}; "
            f"it must return logits of shape (N, {spec.num_classes})"
        )


@dataclass
class Candidate:
    """An outside model ready to store: built, behind its normalization, checked, hashed."""

    model: torch.nn.Module
    name: str
    dataset: DatasetSpec
    source: Source
    digest: str
    """The source's identity: the ONNX file's sha256, or the network's weights' hash."""
    normalization: Normalization | None = None
    weights_file: str | None = None

    @property
    def key(self) -> str:
        return outside_key(self.name, self.dataset.name, self.digest, self.normalization)

    @property
    def paper(self) -> dict[str, float]:
        """A zoo's reported numbers, shown beside ours as a preset's paper numbers are."""
        return self.source.paper() if isinstance(self.source, ZooSource) else {}


def prepare(
    model: torch.nn.Module | str,
    name: str,
    dataset: str | None = None,
    weights: str | None = None,
    mean: str | tuple[float, ...] | None = None,
    std: str | tuple[float, ...] | None = None,
    robustbench_models: str | None = None,
) -> Candidate:
    """Build the model its source names (a factory, an ONNX file, a library name, a zoo
    entry), put it behind its normalization, check it on the data."""
    check_name(name)
    source = parse_source(model, weights, robustbench_models)
    named = dataset_of(source)
    if dataset is not None and named is not None and dataset != named:
        raise BenchError(f"--dataset {dataset} but --model {source.reference} is a {named} model; drop --dataset")
    spec = get_spec(dataset or named or "digits")
    said = _normalization(mean, std)
    raw = source.build(spec)
    normalization = said or source.normalization(spec)
    if normalization is not None:
        normalization = normalization.checked(spec)
    where = f"the model of {source.reference!r}" if isinstance(model, str) else f"model {name!r}"
    candidate_model = wrapped(raw, normalization, spec).to("cpu").eval()
    check_answers(candidate_model, spec, where)
    return Candidate(
        candidate_model,
        name,
        spec,
        source,
        source.digest(raw),
        normalization,
        str(Path(weights).resolve()) if weights else None,
    )


def _normalization(mean, std) -> Normalization | None:
    """--mean/--std as text (the CLI) or numbers (the Python API)."""
    if isinstance(mean, str) or isinstance(std, str) or mean is None or std is None:
        return parse_normalization(
            mean if mean is None or isinstance(mean, str) else ",".join(map(str, mean)),
            std if std is None or isinstance(std, str) else ",".join(map(str, std)),
        )
    return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std), "mean/std")


def record(ws: Workspace, candidate: Candidate):
    """The store row of a candidate: found by key, or written (folder, then row)."""
    key = candidate.key
    row = ws.store.checkpoint(key)
    if row is not None:
        return row, False
    directory = ckpt.checkpoint_dir(ws.results, candidate.dataset.name, candidate.name, key)
    meta = ckpt.read_meta(directory)
    if meta is None:
        x, y = load_dataset(candidate.dataset.name, "test", ws.data_root)
        logits = predict(
            candidate.model.to(ws.device), x, device=ws.device, batch_size=ws.batch_size(candidate.dataset.name)
        )
        clean = float((logits.argmax(1) == y).float().mean())
        source = candidate.source
        record = source.record()
        files = source.files()
        meta = ckpt.save_checkpoint(
            candidate.model,
            directory,
            {
                "key": key,
                "defense": candidate.name,
                "config": {},
                "train": {},
                "dataset": candidate.dataset.name,
                "arch": ARCH,
                "seed": 0,
                "epochs": 0,
                "train_seconds": 0.0,
                "device": device_name(ws.device),
                "preset": None,
                "paper": candidate.paper,
                "clean_acc": clean,
                "outside": {
                    "factory": record.get("factory"),
                    "reference": source.reference,
                    "source": record,
                    "normalize": candidate.normalization.record() if candidate.normalization else None,
                    "weights_sha256": candidate.digest,
                    "weights_file": candidate.weights_file,
                    "source_copy": SOURCE_FILE if SOURCE_FILE in files else None,
                },
                "package_version": package_version(),
                "git_commit": git_commit(),
                "torch_version": torch.__version__,
            },
            files=files,
        )
    row = ws.store.add_checkpoint(
        key=key,
        dataset=candidate.dataset.name,
        defense=candidate.name,
        preset=None,
        arch=ARCH,
        seed=0,
        threat=candidate.dataset.threat.name,
        config={"outside": meta["outside"]},
        train_config={},
        path=str(directory),
        sha256=meta["sha256"],
        epochs=0,
        train_seconds=0.0,
        device=meta["device"],
        meta=meta,
    )
    return row, True


@dataclass
class EvalReport:
    checkpoint: Any
    added: bool
    cells_run: list[str]
    cells_total: int
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    """Cell key -> one-line reason, for each cell whose attack raised."""
    surrogates_trained: list[str] = dataclasses.field(default_factory=list)
    """The matrix's transfer surrogates this evaluation trained (once per dataset)."""


@dataclass(frozen=True)
class OutsidePlan:
    """An outside model's evaluation, checked: the candidate and the matrix's cells."""

    candidate: Candidate
    cells: tuple[Cell, ...]


def plan_outside(
    model: torch.nn.Module | str,
    name: str,
    dataset: str | None,
    weights: str | None,
    data_root: str | None,
    matrix: Matrix,
    normalization: tuple[Any, Any] = (None, None),
    robustbench_models: str | None = None,
) -> OutsidePlan:
    """The candidate with everything the user gave checked (the model builds and answers,
    the matrix and its transfer table are valid, as `bench run` checks them), before any
    folder or store is touched."""
    mean, std = normalization
    candidate = prepare(model, name, dataset, weights, mean, std, robustbench_models)
    return OutsidePlan(candidate, tuple(checked_cells(matrix, candidate.dataset, data_root)))


def run_outside(ws: Workspace, plan: OutsidePlan, matrix: Matrix, executor=None) -> EvalReport:
    """Store the candidate (once) and run the matrix cells it lacks."""
    candidate, cells = plan.candidate, list(plan.cells)
    row, added = record(ws, candidate)
    model = candidate.model

    def build() -> torch.nn.Module:
        return model.to(ws.device).eval()

    ran = attack_checkpoint(ws, row, cells, build, executor)
    transfers = transfer_cells(ws, row, matrix, build)
    for extra in witness_after_black_box(ws, [(row, build)], executor).values():
        ran.extend(extra)
        ran.failures.update(extra.failures)
    full = matrix.escalation()
    escalated = escalate(ws, row, full, build, executor) if full is not None else None
    if escalated is not None:
        ran.extend(escalated)
        ran.failures.update(escalated.failures)
        cells += escalated.cells
    return EvalReport(row, added, [*ran, *transfers.ran], len(cells) + transfers.total, ran.failures, transfers.trained)
