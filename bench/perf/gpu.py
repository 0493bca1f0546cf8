"""The GPU figures of `bench perf` (CUDA only): FLOPs per image, the bf16 matmul peak,
CIFAR-shaped synthetic data, PGD on ResNet-18 and WideResNet-28-10, and PGD training."""

from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, replace
from typing import Any

import torch

from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.models import build_model
from bench.engine.cell import craft
from bench.engine.device import frozen
from bench.engine.fast import PLAIN
from bench.engine.train import TrainConfig, train_model
from bench.perf.races import _robust, precision_check, race
from bench.perf.sizes import PerfSize
from bench.perf.timing import Log, _median_times, _timed
from bench.run.workspace import Workspace
from defenses._parts import pgd_adversary

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), by a piece of
# the device name; the measured large-matmul rate is reported beside it.
DATASHEET_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "RTX 4090": 165.2,
}


def flops_per_image(model, shape, device: str) -> dict:
    """Forward FLOPs and one PGD step's FLOPs (forward + input gradient) per image,
    counted by FlopCounterMode on a frozen model in fp32 (the count is the same in bf16)."""
    # Imported here: the FLOP counter pulls in torch's op registries (a quarter of a second),
    # and only `bench perf` and benchmarks/cost.py count FLOPs.
    from torch.utils.flop_counter import FlopCounterMode

    n = 4
    x = torch.rand((n, *shape), device=device)
    with frozen(model):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(x)
        xg = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as step:
            loss = torch.nn.functional.cross_entropy(model(xg), torch.zeros(n, dtype=torch.long, device=device))
            loss.backward()  # only xg needs a gradient: the weights are frozen
    return {"forward": fwd.get_total_flops() / n, "pgd_step": step.get_total_flops() / n}


def matmul_peak(device: str, n: int = 8192) -> float:
    """bf16 TFLOP/s of a large matrix product on random data (the measured ceiling)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 10
    t, _ = _timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / t / 1e12


def synthetic_cifar(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped data a network can learn: each class a smooth random colour pattern,
    under per-pixel noise. Only for timing and for comparing precisions; no claim about
    CIFAR itself."""
    g = torch.Generator().manual_seed(0)
    templates = torch.nn.functional.interpolate(
        torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False
    )
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 + 0.25 * (templates[y] - 0.5) + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp_(0, 1).to(device), y.to(device)


def train_timing(ws: Workspace, size: PerfSize, log: Log) -> tuple[dict, torch.nn.Module]:
    """Seconds per epoch of pgd_at-style 7-step PGD training of ResNet-18 on CIFAR-shaped
    synthetic data, through bench.engine.train with the bench's fast path."""
    spec = get_spec("cifar10")
    th = spec.threat
    x, y = synthetic_cifar(size.train_images, 1, ws.device)

    def at_loss(model, xb, yb, cfg, ctx):  # Madry et al.: the adversary's loss only
        xa = pgd_adversary(model, xb, yb, eps=th.eps, steps=7, step_size=th.step_size, generator=ctx.generator)
        return torch.nn.functional.cross_entropy(model(xa), yb)

    runs, kept = [], None
    for batch, epochs in size.train_runs:
        tcfg = TrainConfig(
            epochs=epochs,
            batch_size=batch,
            optimizer="sgd",
            lr=0.05,
            weight_decay=5e-4,
            schedule="constant",
            augment="crop_flip",
        )
        model, res = train_model(
            "resnet18",
            spec,
            at_loss,
            None,
            tcfg,
            x,
            y,
            seed=0,
            device=ws.device,
            precision=ws.precision,
            channels_last=ws.channels_last,
        )
        per_epoch = res.epoch_seconds
        for e, (s, loss) in enumerate(zip(per_epoch, res.losses, strict=True)):
            log(f"train resnet18 batch {batch}: epoch {e + 1} {s:.2f} s (loss {loss:.3f})")
        steady = per_epoch[1:] or per_epoch
        runs.append(
            {
                "batch_size": batch,
                "images": len(x),
                "attack_steps": 7,
                "epoch_seconds": per_epoch,
                "seconds_per_epoch": statistics.mean(steady),
                "note": "first epoch includes warm-up" if len(per_epoch) > 1 else "one epoch, warm-up included",
            }
        )
        if kept is None:
            kept = model
    # An epoch costs 8 forward and 8 backward passes per image (7 adversary steps, 1 update).
    return {
        "recipe": "ResNet-18, 7-step L-inf PGD training (eps 8/255, step 2/255), SGD, crop+flip",
        "data": "CIFAR-shaped synthetic (class colour patterns + noise)",
        "precision": ws.precision,
        "channels_last": ws.channels_last,
        "runs": runs,
    }, kept.eval()


