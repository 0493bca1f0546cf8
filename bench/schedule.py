"""What is missing -> jobs -> an executor. Only this driver writes to the store.

`run_defense` resolves a recipe (defense defaults, then a preset, then --set
overrides), finds or trains its checkpoint, expands the matrix, and evaluates the cells
the store lacks, committing each in its own transaction. `LocalExecutor` runs jobs in
this process; an executor for a cluster only has to honour the same `map`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import itertools
import os
import tempfile
import time
import tomllib
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from attacks._losses import cw_margin
from bench import checkpoint as ckpt
from bench import rewrite
from bench.data import DatasetSpec, get_spec, load_dataset
from bench.errors import BenchError, did_you_mean
from bench.matrix import Cell, matrix_cells
from bench.models import build_model
from bench.presets import Preset, default_preset, get_preset
from bench.registry import ATTACKS, DEFENSES, build_config
from bench.store import Checkpoint, Store, pack_bits
from bench.train import TrainConfig, TrainContext, train


# --- the environment a command runs in -------------------------------------------------
@dataclass
class Bench:
    results: Path
    store: Store
    device: str
    data_root: str | None
    progress: Any = None
    """A rich Progress (or None) to show training and attack progress on."""
    eval_batch: int = 0
    """Evaluation batch size; 0 picks one for the device."""
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
    gradient (ReLU after max pooling; CPU max pooling in NHWC; see bench.rewrite). On
    everywhere; off only to measure what it saves."""

    def __post_init__(self):
        if not self.precision:
            self.precision = default_precision(self.device)
        if self.precision not in PRECISIONS:
            raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.channels_last is None:
            self.channels_last = self.device.startswith("cuda")
        if self.fold_bn is None:
            self.fold_bn = self.device.startswith("cuda")

    @property
    def fast(self) -> dict:
        """The fast-path keyword arguments of craft and evaluate, as this bench sets them."""
        return {"precision": self.precision, "channels_last": self.channels_last, "fold_bn": self.fold_bn,
                "compile": self.compile, "exact_rewrites": self.exact_rewrites}

    @classmethod
    def open(cls, results: str | os.PathLike, db: str | None = None, device: str = "auto",
             data_root: str | None = None, progress: Any = None, **fast: Any) -> "Bench":
        path = Path(results)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise BenchError(f"results folder {str(path)!r} is not writable ({exc.strerror}); "
                             "pass --results DIR or set BENCH_RESULTS to a folder you can write") from exc
        return cls(path, Store.for_results(path, db), resolve_device(device), data_root, progress, **fast)

    def batch_size(self) -> int:
        return self.eval_batch or (4096 if self.device.startswith("cuda") else 1024)


PRECISIONS = ("fp32", "bf16")


def default_precision(device: str) -> str:
    """bf16 on CUDA devices that support it; fp32 everywhere else (never bf16 on a CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise BenchError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


# --- recipes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """What the user asked for; `resolve` turns it into a concrete recipe."""

    defense: str
    dataset: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    """`key=value` strings; keys of the defense config or of TrainConfig."""
    arch: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    defense: str
    config: Any
    train_config: TrainConfig
    dataset: DatasetSpec
    arch: str
    seed: int
    preset: Preset | None

    @property
    def key(self) -> str:
        return ckpt.checkpoint_key(self.defense, self.config, self.train_config,
                                   self.dataset.name, self.arch, self.seed)


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BenchError(f"--set {item!r} is not key=value (e.g. --set beta=0.5)")
    try:  # TOML value syntax: 0.5, 3, true, "batch", [100, 150]
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().removeprefix("train."), value


def resolve(spec: RunSpec) -> Recipe:
    entry = DEFENSES.get(spec.defense)
    preset = get_preset(spec.preset) if spec.preset else None
    if preset and preset.defense != spec.defense:
        raise BenchError(f"preset {preset.name!r} is for defense {preset.defense!r}, not {spec.defense!r}")
    dataset = spec.dataset or (preset.dataset if preset else "digits")
    ds = get_spec(dataset)
    if preset and preset.dataset != dataset:
        raise BenchError(f"preset {preset.name!r} is for dataset {preset.dataset!r}; "
                         f"drop --dataset or pass --dataset {preset.dataset}")
    preset = preset or default_preset(spec.defense, dataset)

    defense_values = dict(preset.config) if preset else {}
    train_values = dict(preset.train) if preset else {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defense_fields = {f.name for f in dataclasses.fields(entry.config)}
    for item in spec.overrides:
        key, value = parse_override(item)
        if key in defense_fields:
            defense_values[key] = value
        elif key in train_fields:
            train_values[key] = value
        else:
            hint = did_you_mean(key, defense_fields | train_fields)
            raise BenchError(f"--set {key}: not a setting of {spec.defense!r} or of training{hint} "
                             f"(defense: {', '.join(sorted(defense_fields)) or 'none'}; "
                             f"training: {', '.join(sorted(train_fields))})")
    cfg = entry.make_config(defense_values)
    train_cfg = build_config(TrainConfig, train_values, what="training")
    arch = spec.arch or (preset.arch if preset and preset.arch else ds.default_arch)
    build_model(arch, ds)  # fail early on an unknown architecture
    return Recipe(spec.defense, cfg, train_cfg, ds, arch, spec.seed, preset)


# --- jobs ------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no weight gradients for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def subset_indices(n: int, subset: int) -> np.ndarray | None:
    """The fixed, seeded subset a cell runs on (the same for every checkpoint)."""
    if not subset or subset >= n:
        return None
    rng = np.random.default_rng(0)
    return np.sort(rng.permutation(n)[:subset])


def logit_stats(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Summary statistics of logits: the quantities the seeds explain robustness by."""
    return {
        "mean": float(logits.mean()),
        "variance": float(logits.var()),
        "dynamic_range": float((logits.amax(1) - logits.amin(1)).mean()),
        # The logit gap (true logit minus the best other) is the CW margin, negated.
        "mean_gap": float(-cw_margin(logits, y).mean()),
    }


