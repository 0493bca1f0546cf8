"""What is missing -> jobs -> an executor. Only this driver writes to the store.

`run_defense` resolves a recipe (defense defaults, then a preset, then --set
overrides), finds or trains its checkpoint, expands the matrix, and evaluates the cells
the store lacks, committing each in its own transaction. `LocalExecutor` runs jobs in
this process; an executor for a cluster only has to honour the same `map`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from bench import checkpoint as ckpt
from bench.data import DatasetSpec, get_spec, load_dataset
from bench.errors import BenchError
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

    @classmethod
    def open(cls, results: str | os.PathLike, db: str | None = None, device: str = "auto",
             data_root: str | None = None, progress: Any = None) -> "Bench":
        path = Path(results)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise BenchError(f"results folder {str(path)!r} is not writable ({exc.strerror}); "
                             "pass --results DIR or set BENCH_RESULTS to a folder you can write") from exc
        return cls(path, Store.for_results(path, db), resolve_device(device), data_root, progress)

    def batch_size(self) -> int:
        return self.eval_batch or (4096 if self.device.startswith("cuda") else 1024)


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
            import difflib

            close = difflib.get_close_matches(key, defense_fields | train_fields, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
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
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return {
        "mean": float(logits.mean()),
        "variance": float(logits.var()),
        "dynamic_range": float((logits.amax(1) - logits.amin(1)).mean()),
        "mean_gap": float((true - other.amax(1)).mean()),
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

    def run(self) -> dict:
        return evaluate(self.model, self.cell, self.x, self.y, device=self.device,
                        batch_size=self.batch_size, seed=self.seed)


def craft(model, cell: Cell, x, y, *, device: str, batch_size: int, seed: int = 0,
          on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Adversarial examples for (x, y) from one cell, in batches, on `device`."""
    perturb = ATTACKS.get(cell.attack).fn
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    with frozen(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            yb = y[i:i + batch_size].to(device)
            x_adv = perturb(model, xb, yb, cell.config, generator=gen).detach()
            if x_adv.shape != xb.shape or bool((x_adv < 0).any() or (x_adv > 1).any()):
                raise RuntimeError(f"attack {cell.attack!r} returned inputs outside [0, 1] or of the wrong shape")
            out.append(x_adv.cpu())
            if on_batch:
                on_batch(len(xb))
    return torch.cat(out)


@torch.no_grad()
def predict(model, x: torch.Tensor, *, device: str, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def evaluate(model, cell: Cell, x, y, *, device: str, batch_size: int, seed: int = 0,
             on_batch: Callable[[int], None] | None = None) -> dict:
    idx = subset_indices(len(x), cell.subset)
    if idx is not None:
        x, y = x[idx], y[idx]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_adv = craft(model, cell, x, y, device=device, batch_size=batch_size, seed=seed, on_batch=on_batch)
    seconds = time.perf_counter() - start
    clean_logits = predict(model, x, device=device, batch_size=batch_size)
    adv_logits = predict(model, x_adv, device=device, batch_size=batch_size)
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
                  "adv_logit_stats": logit_stats(adv_logits, y), "warnings": messages},
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
                       ctx, on_step=on_step)
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
        "clean_acc": float((logits.argmax(1) == y_test).float().mean()),
        "logit_stats": logit_stats(logits, y_test),
        "package_version": package_version(), "git_commit": ckpt.git_commit(),
        "torch_version": torch.__version__,
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
        jobs = [EvalJob(model, c, x, y, bench.device, bench.batch_size()) for c in missing]
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
