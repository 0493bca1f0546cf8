"""Model factories: how an outside model is built from `MODULE:FUNCTION` and rebuilt
from its checkpoint folder, and the hash that identifies its weights.

MODULE is an importable module name (found from the current folder too, as `python -m`
finds it) or the path of a .py file; FUNCTION takes no arguments and returns the
nn.Module. A .py factory is kept as a copy (SOURCE_FILE) in the checkpoint folder, so
the model can be rebuilt where the original file is gone. Every user error is a
one-line BenchError.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bench.errors import BenchError, did_you_mean

SOURCE_FILE = "factory.py"
"""The copy of a factory given as a .py path, kept in the checkpoint folder."""


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
        raise BenchError(
            f"--model {text!r} is not MODULE:FUNCTION (e.g. --model my_models.py:build "
            "or --model my_package.models:build)"
        )
    return Factory(module, function)


def _import(factory: Factory, source: Path | None = None):
    """The factory's module; `source` overrides where a .py factory is read from."""
    try:
        if source is not None or factory.is_file:
            path = Path(source or factory.module)
            if not path.is_file():
                raise BenchError(
                    f"--model {factory.reference!r}: no file {str(path)!r}; give the path of a "
                    ".py file or an importable module name"
                )
            name = "bench_outside_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise BenchError(
                    f"--model {factory.reference!r}: {str(path)!r} cannot be loaded as a Python module; give a .py file"
                )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            # Nowhere else can import it by that name (a Ray worker, say), so whatever
            # ships a model of its classes sends the module's code along (bench.run.executors.ray).
            setattr(module, "__pickle_by_value__", True)  # noqa: B010 (a dunder mypy cannot know a module has)
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
        with _current_folder_on_path():
            return importlib.import_module(factory.module)
    except BenchError:
        raise
    except Exception as exc:  # whatever the user's module raises on import is their error
        raise BenchError(
            f"--model {factory.reference!r} does not import: {type(exc).__name__}: "
            f"{first_line(exc)}; check the module path and that it imports on its own"
        ) from exc


@contextlib.contextmanager
def _current_folder_on_path():
    """The current folder first on sys.path while a module name is imported, as `python -m`
    puts it there: the `bench` script's own sys.path starts at its bin/ folder instead."""
    try:
        here = os.getcwd()
    except OSError:  # the folder was removed under us: nothing to add
        here = None
    if here is None or "" in sys.path or here in sys.path:
        yield
        return
    sys.path.insert(0, here)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(here)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def build(factory: Factory, source: Path | None = None) -> torch.nn.Module:
    """Import the factory and call it; the result must be an nn.Module."""
    module = _import(factory, source)
    fn = getattr(module, factory.function, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise BenchError(
            f"--model {factory.reference!r}: {factory.module} has no function "
            f"{factory.function!r}{did_you_mean(factory.function, names)}"
        )
    try:
        model = fn()
    except Exception as exc:  # the user's factory failing is bad input, not a bench bug
        raise BenchError(
            f"--model {factory.reference!r} raised {type(exc).__name__}: {first_line(exc)}; "
            "FUNCTION must build the model with no arguments"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise BenchError(
            f"--model {factory.reference!r} returned a {type(model).__name__}, not a "
            "torch.nn.Module; FUNCTION must return the model"
        )
    return model


def read_state(path: str | os.PathLike, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file, or from a torch checkpoint (.pt, .pth, .bin)
    read with `weights_only=True`: tensors and plain containers only, never a pickle that
    runs code. A checkpoint that nests its weights under `state_dict` or `model` (as
    training scripts and RobustBench's files do) is unwrapped, and a `module.` prefix
    (DataParallel's) is dropped."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"{flag} {str(p)!r}: no such file")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BenchError(
                f"{flag} {str(p)!r} is not a safetensors file ({first_line(exc)}); save with "
                "safetensors.torch.save_file(model.state_dict(), PATH)"
            ) from exc
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a truncated zip: the file is the user's error
        raise BenchError(
            f"{flag} {str(p)!r} is neither safetensors nor a weights-only torch checkpoint "
            f"({type(exc).__name__}: {first_line(exc)[:160]}); save the state_dict with torch.save or safetensors"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{flag} {str(p)!r} holds no state_dict of tensors; save model.state_dict()")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
"""Buffers that training computes (batch norm's): never taken from the architecture."""


def load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, hint: str, constants_from_code: bool = False
) -> None:
    """Load a state_dict into the model: every key and every shape must fit. With
    `constants_from_code`, a constant buffer the file lacks (not a batch-norm statistic)
    keeps the architecture's own value: the normalization constants some published
    checkpoints leave out, which RobustBench's loader also lets the code supply."""
    own = model.state_dict()
    params = {name for name, _ in model.named_parameters()}

    def required(key: str) -> bool:
        return not constants_from_code or key in params or key.rsplit(".", 1)[-1] in _STATISTICS

    missing = sorted(k for k in set(own) - set(state) if required(k))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"{shapes[0]} is {tuple(state[shapes[0]].shape)} where the model has {tuple(own[shapes[0]].shape)}"
                if shapes
                else "",
            )
            if part
        )
        raise BenchError(f"{where} do not fit the model: {detail}; {hint}")
    model.load_state_dict(state, strict=False)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into the model, strictly (every parameter, every shape)."""
    load_state(model, read_state(path), f"--weights {str(path)!r}", "save them from the model FUNCTION builds")


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every state_dict tensor (weights and buffers) in sorted key order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def class_factory(model: torch.nn.Module) -> Factory | None:
    """A module given in Python is rebuilt from its class if that takes no arguments."""
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    return Factory(cls.__module__, cls.__qualname__)
