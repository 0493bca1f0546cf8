"""Graph rewrites of a frozen model for the attack fast path (torch.fx).

Two kinds, kept apart because they promise different things:

- exact (`exact_rewrites`): every forward value and every input gradient comes out bit
  for bit as the original model gives them, so they are on everywhere, the CPU included;
  - ReLU after max pooling instead of before: max and ReLU commute exactly (ReLU is
    monotone), and both orders send a window's gradient to its first maximum, or
    nowhere when the maximum is not positive; the ReLU then runs on a quarter of the
    elements of a 2x2 pool;
  - the forward of max pooling on a contiguous NCHW CPU tensor run in NHWC: PyTorch's
    NCHW CPU kernel walks every (image, channel) plane of a few pixels on its own, the
    NHWC kernel vectorizes across channels (on the digits CNN's first pool, 720 x 16 x 8
    x 8 on one thread, 2.6 ms against 0.3 ms). Both scan a window in the same order and
    keep the first maximum, so the values and the argmax are the same, and the backward
    is PyTorch's own NCHW kernel on those indices. Nothing in torch does this choice for
    eager CPU code (torch.compile would, but on these models it ran slower and changed
    results), hence the small autograd function below.
- folding (`fold_bn`): each eval-mode batch norm folded into the convolution before it,
  the same function up to rounding (torch.fx's own fuser).

A model that torch.fx cannot trace (data-dependent control flow) is left as it is. A
custom `torch.autograd.Function` is never traced through: plain symbolic tracing runs
its forward on proxies and records only the forward's ops, so its backward (a
straight-through estimator, a reversed or a zeroed gradient) would silently vanish from
the copy every attack sees. The tracer here keeps each `Function.apply` as one opaque
call instead, forward and backward as the model has them, and rewrites around it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.function as autograd_function
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.utils import _pair

_RELU_FNS = (F.relu, torch.relu)
_POOL_FNS = (F.max_pool2d, torch.max_pool2d)


class _MaxPoolNHWC(torch.autograd.Function):
    """Max pooling of a contiguous NCHW tensor whose forward runs in NHWC and whose
    backward is the NCHW kernel on the same indices.

    Autograd through a plain layout change would hand the convolution before the pool an
    NHWC gradient, which costs the convolution's backward more than the pool saves; here
    every tensor leaving the function is NCHW, as the original's are."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, idx = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last),
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode=ceil_mode,
            return_indices=True,
        )
        ctx.save_for_backward(x, idx.contiguous())
        ctx.geometry = (kernel_size, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, idx = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.geometry
        kernel = _pair(kernel)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(),
            x,
            kernel,
            _pair(stride) if stride else kernel,
            _pair(padding),
            _pair(dilation),
            ceil_mode,
            idx,
        )
        return gx, None, None, None, None, None


def max_pool2d_nhwc(
    x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False
) -> torch.Tensor:
    """F.max_pool2d with the same values and gradient; for a contiguous NCHW CPU input
    the forward runs in NHWC (several times faster for small feature maps), any other
    input goes to F.max_pool2d as it is."""
    nchw_cpu = (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
    )
    if not nchw_cpu:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding, dilation, ceil_mode=ceil_mode
        ).contiguous()
    return _MaxPoolNHWC.apply(x, kernel_size, stride, padding, dilation, ceil_mode)


_APPLY = autograd_function.Function.__dict__["apply"]


