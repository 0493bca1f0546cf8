"""ResNet-50 at ImageNet's 224 px on GPUs: images per second for PGD-10 evaluation and for
one-step adversarial training, on one GPU and on all of the machine's GPUs.

    python benchmarks/imagenet_gpu.py                     # every GPU of the machine
    python benchmarks/imagenet_gpu.py --gpus 1 --batch 128
    python benchmarks/imagenet_gpu.py --device cpu --images 8 --batch 4   # a smoke test

The images are synthetic (uniform noise at 224 px, random labels over 1,000 classes: the
speed of a ResNet-50 does not depend on what the pixels show), so the script needs no
dataset and no network. Both measurements run the bench's own code at its GPU settings:

- evaluation: the bench's PGD (attacks/pgd.py: 10 steps at L-inf 4/255, random start,
  early stop off so every image costs the same) on the model as `bench run` builds it
  (bench.core.models, the normalization inside), under bf16 autocast in channels-last;
- training: the bench's training loop (bench.engine.train) with the `pgd_at` defense and a
  one-step adversary (Wong et al.'s FGSM-with-random-start setting, all examples
  adversarial), SGD at the batch given, bf16 autocast, channels-last.

On N GPUs each runs the same work in its own process on its own share (the data-parallel
workers of `bench run --workers N` do the same per step, plus an all-reduce of 25M
gradients); it prints each measurement on one GPU, on all of them together, and their
ratio. The first batches of each measurement are warm-up and are not timed. This is a
measurement for a lent GPU machine, not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.multiprocessing as mp

from attacks.pgd import PGD, run_pgd
from bench.core.data import get_spec
from bench.core.models import build_model
from bench.core.trainsets import InMemory
from bench.engine.schedule import TrainConfig
from bench.engine.train import train_set_model
from bench.registry import DEFENSES

ARCH = "resnet50"
WARMUP = 2
"""Batches run before the clock starts (cuDNN autotuning, allocator growth)."""


def _data(images: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(images, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (images,), generator=g)
    return x.to(device), y.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def evaluate(device: str, images: int, batch: int, seed: int = 0) -> float:
    """Images per second of PGD-10 over `images` synthetic images, batch by batch."""
    spec = get_spec("imagenet")
    model = build_model(ARCH, spec).to(device).eval().to(memory_format=torch.channels_last)
    x, y = _data(images, device, seed)
    cfg = PGD(eps=spec.threat.eps, steps=10, step_size=spec.threat.eps / 4, early_stop=False)
    g = torch.Generator(device=device).manual_seed(seed)
    batches = list(zip(x.split(batch), y.split(batch), strict=True))
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        for xb, yb in batches[:WARMUP]:
            run_pgd(model, xb.contiguous(memory_format=torch.channels_last), yb, cfg, g)
        _sync(device)
        start = time.perf_counter()
        for xb, yb in batches[WARMUP:]:
            run_pgd(model, xb.contiguous(memory_format=torch.channels_last), yb, cfg, g)
        _sync(device)
    timed = sum(len(yb) for _, yb in batches[WARMUP:])
    return timed / (time.perf_counter() - start)


def train(device: str, images: int, batch: int, seed: int = 0) -> float:
    """Images per second of one epoch of one-step adversarial training (after warm-up)."""
    spec, entry = get_spec("imagenet"), DEFENSES.get("pgd_at")
    config = entry.make_config({"attack_steps": 1, "attack_step_size": 1.25 * spec.threat.eps, "clean_weight": 0.0})
    x, y = _data(images, device, seed)
    schedule = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=0.1, schedule="constant")
    fast = device.startswith("cuda")
    seconds: list[float] = []

    def on_step(step: int, total: int) -> None:
        _sync(device)
        seconds.append(time.perf_counter())

    train_set_model(
        ARCH,
        spec,
        entry.fn,
        config,
        schedule,
        InMemory(x, y),
        seed=seed,
        device=device,
        on_step=on_step,
        precision="bf16" if fast else "fp32",
        channels_last=fast,
    )
    steps = len(seconds) - WARMUP
    return steps * batch / (seconds[-1] - seconds[WARMUP - 1]) if steps > 0 else float("nan")


def _one(rank: int, args, out) -> None:
    device = f"cuda:{rank}" if args.device == "cuda" else args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    out[rank] = (evaluate(device, args.images, args.batch, rank), train(device, args.images, args.batch, rank))


def _run(gpus: int, args) -> tuple[float, float]:
    """Summed images per second of `gpus` processes, one per GPU."""
    if gpus == 1:
        out: dict = {}
        _one(0, args, out)
        return out[0]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_one, args=(args, out), nprocs=gpus, join=True)
        return sum(v[0] for v in out.values()), sum(v[1] for v in out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use together (default: all)")
    ap.add_argument("--images", type=int, default=2048, help="images per GPU and measurement")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (--device cpu runs a smoke test)")
    if args.images < (WARMUP + 1) * args.batch:
        raise SystemExit(f"--images must be at least {(WARMUP + 1) * args.batch} (warm-up batches plus one timed)")
    available = torch.cuda.device_count() if args.device == "cuda" else 1
    gpus = available if args.gpus is None else args.gpus
    if not 1 <= gpus <= available:
        raise SystemExit(f"--gpus must be between 1 and {available}")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{ARCH} at 224 px on {name}; batch {args.batch}, {args.images} images per device and measurement")
    one = _run(1, args)
    print("| devices | PGD-10 evaluation, images/s | 1-step adversarial training, images/s |\n|---:|---:|---:|")
    print(f"| 1 | {one[0]:,.0f} | {one[1]:,.0f} |")
    if gpus > 1:
        many = _run(gpus, args)
        print(f"| {gpus} | {many[0]:,.0f} | {many[1]:,.0f} |")
        print(f"{gpus} GPUs over one: {many[0] / one[0]:.2f}x evaluating, {many[1] / one[1]:.2f}x training")


if __name__ == "__main__":
    main()
