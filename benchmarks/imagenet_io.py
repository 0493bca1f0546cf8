"""ImageNet from disk, measured: how fast the training stream decodes and augments, and how
much memory judging a 5,000-image evaluation set takes.

    python benchmarks/imagenet_io.py throughput                 # 2,000 training JPEGs, this machine's cores
    python benchmarks/imagenet_io.py throughput --images 500 --workers 0 2
    python benchmarks/imagenet_io.py memory                     # 5,000 val images, a quick eval
    python benchmarks/imagenet_io.py memory --transfer          # ... then a transfer grid on them
    python benchmarks/imagenet_io.py memory --breaks            # a cell that breaks all 5,000

`throughput` writes a folder of real JPEG files (random sizes around ImageNet's mean of
about 400 x 350 px) in the ILSVRC-2012 layout, then reads one epoch of it two ways with
the same DataLoader worker counts and batch size: the bench's stream
(bench.core.folders.StreamedFolder: per-image seeded random resized crop and flip,
uint8 across processes, float32 made per batch) and torchvision's reference pipeline
(`ImageFolder` with RandomResizedCrop(224), RandomHorizontalFlip and ToTensor, float32
across processes). It prints images per second for each worker count and the ratio.

`memory` writes a 5,000-image `val/` (and a small `train/`), then runs `bench eval` on a
small patch CNN with a one-FGSM matrix in a subprocess and prints its peak resident
memory (with `--breaks`, on images shaded by class and a model that reads the shade, which
the FGSM cell at 16/255 breaks every one of, so it keeps 5,000 inputs), beside the 3.0 GB the 5,000 images would take as float32 and the 0.75 GB they
take as uint8. With `--transfer` it then runs `bench transfer --source all --target all`
on the same set (PGD-10 crafted on the patch CNN, cached on disk, judged) in a subprocess
of its own and prints that one's peak. Nothing here is a test: nothing fails when it is
slow or large.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.core.folders import CROP, StreamedFolder, class_names, image_files

CLASSES = 10


SHADE = 20
"""Grey levels between two classes' images in a folder written `shaded`."""


def write_folder(
    root: Path, split: str, images: int, seed: int = 0, size: tuple[int, int] = (400, 350), shaded: bool = False
) -> Path:
    """`images` JPEG files under root/split/<synset>/, round robin over CLASSES folders;
    `shaded`, class c's images are noise around grey level c * SHADE."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        w, h = (int(v * rng.uniform(0.8, 1.2)) for v in size)
        # Smooth noise compresses like a photograph more than white noise does.
        low, high = ((i % CLASSES) * SHADE, (i % CLASSES) * SHADE + 4) if shaded else (0, 256)
        small = rng.integers(low, high, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        Image.fromarray(pixels).save(root / split / f"n{i % CLASSES:08d}" / f"{split}_{i:06d}.JPEG", quality=90)
    return root


def _epoch(loader) -> float:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch[1])
    return n / (time.perf_counter() - start)


def throughput(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="imagenet-io-"))
    print(f"writing {args.images} JPEG files under {root} ...", file=sys.stderr)
    write_folder(root, "train", args.images)
    files = tuple(image_files(root, "train", class_names(root, ""), ""))
    from torchvision import datasets, transforms

    reference = datasets.ImageFolder(
        str(root / "train"),
        transforms.Compose(
            [transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        ),
    )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    batches = list(order.split(args.batch_size))
    print(f"one epoch of {len(files)} images, batch {args.batch_size}, on {os.cpu_count()} cores\n")
    print("| decoding processes | bench stream, images/s | torchvision ImageFolder, images/s | ratio |")
    print("|---:|---:|---:|---:|")
    for workers in args.workers:
        ours = StreamedFolder(root, files, seed=0, workers=workers)
        theirs = torch.utils.data.DataLoader(
            reference,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
        bench_rate = max(_epoch(((x, y) for x, y in ours.batches(batches, e, torch.device("cpu")))) for e in range(2))
        ref_rate = max(_epoch(theirs) for _ in range(2))
        print(f"| {workers} | {bench_rate:,.0f} | {ref_rate:,.0f} | {bench_rate / ref_rate:.2f} |")


def memory(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="imagenet-mem-"))
    print(f"writing {args.images} val and 20 train JPEG files under {root} ...", file=sys.stderr)
    write_folder(root, "val", args.images, size=(300, 260), shaded=args.breaks)
    write_folder(root, "train", 20, seed=1, size=(300, 260))
    matrix = root / "fgsm.toml"
    matrix.write_text('[[cell]]\nattack = "fgsm"\n')
    model = root / "tiny.py"
    model.write_text(
        "import torch\n\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, 16), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(8 * 14 * 14, 1000))\n\n\n"
        "class Shade(torch.nn.Module):\n"
        "    # The class whose grey level is nearest the image's mean: right on every shaded\n"
        "    # image, and wrong once FGSM at 16/255 has moved every pixel away from it.\n"
        "    def forward(self, x):\n"
        f"        level = x.mean((1, 2, 3)) * 255 / {SHADE}\n"
        "        return -((level[:, None] - torch.arange(1000, dtype=x.dtype)) ** 2)\n\n\n"
        "def shade():\n"
        "    return Shade()\n"
    )
    common = ["--dataset", "imagenet", "--data-root", str(root), "--results", str(root / "results"), "--device", "cpu"]
    n = args.images
    as_float, as_uint8 = n * 3 * CROP * CROP * 4 / 2**30, n * 3 * CROP * CROP / 2**30
    judged = ["--model", f"{model}:shade", "--eps", "0.0627"] if args.breaks else ["--model", f"{model}:build"]
    seconds, peak = _peak(["eval", *judged, "--name", "tiny", "--matrix", str(matrix), *common], root)
    what = ", which breaks every image" if args.breaks else ""
    print(f"bench eval on {n} val images at {CROP} px, one FGSM cell{what}: {seconds:.0f} s")
    print(f"peak resident memory {peak:.2f} GiB; the set as float32 {as_float:.2f} GiB, as uint8 {as_uint8:.2f} GiB")
    if args.transfer:
        seconds, peak = _peak(["transfer", "--source", "all", "--target", "all", *common], root)
        print(f"bench transfer on the same {n} images, PGD-10 crafted, cached and judged: {seconds:.0f} s")
        print(f"peak resident memory {peak:.2f} GiB; the crafted set as float32 {as_float:.2f} GiB")


def _peak(arguments: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak resident GiB) of one `bench` command in a child process of its own."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *arguments], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert child.stderr is not None
    stderr = child.stderr.read().decode()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not every child's
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench {arguments[0]} failed: {stderr.strip().splitlines()[-1:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1])
    m = sub.add_parser("memory")
    m.add_argument("--images", type=int, default=5000)
    m.add_argument("--transfer", action="store_true", help="then a transfer grid on the same set, measured apart")
    m.add_argument("--breaks", action="store_true", help="images and a model FGSM at 16/255 breaks all of")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"throughput": throughput, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
