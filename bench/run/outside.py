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
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bench.store import checkpoints as ckpt
from bench.core.data import DatasetSpec, get_spec, load_dataset
from bench.errors import BenchError, did_you_mean
from bench.core.matrix import matrix_cells
from bench.registry import DEFENSES

ARCH = "outside"
"""The `arch` column of an outside model's row: what marks it as not trained here."""
SOURCE_FILE = "factory.py"
"""The copy of a factory given as a .py path, kept in the checkpoint folder."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Factory:
    """Where an outside model comes from: `module:function`, module a name or a .py path."""

    module: str
    """An importable module name, or the path of a .py file."""
    function: str
    """A callable of the module that takes no arguments and returns the nn.Module."""

    @property
    def reference(self) -> str:
        return f"{self.module}:{self.function}"

    @property
    def is_file(self) -> bool:
        return self.module.endswith(".py")


def parse_factory(text: str) -> Factory:
    module, sep, function = text.rpartition(":")
    # A Windows drive letter (C:\...) is no separator: the function part has no slash.
    if not sep or not module or not function or "/" in function or "\\" in function:
        raise BenchError(f"--model {text!r} is not MODULE:FUNCTION (e.g. --model my_models.py:build "
                         "or --model my_package.models:build)")
    return Factory(module, function)


def _import(factory: Factory, source: Path | None = None):
    """The factory's module; `source` overrides where a .py factory is read from."""
    try:
        if source is not None or factory.is_file:
            path = Path(source or factory.module)
            if not path.is_file():
                raise BenchError(f"--model {factory.reference!r}: no file {str(path)!r}; give the path of a "
                                 ".py file or an importable module name")
            name = "bench_outside_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            # Nowhere else can import it by that name (a Ray worker, say), so whatever
            # ships a model of its classes sends the module's code along (bench.run.executors.ray).
            module.__pickle_by_value__ = True
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
        return importlib.import_module(factory.module)
    except BenchError:
        raise
    except Exception as exc:  # whatever the user's module raises on import is their error
        raise BenchError(f"--model {factory.reference!r} does not import: {type(exc).__name__}: "
                         f"{_first_line(exc)}; check the module path and that it imports on its own") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def build(factory: Factory, source: Path | None = None) -> torch.nn.Module:
    """Import the factory and call it; the result must be an nn.Module."""
    module = _import(factory, source)
    fn = getattr(module, factory.function, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise BenchError(f"--model {factory.reference!r}: {factory.module} has no function "
                         f"{factory.function!r}{did_you_mean(factory.function, names)}")
    try:
        model = fn()
    except Exception as exc:  # the user's factory failing is bad input, not a bench bug
        raise BenchError(f"--model {factory.reference!r} raised {type(exc).__name__}: {_first_line(exc)}; "
                         "FUNCTION must build the model with no arguments") from exc
    if not isinstance(model, torch.nn.Module):
        raise BenchError(f"--model {factory.reference!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module; FUNCTION must return the model")
    return model


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file into the model, strictly (every key, every shape)."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"--weights {str(p)!r}: no such file")
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BenchError(f"--weights {str(p)!r} is not a safetensors file ({_first_line(exc)}); save with "
                         "safetensors.torch.save_file(model.state_dict(), PATH)") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = sorted(set(model.state_dict()) - set(state))
        extra = sorted(set(state) - set(model.state_dict()))
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "")
        raise BenchError(f"--weights {str(p)!r} do not fit the model: "
                         f"{detail.strip() or _first_line(exc).split(chr(9))[0][:200]}; "
                         "save them from the model FUNCTION builds") from exc


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every state_dict tensor (weights and buffers) in sorted key order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def outside_key(name: str, dataset: str, digest: str) -> str:
    payload = ckpt.canonical({"schema": ckpt.KEY_SCHEMA, "outside": name, "dataset": dataset, "weights": digest})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise BenchError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    if name in DEFENSES.names():
        raise BenchError(f"--name {name!r} is a built-in defense; choose a name of your own (e.g. my_{name})")


def check_answers(model: torch.nn.Module, spec: DatasetSpec, x: torch.Tensor, where: str) -> None:
    """A batch of the dataset goes through and comes back as one score per class."""
    batch = x[:2]
    try:
        with torch.no_grad():
            out = model.eval()(batch)
    except Exception as exc:  # a shape or dtype mismatch inside the user's model
        raise BenchError(f"{where} fails on a {spec.name} batch of shape {tuple(batch.shape)}: "
                         f"{type(exc).__name__}: {_first_line(exc)[:200]}; the model must take "
                         f"(N, {', '.join(map(str, spec.shape))}) inputs in [0, 1]") from exc
    if not isinstance(out, torch.Tensor) or out.shape != (len(batch), spec.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"{where} answers a {spec.name} batch of shape {tuple(batch.shape)} with {got}; "
                         f"it must return logits of shape (N, {spec.num_classes})")


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


def prepare(model: torch.nn.Module | str, name: str, dataset: str = "digits", weights: str | None = None,
            data_root: str | None = None) -> Candidate:
    """Build (from MODULE:FUNCTION) or take the model, load weights, check it on the data."""
    check_name(name)
    spec = get_spec(dataset)
    factory = None
    if isinstance(model, str):
        factory = parse_factory(model)
        model = build(factory)
        where = f"the model of {factory.reference!r}"
    elif isinstance(model, torch.nn.Module):
        factory = _class_factory(model)
        where = f"model {name!r}"
    else:
        raise BenchError(f"model must be an nn.Module or 'MODULE:FUNCTION', got a {type(model).__name__}")
    if weights:
        load_weights(model, weights)
    model = model.to("cpu").eval()
    x, _ = load_dataset(spec.name, "test", data_root)
    check_answers(model, spec, x, where)
    return Candidate(model, name, spec, factory, weights_hash(model),
                     str(Path(weights).resolve()) if weights else None)