def histogram(clean: torch.Tensor, adv: torch.Tensor, bins: int = 40) -> dict:
    lo = float(min(clean.min(), adv.min()))
    hi = float(max(clean.max(), adv.max()))
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    return {
        "edges": [round(e, 5) for e in edges.tolist()],
        "clean": np.histogram(clean.numpy().ravel(), edges)[0].tolist(),
        "adv": np.histogram(adv.numpy().ravel(), edges)[0].tolist(),
    }


@dataclass
class EvalJob:
    """Attack one model with one cell on (x, y); returns the row the store keeps."""

    model: torch.nn.Module
    cell: Cell
    x: torch.Tensor
    y: torch.Tensor
    device: str
    batch_size: int
    seed: int = 0
    fast: dict = dataclasses.field(default_factory=dict)
    """Fast-path keywords for evaluate (see Bench.fast)."""

    def run(self) -> dict:
        return evaluate(self.model, self.cell, self.x, self.y, device=self.device,
                        batch_size=self.batch_size, seed=self.seed, **self.fast)


# --- the fast path -----------------------------------------------------------------------
# Attacks and predictions keep their data on the device for the whole call, run in large
# batches with the model frozen (eval mode, no weight gradients), and, where the caller
# asks (Bench sets it from the device), in NHWC memory, in bf16 autocast, on a copy with
# batch norm folded into the convolutions, or compiled. On the CPU none of these is on by
# default, so fp32 results stay what they were.
_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def autocast(device: str, precision: str):
    """bf16 autocast on `device` for precision `bf16`; a no-op context for `fp32`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def memory_format(model: torch.nn.Module, channels_last: bool):
    """The model's 4-d weights in channels-last layout for the duration, then restored."""
    weights = [t for t in model.parameters() if t.dim() == 4]
    if not channels_last or not weights or weights[0].is_contiguous(memory_format=torch.channels_last):
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def _weights_key(model: torch.nn.Module) -> tuple:
    """Changes whenever a weight or buffer is replaced or updated in place."""
    return tuple((t.data_ptr(), t._version, tuple(t.stride()))
                 for t in itertools.chain(model.parameters(), model.buffers()))


@contextlib.contextmanager
def fast_model(model: torch.nn.Module, *, channels_last: bool = False, fold_bn: bool = False,
               compile: bool = False, exact_rewrites: bool = False):
    """The frozen model as the fast path runs it, built once and kept per model.

    Plain, channels-last or exactly rewritten only: the model itself or a traced graph
    that shares its parameters (weights converted to channels-last for the duration).
    With folding or compiling: a private copy, rebuilt when the model's weights change.
    """
    if not (fold_bn or compile):
        net = rewrite.exact_view(model) if exact_rewrites else model
        with memory_format(model, channels_last):
            yield net
        return
    key = (channels_last, fold_bn, compile, exact_rewrites, _weights_key(model))
    cached = _PREPARED.get(model)
    if cached is None or cached[0] != key:
        net = rewrite.fold_bn(model) if fold_bn else copy.deepcopy(model)
        if exact_rewrites:
            net = rewrite.exact_rewrite(net)
        net.eval().requires_grad_(False)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compile:  # dynamic batch: early stop shrinks the working batch
            net = torch.compile(net, dynamic=True)
        cached = _PREPARED[model] = (key, net)
    yield cached[1]


