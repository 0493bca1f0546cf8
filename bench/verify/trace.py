"""`to_graph`: trace a model with torch.fx, check every op against the short list a
ReLU-network verifier can encode exactly, and fold the affine ops together.

`flatten`, `view`/`reshape` to (N, -1), `nn.Flatten`, `nn.Identity` and `contiguous` are
aliases of their input (values are flat already); Conv2d becomes its matrix by pushing
the identity basis through the convolution in float64; Normalize and eval-mode BatchNorm
become diagonals composed into the affine op next to them. Each affine node keeps the
model's ops it was made of (`Step`s), for the bound on fp32 rounding (rounding.py).

What fx does not see is refused or caught: forward hooks and pre-hooks (fx never
records them) are refused before tracing; Normalize is taken by its exact type (a
subclass is traced through, so its own forward is what gets read); and the finished
graph is held to the model on random images and corners of the unit box, in fp32, to
within the rounding bound (faithful.py; the verifiers hold it to the model again on
each image's own box).

A custom `torch.autograd.Function` is refused before tracing: fx would trace through its
forward and record ops that look harmless (a `clone`) while the model's gradient says
something else, which is exactly the kind of model a benchmark must not "verify".
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.function import BackwardCFunction
from torch.fx.passes.shape_prop import ShapeProp

from bench.core.models import Normalize
from bench.errors import BenchError
from bench.verify.faithful import check_unit_box, refuse_hooks
from bench.verify.graph import SUPPORTED, Graph, Node, Step, Unsupported, unsupported
from bench.verify.rounding import ELEMENTWISE_ROUNDINGS
from bench.verify.search import model_device

GUESS_SIDES = (8, 28, 32)
"""Image sides `to_graph` tries when no input shape is given: those of the datasets."""
MAX_DENSE = 60_000_000
"""Largest dense matrix (entries, 480 MB in float64) a Conv2d may become; larger convolutions
are out of reach of these verifiers anyway."""

_RELU = (F.relu, torch.relu, torch.relu_)
_ADD = (operator.add, operator.iadd, torch.add)
_FLAT_FN = (torch.flatten, torch.reshape)
_FLAT_METHODS = ("flatten", "view", "reshape", "contiguous")


class _Tracer(fx.Tracer):
    """fx's tracer with Normalize kept as one call, so its buffers fold as a diagonal. Only
    Normalize itself: a subclass may compute anything, so fx traces into its forward."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) is Normalize or super().is_leaf_module(m, qualname)


def _custom_function(model: nn.Module, x: torch.Tensor) -> Unsupported | None:
    """The error for the first custom autograd.Function the forward runs, or None. Found
    in the autograd graph of a real forward; the module that calls it is the innermost one
    whose output reaches that function and whose inputs do not."""
    seen: dict[nn.Module, tuple] = {}

    def reach(tensors) -> set:
        found, stack, visited = set(), [t.grad_fn for t in tensors if torch.is_tensor(t) and t.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in visited:
                continue
            visited.add(fn)
            if isinstance(fn, BackwardCFunction):
                found.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
        return found

    def pre(module, args):
        seen[module] = args

    def post(module, args, out):
        inner = reach([out]) - reach(seen.get(module, ()))
        if inner:
            order.append((module, inner))

    order: list = []
    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.enable_grad():
            out = model(x.clone().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    if not reach([out]):
        return None
    names = {m: n for n, m in model.named_modules()}
    module, fns = order[0]
    fn = type(next(iter(fns))).__name__.removesuffix("Backward")
    where = f"{names[module]}." if names.get(module) else ""
    return unsupported(f"{where}{fn}.apply", "custom autograd.Function")


def _guess_shape(model: nn.Module) -> tuple[int, ...]:
    first = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    channels = first.mean.numel() if first is not None else 1
    fits = []
    for side in GUESS_SIDES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, channels, side, side, device=model_device(model)))
            fits.append((channels, side, side))
        except (RuntimeError, ValueError):
            continue
    if len(fits) != 1:
        raise BenchError(
            f"verify: cannot tell the model's input shape ({len(fits)} of the sides "
            f"{GUESS_SIDES} fit); pass input_shape=(C, H, W)"
        )
    return fits[0]