def _class_factory(model: torch.nn.Module) -> Factory | None:
    """A module given in Python is rebuilt from its class if that takes no arguments."""
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    return Factory(cls.__module__, cls.__qualname__)


def save(candidate: Candidate, directory: Path, meta: dict) -> dict:
    """Weights (safetensors), the factory's source copy and meta.json, written atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        # Cloned: tied weights share storage, which safetensors refuses to write twice.
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in candidate.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if candidate.factory is not None and candidate.factory.is_file:
            shutil.copyfile(candidate.factory.module, tmp / SOURCE_FILE)
        meta = dict(meta, sha256=ckpt.sha256_file(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=list))
        if directory.exists():  # written by a run that died before recording it
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def rebuild(meta: dict, directory: Path, device: str = "cpu") -> torch.nn.Module:
    """An outside model from its checkpoint folder: the factory (its kept source copy
    first), then the stored weights."""
    info = meta["outside"]
    if not info.get("factory"):
        raise BenchError(f"outside model {meta['defense']!r} was given as an object with no importable "
                         "factory, so it cannot be rebuilt; evaluate it with --model MODULE:FUNCTION")
    factory = parse_factory(info["factory"])
    source = directory / SOURCE_FILE
    model = build(factory, source if source.is_file() else None)
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device="cpu"))
    return model.to(device).eval()


def record(bench, candidate: Candidate):
    """The store row of a candidate: found by key, or written (folder, then row)."""
    from bench.run.jobs import device_name, package_version

    key = candidate.key
    row = bench.store.checkpoint(key)
    if row is not None:
        return row, False
    directory = ckpt.checkpoint_dir(bench.results, candidate.dataset.name, candidate.name, key)
    meta = ckpt.read_meta(directory)
    if meta is None:
        from bench.engine.evaluate import predict

        x, y = load_dataset(candidate.dataset.name, "test", bench.data_root)
        logits = predict(candidate.model.to(bench.device), x, device=bench.device, batch_size=bench.batch_size())
        clean = float((logits.argmax(1) == y).float().mean())
        meta = save(candidate, directory, {
            "key": key, "defense": candidate.name, "config": {}, "train": {}, "dataset": candidate.dataset.name,
            "arch": ARCH, "seed": 0, "epochs": 0, "train_seconds": 0.0, "device": device_name(bench.device),
            "preset": None, "paper": {}, "clean_acc": clean,
            "outside": {"factory": candidate.factory.reference if candidate.factory else None,
                        "weights_sha256": candidate.digest, "weights_file": candidate.weights_file,
                        "source_copy": SOURCE_FILE if candidate.factory and candidate.factory.is_file else None},
            "package_version": package_version(), "git_commit": ckpt.git_commit(),
            "torch_version": torch.__version__,
        })
    row = bench.store.add_checkpoint(
        key=key, dataset=candidate.dataset.name, defense=candidate.name, preset=None, arch=ARCH, seed=0,
        threat=candidate.dataset.threat.name, config={"outside": meta["outside"]}, train_config={},
        path=str(directory), sha256=meta["sha256"], epochs=0, train_seconds=0.0, device=meta["device"],
        meta=meta)
    return row, True


@dataclass
class EvalReport:
    checkpoint: Any
    added: bool
    cells_run: list[str]
    cells_total: int
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    """Cell key -> one-line reason, for each cell whose attack raised."""


def evaluate_outside(bench, candidate: Candidate, matrix: str = "full", executor=None) -> EvalReport:
    """Store the candidate (once) and run the matrix cells it lacks."""
    from bench.run.driver import attack_checkpoint
    from bench.run.surrogates import check_transfer, transfer_cells

    cells = matrix_cells(matrix, candidate.dataset.threat)
    check_transfer(matrix, candidate.dataset)
    row, added = record(bench, candidate)
    model = candidate.model

    def build() -> torch.nn.Module:
        return model.to(bench.device).eval()

    ran = attack_checkpoint(bench, row, cells, build, executor)
    transfers, transfer_total = transfer_cells(bench, row, matrix, build)
    return EvalReport(row, added, [*ran, *transfers], len(cells) + transfer_total, ran.failures)


def evaluate(model: torch.nn.Module | str, *, name: str, dataset: str = "digits", matrix: str = "full",
             weights: str | None = None, results: str | os.PathLike = "results", db: str | None = None,
             device: str = "auto", data_root: str | None = None, bench=None) -> list[dict]:
    """Judge your own model: store it by name and weights hash, run the matrix, return its rows.

    `model` is an nn.Module taking [0, 1] inputs and returning logits, or a
    'MODULE:FUNCTION' string. Returns the rows `bench results --format json` prints for
    it, the `worst_case` row last.
    """
    from bench.run.bench import Bench
    from bench.reporting.results import result_rows

    from bench.run.surrogates import check_transfer

    candidate = prepare(model, name, dataset, weights, data_root)
    matrix_cells(matrix, candidate.dataset.threat)  # a bad matrix fails before anything is written
    check_transfer(matrix, candidate.dataset)
    bench = bench or Bench.open(results, db=db, device=device, data_root=data_root)
    report = evaluate_outside(bench, candidate, matrix)
    return result_rows(bench.store, checkpoint_keys={report.checkpoint.key})

