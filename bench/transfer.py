"""Black-box transfer grids: craft on a source checkpoint, evaluate targets on it.

Adversarial examples are crafted once per (source checkpoint, cell) and cached as
safetensors under results/transfers/, so a rerun or a new target never recrafts. Each
(source, target, cell) result is one row committed in its own transaction. The
diagonal of a grid is the source attacking itself, i.e. white-box, kept for reference.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.data import get_spec, load_dataset
from bench.errors import BenchError
from bench.flags import recompute_flags
from bench.matrix import Cell, make_cell, parse_cell_key
from bench.env import Bench
from bench.fastpath import craft, predict
from bench.schedule import load_model
from bench.store import Checkpoint, pack_bits

DEFAULT_ATTACK = {"steps": 10}  # PGD-10, as Summers & Dinneen Table 2


@dataclass
class TransferReport:
    crafted: int = 0
    reused: int = 0
    evaluated: int = 0
    skipped: int = 0
    grid: list[dict] = field(default_factory=list)


def select(checkpoints: list[Checkpoint], name: str, role: str, dataset: str) -> list[Checkpoint]:
    """`all`, a defense name, or a checkpoint key prefix."""
    if name == "all":
        chosen = checkpoints
    else:
        chosen = [c for c in checkpoints if c.defense == name] or \
                 [c for c in checkpoints if c.key.startswith(name)]
    if not chosen:
        raise BenchError(f"no stored {dataset} checkpoint matches --{role} {name!r}: train one first "
                         f"(`bench run --defense {name if name != 'all' else 'NAME'} --dataset {dataset}`)")
    return chosen


def cache_path(results: Path, source: Checkpoint, cell: Cell) -> Path:
    digest = hashlib.sha256(cell.key.encode()).hexdigest()[:16]
    return results / "transfers" / source.dataset / source.key / f"{digest}.safetensors"


def crafted_examples(bench: Bench, source: Checkpoint, cell: Cell, x, y) -> tuple[torch.Tensor, bool]:
    """(x_adv, reused?) for a source and cell, from the cache or freshly crafted."""
    path = cache_path(bench.results, source, cell)
    if path.is_file():
        cached = load_file(str(path))
        if cached["x_adv"].shape == x.shape:
            return cached["x_adv"], True
    model = load_model(source, bench.device)
    # Crafted on the fast path (bf16 on a GPU); targets are always judged in fp32 below.
    x_adv = craft(model, cell, x, y, device=bench.device, batch_size=bench.batch_size(), **bench.fast)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"x_adv": x_adv.contiguous()}, tmp, metadata={"cell": cell.key, "source": source.key})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return x_adv, False


def run_transfers(bench: Bench, source: str, target: str, attack: str | None,
                  dataset: str = "digits") -> TransferReport:
    spec = get_spec(dataset)
    cell = parse_cell_key(attack, spec.threat) if attack else make_cell("pgd", DEFAULT_ATTACK, spec.threat)
    if cell.subset:
        raise BenchError("transfer cells run on the whole test set; drop subset= from --attack")
    checkpoints = bench.store.checkpoints(dataset=dataset)
    sources = select(checkpoints, source, "source", dataset)
    targets = select(checkpoints, target, "target", dataset)
    x, y = load_dataset(dataset, "test", bench.data_root)
    report = TransferReport()
    models: dict[int, torch.nn.Module] = {}
    clean: dict[int, torch.Tensor] = {}
    touched: set[int] = set()
    task = bench.progress.add_task("transfer", total=len(sources) * len(targets)) if bench.progress else None
    for src in sources:
        done = bench.store.done_transfers(src.id, cell.key)
        todo = [t for t in targets if t.id not in done]
        report.skipped += len(targets) - len(todo)
        if todo:
            x_adv, reused = crafted_examples(bench, src, cell, x, y)
            report.reused += reused
            report.crafted += not reused
        for tgt in todo:
            if tgt.id not in models:
                models[tgt.id] = load_model(tgt, bench.device)
                clean[tgt.id] = predict(models[tgt.id], x, device=bench.device,
                                        batch_size=bench.batch_size()).argmax(1) == y
            adv = predict(models[tgt.id], x_adv, device=bench.device, batch_size=bench.batch_size())
            robust = (adv.argmax(1) == y) & clean[tgt.id]
            bench.store.add_transfer(
                src.id, tgt.id, cell_key=cell.key, attack=cell.attack, params=dict(vars(cell.config)),
                threat=cell.threat, clean_acc=float(clean[tgt.id].float().mean()),
                robust_acc=float(robust.float().mean()), n=len(y), seconds=0.0,
                correct_bits=pack_bits(robust.numpy()), indices=None, extra={}, device=bench.device)
            report.evaluated += 1
            touched.add(tgt.id)
        if task is not None:
            bench.progress.advance(task, len(targets))
    for ck in targets:
        if ck.id in touched:
            recompute_flags(bench.store, ck)
    # A defense's name alone where it has one checkpoint here; with its key where several.
    counts = {d: sum(c.defense == d for c in checkpoints) for d in {c.defense for c in checkpoints}}
    names = {c.id: c.defense if counts[c.defense] == 1 else f"{c.defense}[{c.key[:6]}]" for c in checkpoints}
    wanted_src, wanted_tgt = {c.id for c in sources}, {c.id for c in targets}
    report.grid = [{"source": names[t.source_id], "target": names[t.target_id], "robust_acc": t.robust_acc,
                    "cell": t.cell_key}
                   for t in bench.store.transfers(wanted_tgt)
                   if t.cell_key == cell.key and t.source_id in wanted_src and t.target_id in wanted_tgt]
    return report
