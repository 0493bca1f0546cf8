"""Differentiable interval bounds on a model's logits, for interval bound propagation
training (Gowal et al. 2018).

The model's forward pass is traced with torch.fx and run again on intervals, each a
(center, radius) pair of tensors, so autograd differentiates the bounds: affine layers
map the center through the layer and the radius through its absolute weights; ReLU and
max pooling, being monotone, map the two ends; a residual add adds centers and radii.
Tracing rather than walking `nn.Sequential` takes the bench's own networks, whose
forward passes call `F.relu` and `F.max_pool2d` as functions. Any other operation on an
interval is refused (`Unsupported`), naming it.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from bench.verify.graph import Unsupported, unsupported


class Interval:
    """A box of tensors: center `c`, radius `r` (r >= 0)."""

    def __init__(self, c: torch.Tensor, r: torch.Tensor):
        self.c, self.r = c, r

    def monotone(self, fn) -> Interval:
        lo, hi = fn(self.c - self.r), fn(self.c + self.r)
        return Interval((hi + lo) / 2, (hi - lo) / 2)

    def shape_op(self, fn) -> Interval:
        return Interval(fn(self.c), fn(self.r))


def _module(m: nn.Module, v: Interval, name: str) -> Interval:
    if isinstance(m, nn.Linear):
        return Interval(F.linear(v.c, m.weight, m.bias), F.linear(v.r, m.weight.abs()))
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise unsupported(name, "Conv2d", f"with padding_mode {m.padding_mode!r} is not supported")
        conv = (m.stride, m.padding, m.dilation, m.groups)
        return Interval(F.conv2d(v.c, m.weight, m.bias, *conv), F.conv2d(v.r, m.weight.abs(), None, *conv))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.training or m.running_mean is None:
            raise unsupported(name, type(m).__name__, "in training mode is not supported (IBP needs fixed statistics)")
        scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.weight is not None else 1.0)
        shape = (1, -1) + (1,) * (v.c.dim() - 2)
        shift = (m.bias if m.bias is not None else 0.0) - m.running_mean * scale
        return Interval(v.c * scale.view(shape) + shift.view(shape), v.r * scale.abs().view(shape))
    if isinstance(m, (nn.ReLU, nn.MaxPool2d)):
        return v.monotone(m)
    if isinstance(m, (nn.Flatten, nn.Identity)):
        return v.shape_op(m)
    raise unsupported(name, type(m).__name__)


_MONOTONE = {F.relu, torch.relu, F.max_pool2d, torch.max_pool2d}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}


def _arith(target, a, b, name: str):
    """An arithmetic op with at least one interval operand."""
    if isinstance(a, Interval) and isinstance(b, Interval):
        if target in (operator.add, torch.add):
            return Interval(a.c + b.c, a.r + b.r)
        raise unsupported(name, getattr(target, "__name__", str(target)), "of two intervals is not supported")
    if target in (operator.add, torch.add):
        return Interval(a.c + b, a.r) if isinstance(a, Interval) else Interval(a + b.c, b.r)
    if target in (operator.sub, torch.sub):
        return Interval(a.c - b, a.r) if isinstance(a, Interval) else Interval(a - b.c, b.r)
    if target in (operator.mul, torch.mul):
        v, k = (a, b) if isinstance(a, Interval) else (b, a)
        return Interval(v.c * k, v.r * abs(k) if not torch.is_tensor(k) else v.r * k.abs())
    if target in (operator.truediv, torch.div) and isinstance(a, Interval):
        return Interval(a.c / b, a.r / (abs(b) if not torch.is_tensor(b) else b.abs()))
    raise unsupported(name, getattr(target, "__name__", str(target)))


class _Bounds(fx.Interpreter):
    def call_module(self, target, args, kwargs):
        (v,) = args
        name = target.removeprefix("0.") or type(self.fetch_attr(target)).__name__  # less the wrapper's "0."
        return (
            _module(self.fetch_attr(target), v, name)
            if isinstance(v, Interval)
            else super().call_module(target, args, kwargs)
        )

    def call_function(self, target, args, kwargs):
        if not any(isinstance(a, Interval) for a in args):
            return super().call_function(target, args, kwargs)
        if target in _MONOTONE and isinstance(args[0], Interval):
            return args[0].monotone(lambda t: target(t, *args[1:], **kwargs))
        if target in (torch.flatten,):
            return args[0].shape_op(lambda t: target(t, *args[1:], **kwargs))
        if len(args) == 2 and not kwargs:
            return _arith(target, args[0], args[1], getattr(target, "__name__", str(target)))
        raise unsupported(getattr(target, "__name__", str(target)), "function")

    def call_method(self, target, args, kwargs):
        if not isinstance(args[0], Interval):
            return super().call_method(target, args, kwargs)
        if target in _SHAPE_METHODS:
            return args[0].shape_op(lambda t: getattr(t, target)(*args[1:], **kwargs))
        raise unsupported(f"Tensor.{target}", "method")


def ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable interval bounds (lo, hi) on the logits of `model` over the box
    [max(x - eps, 0), min(x + eps, 1)], with autograd through them (IBP training)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    try:
        # Wrapped, so that a bare layer is a module call too rather than its traced body.
        gm = fx.symbolic_trace(nn.Sequential(model))
    except Exception as exc:
        raise unsupported(
            type(model).__name__, type(model).__name__, f"does not trace with torch.fx ({type(exc).__name__})"
        ) from exc
    try:
        out = _Bounds(gm).run(Interval((hi + lo) / 2, (hi - lo) / 2))
    except Unsupported as exc:  # torch.fx appends the graph node to the message: one line only
        raise Unsupported(str(exc).splitlines()[0]) from None
    if not isinstance(out, Interval):
        raise unsupported(type(model).__name__, "output", "does not depend on the input")
    return out.c - out.r, out.c + out.r