class _Builder:
    """Collects the raw nodes; affine ones keep a 1-d `weight` while they are diagonal."""

    def __init__(self):
        self.nodes: list[dict] = []

    def add(self, op, inputs, shape, name, **kw) -> int:
        self.nodes.append(dict(op=op, inputs=tuple(inputs), shape=tuple(shape), name=name, **kw))
        return len(self.nodes) - 1

    def diag(
        self, src: int, shape, name, scale: torch.Tensor, shift: torch.Tensor, const: torch.Tensor | None = None
    ) -> int:
        """An elementwise affine op; `const` (the size of its constants before they cancel)
        makes it a step the model computes, None the identity the logits end in."""
        scale, shift = scale.reshape(-1).double(), shift.reshape(-1).double()
        steps = () if const is None else (Step(scale, shift, const.reshape(-1).double(), ELEMENTWISE_ROUNDINGS),)
        return self.add("affine", [src], shape, name, weight=scale, bias=shift, steps=steps)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of a weight or buffer (the Graph lives on the CPU, whatever the model)."""
    return t.detach().to("cpu", torch.float64).clone()


def _channelwise(shape: tuple[int, ...], per_channel: torch.Tensor) -> torch.Tensor:
    return _cpu(per_channel).reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def _conv(m: nn.Conv2d, in_shape, out_shape, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if m.padding_mode != "zeros":
        raise unsupported(name, "Conv2d", f"with padding_mode {m.padding_mode!r} is not supported")
    if n_in * n_out > MAX_DENSE:
        raise unsupported(name, "Conv2d", f"is too large to verify ({n_out} x {n_in} matrix)")
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
    cols = F.conv2d(basis, _cpu(m.weight), None, m.stride, m.padding, m.dilation, m.groups)
    bias = torch.zeros(out_shape, dtype=torch.float64) if m.bias is None else _channelwise(out_shape, m.bias)
    return cols.reshape(n_in, n_out).T.contiguous(), bias.reshape(-1).clone()


def _pool_windows(shape, kernel: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    c, h, w = shape
    kh, kw = kernel
    oh, ow = h // kh, w // kw
    idx = torch.arange(c * h * w).reshape(c, h, w)[:, : oh * kh, : ow * kw]
    win = idx.reshape(c, oh, kh, ow, kw).permute(0, 1, 3, 2, 4).reshape(c * oh * ow, kh * kw)
    return win.contiguous(), (c, oh, ow)


def _pool_args(node: fx.Node, m: nn.MaxPool2d | None):
    if m is not None:
        return m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    # Positional arguments name only a prefix of the signature: the rest are defaults or keywords.
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return (
        given["kernel_size"],
        given.get("stride") or given["kernel_size"],
        given.get("padding", 0),
        given.get("dilation", 1),
        given.get("ceil_mode", False),
        given.get("return_indices", False),
    )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _convert(gm: fx.GraphModule) -> _Builder:
    b, env = _Builder(), {}
    mods = dict(gm.named_modules())

    def shape(n: fx.Node) -> tuple[int, ...] | None:
        meta = n.meta.get("tensor_meta")
        return tuple(meta.shape[1:]) if hasattr(meta, "shape") else None

    def src(n: fx.Node, arg, name: str, kind: str) -> int:
        if not isinstance(arg, fx.Node) or arg not in env:
            raise unsupported(name, kind, "is applied to something other than one tensor node")
        return env[arg]

    for n in gm.graph.nodes:
        out_shape = shape(n)
        if n.op == "placeholder":
            if env:
                raise unsupported(n.name, "second input")
            env[n] = b.add("input", [], out_shape, n.name)
            continue
        if n.op == "output":
            arg = n.args[0]
            if not isinstance(arg, fx.Node) or arg not in env or len(shape(arg)) != 1:
                raise unsupported("output", "model output", "must be one tensor of logits (N, classes)")
            # The logits become the last node: an identity affine op, folded away when it can be.
            b.diag(env[arg], shape(arg), "output", torch.ones(shape(arg)), torch.zeros(shape(arg)))
            continue
        if n.op == "get_attr":
            raise unsupported(n.target, "parameter used outside a layer")
        m = mods[n.target] if n.op == "call_module" else None
        kind = type(m).__name__ if m is not None else getattr(n.target, "__name__", str(n.target))
        name = n.target if n.op == "call_module" else n.name
        if out_shape is None:  # sizes and their items feed a view's shape; anything else fails where used
            if (n.op == "call_method" and n.target == "size") or (
                n.op == "call_function" and n.target in (operator.getitem, getattr)
            ):
                continue
            raise unsupported(name, kind)
        first = n.args[0] if n.args else None
        if type(m) is Normalize:
            s = src(n, first, name, kind)
            ones = torch.ones(1, *out_shape, dtype=torch.float64)
            scale, shift = ones / _cpu(m.std), -_cpu(m.mean) / _cpu(m.std) * ones
            if scale.shape != ones.shape:
                raise unsupported(name, kind, f"on values of shape {out_shape} is not supported")
            env[n] = b.diag(s, out_shape, name, scale, shift, shift.abs())
        elif isinstance(m, nn.Linear):
            s = src(n, first, name, kind)
            if len(shape(first)) != 1:
                raise unsupported(name, kind, "is applied to a map, not a flat vector")
            bias = _cpu(m.bias) if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
            step = Step(_cpu(m.weight), bias, bias.abs(), m.in_features + (m.bias is not None))
            env[n] = b.add("affine", [s], out_shape, name, weight=step.weight, bias=bias, steps=(step,))
        elif isinstance(m, nn.Conv2d):
            s = src(n, first, name, kind)
            w, bias = _conv(m, shape(first), out_shape, name)
            fan_in = m.weight[0].numel()  # (in channels / groups) * kernel area
            step = Step(
                _cpu(m.weight),
                bias,
                bias.abs(),
                fan_in + (m.bias is not None),
                conv=(shape(first), m.stride, m.padding, m.dilation, m.groups),
            )
            env[n] = b.add("affine", [s], out_shape, name, weight=w, bias=bias, steps=(step,))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            s = src(n, first, name, kind)
            if m.training or m.running_mean is None:
                raise unsupported(name, kind, "in training mode (or without running statistics) is not supported")
            scale = _cpu(m.weight) if m.weight is not None else torch.ones_like(_cpu(m.running_var))
            scale = scale / torch.sqrt(_cpu(m.running_var) + m.eps)
            shift = -_cpu(m.running_mean) * scale
            const = shift.abs()
            if m.bias is not None:
                shift = shift + _cpu(m.bias)
                const = const + _cpu(m.bias).abs()
            env[n] = b.diag(
                s,
                out_shape,
                name,
                _channelwise(out_shape, scale),
                _channelwise(out_shape, shift),
                _channelwise(out_shape, const),
            )
        elif (
            isinstance(m, nn.ReLU)
            or (n.op == "call_function" and n.target in _RELU)
            or (n.op == "call_method" and n.target in ("relu", "relu_"))
        ):
            env[n] = b.add("relu", [src(n, first, name, kind)], out_shape, name)
        elif isinstance(m, nn.MaxPool2d) or (n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d)):
            s = src(n, first, name, kind)
            k, stride, pad, dil, ceil, ret = _pool_args(n, m)
            if _pair(k) != _pair(stride) or _pair(pad) != (0, 0) or _pair(dil) != (1, 1) or ceil or ret:
                raise unsupported(name, kind, "with stride != kernel, padding, dilation or ceil_mode is not supported")
            if len(shape(first)) != 3:
                raise unsupported(name, kind, "is applied to something other than a CHW map")
            windows, pooled = _pool_windows(shape(first), _pair(k))
            env[n] = b.add("maxpool", [s], pooled, name, windows=windows)
        elif (
            isinstance(m, (nn.Flatten, nn.Identity))
            or (n.op == "call_function" and n.target in _FLAT_FN)
            or (n.op == "call_method" and n.target in _FLAT_METHODS)
        ):
            s = src(n, first, name, kind)
            batch_kept = n.meta["tensor_meta"].shape[0] == first.meta["tensor_meta"].shape[0]
            if not batch_kept or (n.target != "contiguous" and not isinstance(m, nn.Identity) and len(out_shape) != 1):
                raise unsupported(name, kind, f"reshaping to {out_shape} is not supported (only flattening to (N, -1))")
            env[n] = s
        elif (n.op != "call_module" and n.target in _ADD) or (n.op == "call_method" and n.target in ("add", "add_")):
            if len(n.args) != 2 or set(n.kwargs) - {"out"} or n.kwargs.get("out") is not None:
                raise unsupported(name, kind, "with an alpha or more than two operands is not supported")
            a, c = (src(n, arg, name, kind) for arg in n.args)
            if not shape(n.args[0]) == shape(n.args[1]) == out_shape:
                raise unsupported(name, kind, "of tensors of different shapes (broadcasting) is not supported")
            env[n] = b.add("add", [a, c], out_shape, name)
        else:
            raise unsupported(name, kind)
    return b


def _fold(b: _Builder) -> list[dict]:
    """Compose each affine node with an affine input that nothing else reads; diagonals
    become dense matrices at the end."""
    readers: dict[int, int] = {}
    for nd in b.nodes:
        for i in nd["inputs"]:
            readers[i] = readers.get(i, 0) + 1
    alive = [True] * len(b.nodes)
    for nd in b.nodes:
        if nd["op"] != "affine":
            continue
        p = nd["inputs"][0]
        up = b.nodes[p]
        if up["op"] != "affine" or readers.get(p, 0) != 1:
            continue
        wb, wa = nd["weight"], up["weight"]
        nd["bias"] = (wb * up["bias"] if wb.dim() == 1 else wb @ up["bias"]) + nd["bias"]
        if wb.dim() == 1:
            nd["weight"] = wb * wa if wa.dim() == 1 else wb[:, None] * wa
        else:
            nd["weight"] = wb * wa[None, :] if wa.dim() == 1 else wb @ wa
        nd["inputs"] = up["inputs"]
        nd["steps"] = up.get("steps", ()) + nd.get("steps", ())
        if nd["name"] == "output":  # the identity the logits end in keeps the layer's name
            nd["name"] = up["name"]
        alive[p] = False
    index, out = {}, []
    for k, nd in enumerate(b.nodes):
        if alive[k]:
            index[k] = len(out)
            out.append(dict(nd, inputs=tuple(index[i] for i in nd["inputs"])))
    for nd in out:
        if nd["op"] == "affine" and nd["weight"].dim() == 1:
            nd["weight"] = torch.diag(nd["weight"])
    return out


def to_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Graph:
    """The Graph of `model` (eval mode) for images of `input_shape` (C, H, W; guessed from
    the datasets' sides when None). Raises Unsupported naming the first layer it cannot
    encode."""
    if model.training:
        raise BenchError("verify: the model is in training mode; call model.eval() first")
    refuse_hooks(model)
    shape = tuple(input_shape) if input_shape is not None else _guess_shape(model)
    dummy = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(model_device(model))
    err = _custom_function(model, dummy)
    if err is not None:
        raise err
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unsupported(f"verify: torch.fx cannot trace {type(model).__name__} ({first}); {SUPPORTED}") from exc
    with torch.no_grad():
        ShapeProp(gm).propagate(dummy)
    nodes = tuple(Node(**nd) for nd in _fold(_convert(gm)))
    graph = Graph(nodes, shape)
    if graph.nodes[-1].op != "affine" or len(graph.nodes[-1].shape) != 1:
        raise unsupported(graph.nodes[-1].name, "last op", "must be affine (the logits)")
    check_unit_box(graph, model)
    return graph