@functools.cache
def _opaque_apply(fn: type) -> Callable[..., Any]:
    """A plain function calling `fn.apply`: the graph node a custom Function becomes
    (torch.fx records calls of functions, not of classes)."""

    def apply(*args, **kwargs):
        return fn.apply(*args, **kwargs)

    apply.__name__ = apply.__qualname__ = f"apply_{fn.__name__}"
    return apply


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every custom autograd.Function kept as one call."""

    def trace(self, root, concrete_args=None):
        tracer = self

        def apply(fn, *args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                return tracer.create_proxy("call_function", _opaque_apply(fn), args, kwargs)
            return _APPLY.__get__(None, fn)(*args, **kwargs)

        # Function.apply is looked up on the class at each call, so patching the base
        # for the length of the trace reaches every subclass that does not override it.
        autograd_function.Function.apply = classmethod(apply)
        try:
            return super().trace(root, concrete_args)
        finally:
            autograd_function.Function.apply = _APPLY


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # Symbolic tracing runs the plugin model's own forward on proxies, which can fail in
    # any way its code can (TraceError on data-dependent branches, but also TypeError,
    # AttributeError, assertions). A rewrite is only a speed-up: any failure means "run
    # the model as it is", never a failed attack.
    except Exception:
        return None


def _pool_args(node: fx.Node, gm: fx.GraphModule) -> tuple | None:
    """(input, kernel, stride, padding, dilation, ceil_mode) of a max pool node that
    returns no indices; None for anything else."""
    if node.op == "call_function" and node.target in _POOL_FNS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
        # Positional arguments name only a prefix of the signature: the rest are defaults or keywords.
        vals = dict(defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs)
        if vals["return_indices"] or "input" not in vals or "kernel_size" not in vals:
            return None
        return tuple(vals[k] for k in names[:-1])
    if node.op == "call_module":
        mod = _module_of(node, gm)
        if type(mod) is nn.MaxPool2d and not mod.return_indices:
            return (node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    return None


def _module_of(node: fx.Node, gm: fx.GraphModule) -> nn.Module:
    """The submodule a call_module node calls, which fx names by its dotted path."""
    if not isinstance(node.target, str):
        raise TypeError(f"fx node {node.name} calls a module by {node.target!r}, not by its path")
    return gm.get_submodule(node.target)


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function" and node.target in _RELU_FNS:
        return True
    return node.op == "call_module" and type(_module_of(node, gm)) is nn.ReLU


def _movable_relu(node, gm: fx.GraphModule) -> fx.Node | None:
    """`node` if it is a ReLU that may move after the pool reading it: the pool is all
    that reads it, and it is all that reads its input (an in-place ReLU also changes
    what other readers of its input see); None otherwise."""
    if not (isinstance(node, fx.Node) and _is_relu(node, gm) and len(node.users) == 1):
        return None
    source = node.args[0]
    return node if isinstance(source, fx.Node) and len(source.users) == 1 else None


def exact_rewrite(model: nn.Module) -> nn.Module:
    """The model with both exact rewrites applied, sharing its parameters; the model
    itself where nothing applies or it does not trace."""
    gm = _trace(model)
    if gm is None:
        return model
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        args = _pool_args(node, gm)
        if args is None:
            continue
        src, *rest = args
        relu = _movable_relu(src, gm)
        if relu is not None:
            src = relu.args[0]
        with graph.inserting_after(node):
            pooled = graph.call_function(max_pool2d_nhwc, (src, *rest))
        node.replace_all_uses_with(pooled)
        graph.erase_node(node)
        if relu is not None:
            graph.erase_node(relu)
            with graph.inserting_after(pooled):
                out = graph.call_function(F.relu, (pooled,))
            # B023 is silenced: replace_all_uses_with calls the lambda at once, within this iteration.
            pooled.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)  # noqa: B023
        changed = True
    if not changed:
        return model
    graph.lint()
    gm.recompile()
    return gm


_VIEWS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def exact_view(model: nn.Module) -> nn.Module:
    """`exact_rewrite(model)`, traced once and kept while the model lives and stays put.

    The view shares the model's submodules and tensors, so in-place weight updates and
    the mode of its layers reach it. It is traced again when the model changes mode (a
    trace records Python branches on `self.training` as they were) or when a tensor
    moves to new storage (`.to(device)` gives modules new buffers)."""
    key = (model.training, tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))
    cached = _VIEWS.get(model)
    if cached is None or cached[0] != key:
        view = exact_rewrite(model)
        # Never the model itself as the value: a weak key its own value keeps alive.
        cached = _VIEWS[model] = (key, None if view is model else view)
    return model if cached[1] is None else cached[1]


def fold_bn(model: nn.Module) -> nn.Module:
    """A traced copy of an eval-mode model with each conv -> batch norm pair folded into
    one convolution; a plain copy where the model does not trace."""
    gm = _trace(model)  # torch.fx's fuser on our trace, which keeps custom Functions whole
    if gm is None:
        return copy.deepcopy(model)
    try:
        return fuse(gm, no_trace=True)
    except Exception:
        return copy.deepcopy(model)
