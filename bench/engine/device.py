"""Device handling: which device and arithmetic a command runs on, and the contexts
every model call on it goes through (frozen weights, autocast, memory layout, seeded
noise)."""

from __future__ import annotations

import contextlib

import torch

from bench.errors import BenchError

PRECISIONS = ("fp32", "bf16")
"""The fast path's arithmetic: fp32, or bf16 autocast (weights and iterates stay fp32)."""


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a one-line error naming them."""
    if precision not in PRECISIONS:
        raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


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
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def autocast(device: str, precision: str):
    """bf16 autocast on `device` for precision `bf16`; a no-op context for `fp32`."""
    check_precision(precision)
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


@contextlib.contextmanager
def full_fp32():
    """True fp32 for the duration: TF32 off for CUDA matmuls and cuDNN convolutions (torch
    leaves cuDNN's on by default, which rounds inputs to 10 mantissa bits), then the
    caller's settings restored. Every verdict and confirmation runs under it."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def on_device(t: torch.Tensor, device: str, channels_last: bool) -> torch.Tensor:
    t = t.to(device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


@contextlib.contextmanager
def seeded_noise(device: str, seed: int):
    """torch's global generators (CPU and `device`) seeded for the duration, then restored."""
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        yield