def gpu_models(ws: Workspace, size: PerfSize, trained: torch.nn.Module | None, peak: float, log: Log) -> dict:
    spec = get_spec("cifar10")
    out: dict[str, Any] = {}
    x, y = synthetic_cifar(size.gpu_images, 2, ws.device)
    datasheet = out_peak(ws.device)
    for arch in size.gpu_archs:
        if arch == "resnet18" and trained is not None:
            model, weights = trained, "trained here (7-step PGD training, synthetic CIFAR-shaped data)"
        else:
            torch.manual_seed(0)
            model, weights = build_model(arch, spec).to(ws.device).eval(), "random (seeded init)"
        flops = flops_per_image(model, spec.shape, ws.device)
        batch = size.gpu_batch.get(arch, ws.batch_size())
        steps = size.gpu_steps
        total_flops = (steps * flops["pgd_step"] + flops["forward"]) * len(x)
        res: dict[str, Any] = {
            "weights": weights,
            "flops_per_image": flops,
            "images": len(x),
            "steps": steps,
            "batch_size": batch,
            "pgd_flops_total": total_flops,
            "variants": {},
        }
        # (label, fast-path keywords, early stop); equal work (early stop off) is what the
        # FLOP rate and the targets are measured on.
        variants = [("default", ws.fast, False), ("default_early_stop", ws.fast, True)]
        if arch in size.gpu_fp32_archs:
            variants.append(("fp32_plain", PLAIN, False))
        if ws.fold_bn and size.gpu_ablations:
            variants.append(("default_without_bn_folding", replace(ws.fast, fold_bn=False), False))
        if ws.channels_last and size.gpu_ablations:
            variants.append(("default_nchw", replace(ws.fast, channels_last=False), False))
        if size.gpu_compile and arch == "resnet18":
            variants.append(("default_compiled", replace(ws.fast, compile=True), False))
        for label, fast, early in variants:
            cell = make_cell("pgd", {"steps": steps, "early_stop": early}, spec.threat)
            log(f"{arch}: PGD-{steps} on {len(x)} images, {label}")
            # Bound now: the timer calls it within this iteration, and `model` is deleted after the loop.
            f = functools.partial(craft, model, cell, x, y, device=ws.device, batch_size=batch, fast=fast)
            first, _ = _timed(f, ws.device)  # warm-up (and compiling, if asked)
            t, outs = _median_times({"t": f}, 1 if arch != "resnet18" else 2, ws.device)
            sec = t["t"]
            row = {
                "seconds": sec,
                "first_call_seconds": first,
                "fast_path": asdict(fast),
                "early_stop": early,
                "images_steps_per_s": len(x) * steps / sec,
                "robust_acc": _robust(model, outs["t"], x, y, ws),
            }
            if not early:
                row["achieved_tflops"] = total_flops / sec / 1e12
                row["fraction_of_measured_peak"] = row["achieved_tflops"] / peak
                if datasheet:
                    row["fraction_of_datasheet_peak"] = row["achieved_tflops"] / datasheet
            res["variants"][label] = row
            log(f"{arch} {label}: {sec:.2f} s ({row.get('achieved_tflops', float('nan')):.0f} TFLOP/s)")
        if arch == "resnet18":
            res["race"] = race(model, x, y, spec.threat, ws, steps=steps, repeats=1, batch_size=batch, log=log)
            if trained is not None:
                res["precision"] = precision_check(
                    model,
                    x,
                    y,
                    spec.threat,
                    ws,
                    batch_size=batch,
                    repeats=1,
                    log=log,
                    cells=[{"steps": steps}, {"steps": steps, "loss": "cw"}],
                )
        out[arch] = res
        del model
        torch.cuda.empty_cache()
    return out


def out_peak(device: str) -> float | None:
    """The datasheet's dense bf16 TFLOP/s for this device, where the table knows it."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
