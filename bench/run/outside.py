"""Outside models: a user's own nn.Module judged by the same matrix as trained checkpoints.

`bench eval --model MODULE:FUNCTION --name NAME [--weights FILE.safetensors]` and
`bench.evaluate(model, name=...)`. FUNCTION returns an nn.Module taking [0, 1] inputs
and returning logits. The model is known by NAME plus the sha256 of its weights and
buffers (every state_dict tensor, in sorted key order, with its dtype and shape), so the
same model is evaluated once and a changed one under the same name is a new entry
beside the old. It is stored like a trained checkpoint (same folder layout, same store
row, `defense` = NAME, `arch` = "outside"), with the factory reference, a copy of the
factory's source file where one was given, and the weights as safetensors, so that
`bench transfer` can rebuild it as a source or a target. Nothing is written before the
model has been built, fed a batch of the dataset and found to answer with one logit per
class; every user error is a one-line BenchError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core.data import DatasetSpec, get_spec, load_dataset
from bench.core.matrix import Cell, Matrix, load_matrix
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
from bench.store.factories import (
    SOURCE_FILE,
    Factory,
    build,
    class_factory,
    first_line,
    load_weights,
    parse_factory,
    weights_hash,
)

ARCH = "outside"
"""The `arch` column of an outside model's row: what marks it as not trained here."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def outside_key(name: str, dataset: str, digest: str) -> str:
    payload = ckpt.canonical({"schema": ckpt.KEY_SCHEMA, "outside": name, "dataset": dataset, "weights": digest})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise BenchError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if name in DEFENSES.names():
        raise BenchError(f"--name {name!r} is a built-in defense; choose a name of your own (e.g. my_{name})")


def check_answers(model: torch.nn.Module, spec: DatasetSpec, x: torch.Tensor, where: str) -> None:
    """A batch of the dataset goes through and comes back as one score per class."""
    batch = x[:2]
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
    """An outside model ready to store: built, checked, hashed."""

    model: torch.nn.Module
    name: str
    dataset: DatasetSpec
    factory: Factory | None
    digest: str
    weights_file: str | None = None

    @property
    def key(self) -> str:
        return outside_key(self.name, self.dataset.name, self.digest)


def prepare(
    model: torch.nn.Module | str,
    name: str,
    dataset: str = "digits",
    weights: str | None = None,
    data_root: str | None = None,
) -> Candidate:
    """Build (from MODULE:FUNCTION) or take the model, load weights, check it on the data."""
    check_name(name)
    spec = get_spec(dataset)
    factory = None
    if isinstance(model, str):
        factory = parse_factory(model)
        model = build(factory)
        where = f"the model of {factory.reference!r}"
    elif isinstance(model, torch.nn.Module):
        factory = class_factory(model)
        where = f"model {name!r}"
    else:
        raise BenchError(f"model must be an nn.Module or 'MODULE:FUNCTION', got a {type(model).__name__}")
    if weights:
        load_weights(model, weights)
    model = model.to("cpu").eval()
    x, _ = load_dataset(spec.name, "test", data_root)
    check_answers(model, spec, x, where)
    return Candidate(model, name, spec, factory, weights_hash(model), str(Path(weights).resolve()) if weights else None)


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
        logits = predict(candidate.model.to(ws.device), x, device=ws.device, batch_size=ws.batch_size())
        clean = float((logits.argmax(1) == y).float().mean())
        source = candidate.factory.module if candidate.factory and candidate.factory.is_file else None
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
                "paper": {},
                "clean_acc": clean,
                "outside": {
                    "factory": candidate.factory.reference if candidate.factory else None,
                    "weights_sha256": candidate.digest,
                    "weights_file": candidate.weights_file,
                    "source_copy": SOURCE_FILE if candidate.factory and candidate.factory.is_file else None,
                },
                "package_version": package_version(),
                "git_commit": git_commit(),
                "torch_version": torch.__version__,
            },
            files={SOURCE_FILE: Path(source)} if source else {},
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
    model: torch.nn.Module | str, name: str, dataset: str, weights: str | None, data_root: str | None, matrix: Matrix
) -> OutsidePlan:
    """The candidate with everything the user gave checked (the model builds and answers,
    the matrix and its transfer table are valid, as `bench run` checks them), before any
    folder or store is touched."""
    candidate = prepare(model, name, dataset, weights, data_root)
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
    escalated = escalate(ws, row, load_matrix(matrix.escalate), build, executor) if matrix.escalate else None
    if escalated is not None:
        ran.extend(escalated)
        ran.failures.update(escalated.failures)
        cells += escalated.cells
    return EvalReport(row, added, [*ran, *transfers.ran], len(cells) + transfers.total, ran.failures, transfers.trained)