def _on_device(t: torch.Tensor, device: str, channels_last: bool) -> torch.Tensor:
    t = t.to(device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def craft(model, cell: Cell, x, y, *, device: str, batch_size: int, seed: int = 0,
          on_batch: Callable[[int], None] | None = None, precision: str = "fp32",
          channels_last: bool = False, fold_bn: bool = False, compile: bool = False,
          exact_rewrites: bool = False) -> torch.Tensor:
    """Adversarial examples for (x, y) from one cell, in batches, on `device`.

    The whole set moves to the device once and comes back once. `precision`,
    `channels_last`, `fold_bn`, `compile` and `exact_rewrites` select the fast path (see
    Bench); the defaults are the plain fp32 path.
    """
    perturb = ATTACKS.get(cell.attack).fn
    gen = torch.Generator(device=device).manual_seed(seed)
    xd, yd = _on_device(x, device, channels_last), y.to(device)
    out = []
    with frozen(model), fast_model(model, channels_last=channels_last, fold_bn=fold_bn, compile=compile,
                                   exact_rewrites=exact_rewrites) as net:
        for i in range(0, len(x), batch_size):
            xb, yb = xd[i:i + batch_size], yd[i:i + batch_size]
            with autocast(device, precision):
                x_adv = perturb(net, xb, yb, cell.config, generator=gen).detach()
            if x_adv.shape != xb.shape:
                raise RuntimeError(f"attack {cell.attack!r} returned inputs of the wrong shape")
            out.append(x_adv.float())
            if on_batch:
                on_batch(len(xb))
    x_adv = torch.cat(out)
    if bool(((x_adv < 0) | (x_adv > 1)).any()):
        raise RuntimeError(f"attack {cell.attack!r} returned inputs outside [0, 1]")
    return x_adv.cpu().contiguous()


@torch.no_grad()
def predict(model, x: torch.Tensor, *, device: str, batch_size: int, precision: str = "fp32",
            channels_last: bool = False) -> torch.Tensor:
    """Logits (fp32, on the CPU) for x, in batches on `device`; the model's mode is restored."""
    xd = _on_device(x, device, channels_last)
    with frozen(model), memory_format(model, channels_last), autocast(device, precision):
        logits = [model(xd[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.cat(logits).cpu()


def evaluate(model, cell: Cell, x, y, *, device: str, batch_size: int, seed: int = 0,
             on_batch: Callable[[int], None] | None = None, precision: str = "fp32",
             channels_last: bool = False, fold_bn: bool = False, compile: bool = False,
             exact_rewrites: bool = False) -> dict:
    """One cell on (x, y): crafted on the fast path, verified in fp32 (so a low-precision
    craft can only make the attack weaker, which `bench perf` measures, never the model
    look broken by rounding)."""
    idx = subset_indices(len(x), cell.subset)
    if idx is not None:
        x, y = x[idx], y[idx]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_adv = craft(model, cell, x, y, device=device, batch_size=batch_size, seed=seed, on_batch=on_batch,
                      precision=precision, channels_last=channels_last, fold_bn=fold_bn, compile=compile,
                      exact_rewrites=exact_rewrites)
    seconds = time.perf_counter() - start
    clean_logits = predict(model, x, device=device, batch_size=batch_size, channels_last=channels_last)
    adv_logits = predict(model, x_adv, device=device, batch_size=batch_size, channels_last=channels_last)
    clean = clean_logits.argmax(1) == y
    # A sample the model already gets wrong is not robust, whatever the attack returned.
    robust = (adv_logits.argmax(1) == y) & clean
    messages = sorted({str(w.message) for w in caught})
    return {
        "cell_key": cell.key, "attack": cell.attack, "threat": cell.threat,
        "params": dataclasses.asdict(cell.config),
        "clean_acc": float(clean.float().mean()), "robust_acc": float(robust.float().mean()),
        "n": len(y), "seconds": seconds, "correct_bits": pack_bits(robust.numpy()),
        "indices": None if idx is None else idx.tolist(),
        "extra": {"logit_hist": histogram(clean_logits, adv_logits),
                  "adv_logit_stats": logit_stats(adv_logits, y), "warnings": messages,
                  "precision": precision},
        "device": device,
    }


class LocalExecutor:
    """Runs jobs one after another in this process."""

    def map(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for job in jobs:
            yield job, job.run()


# --- the driver ------------------------------------------------------------------------
def package_version() -> str:
    try:
        return importlib.metadata.version("robustness-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ensure_checkpoint(bench: Bench, recipe: Recipe) -> tuple[Checkpoint, bool]:
    """The stored checkpoint for a recipe, training it first if absent. (row, trained?)"""
    key = recipe.key
    row = bench.store.checkpoint(key)
    if row is not None:
        return row, False
    ds = recipe.dataset
    directory = ckpt.checkpoint_dir(bench.results, ds.name, recipe.defense, key)
    meta = ckpt.read_meta(directory)
    trained = meta is None
    if trained:  # not on disk either (a run killed after writing adopts its file instead)
        meta = train_checkpoint(bench, recipe, directory)
    row = bench.store.add_checkpoint(
        key=key, dataset=ds.name, defense=recipe.defense,
        preset=recipe.preset.name if recipe.preset else None, arch=recipe.arch, seed=recipe.seed,
        threat=ds.threat.name, config=meta["config"], train_config=meta["train"], path=str(directory),
        sha256=meta["sha256"], epochs=meta["epochs"], train_seconds=meta["train_seconds"],
        device=meta["device"], meta=meta)
    return row, trained


def train_checkpoint(bench: Bench, recipe: Recipe, directory: Path) -> dict:
    ds = recipe.dataset
    entry = DEFENSES.get(recipe.defense)
    x, y = load_dataset(ds.name, "train", bench.data_root)
    x_test, y_test = load_dataset(ds.name, "test", bench.data_root)
    device = bench.device
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.arch, ds).to(device)
    ctx = TrainContext(ds.num_classes, ds.threat, torch.Generator(device=device).manual_seed(recipe.seed))
    on_step, done = _progress(bench, f"train {recipe.defense} [{recipe.key[:8]}]",
                              recipe.train_config.epochs * -(-len(x) // recipe.train_config.batch_size))
    try:
        result = train(model, entry.fn, recipe.config, recipe.train_config, x.to(device), y.to(device),
                       ctx, on_step=on_step, precision=bench.precision, channels_last=bench.channels_last)
    except FloatingPointError as exc:
        raise BenchError(f"training {recipe.defense!r} diverged: {exc}; lower lr or the "
                         "regularization weight with --set") from exc
    finally:
        done()
    logits = predict(model, x_test, device=device, batch_size=bench.batch_size())
    meta = {
        "key": recipe.key, "defense": recipe.defense, "config": dataclasses.asdict(recipe.config),
        "train": dataclasses.asdict(recipe.train_config), "dataset": ds.name, "arch": recipe.arch,
        "seed": recipe.seed, "epochs": recipe.train_config.epochs, "train_seconds": result.seconds,
        "train_losses": result.losses, "device": _device_name(device),
        "preset": recipe.preset.name if recipe.preset else None,
        "paper": recipe.preset.paper if recipe.preset else {},
        "preset_description": recipe.preset.description if recipe.preset else "",
        "preset_source": recipe.preset.source if recipe.preset else "",
        # The intra-op thread count changes float summation order, hence the weights.
        "torch_threads": torch.get_num_threads(),
        "clean_acc": float((logits.argmax(1) == y_test).float().mean()),
        "logit_stats": logit_stats(logits, y_test),
        "package_version": package_version(), "git_commit": ckpt.git_commit(),
        "torch_version": torch.__version__, "precision": bench.precision,
    }
    return ckpt.save_checkpoint(model, directory, meta)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


def _progress(bench: Bench, label: str, total: int):
    """(on_step, done) callbacks driving one progress bar, or no-ops without a display."""
    if bench.progress is None:
        return None, lambda: None
    task = bench.progress.add_task(label, total=total)

    def on_step(step, *_):
        bench.progress.update(task, completed=step)

    return on_step, lambda: bench.progress.remove_task(task)


def load_model(row: Checkpoint, device: str) -> torch.nn.Module:
    meta = ckpt.read_meta(Path(row.path))
    if meta is None or meta["sha256"] != row.sha256:
        raise BenchError(f"checkpoint {row.key} at {row.path!r} is missing or altered; delete its "
                         "row or restore the folder")
    return ckpt.build_from_meta(meta, Path(row.path) / "model.safetensors", device)


@dataclass
class RunReport:
    checkpoint: Checkpoint
    trained: bool
    cells_run: list[str]
    cells_total: int


def run_defense(bench: Bench, spec: RunSpec, matrix: str, executor=None) -> RunReport:
    recipe = resolve(spec)
    cells = matrix_cells(matrix, recipe.dataset.threat)  # a bad matrix fails before training
    row, trained = ensure_checkpoint(bench, recipe)
    done = bench.store.done_cells(row.id)
    missing = [c for c in cells if c.key not in done]
    ran: list[str] = []
    if missing:
        x, y = load_dataset(recipe.dataset.name, "test", bench.data_root)
        model = load_model(row, bench.device)
        executor = executor or LocalExecutor()
        jobs = [EvalJob(model, c, x, y, bench.device, bench.batch_size(), fast=bench.fast) for c in missing]
        on_step, finish = _progress(bench, f"attack {recipe.defense} [{row.key[:8]}]", len(jobs))
        try:
            for i, (job, result) in enumerate(executor.map(jobs), 1):
                bench.store.add_evaluation(row.id, **result)
                ran.append(job.cell.key)
                if on_step:
                    on_step(i)
        finally:
            finish()
    from bench.flags import recompute_flags

    recompute_flags(bench.store, row)
    return RunReport(row, trained, ran, len(cells))
