"""A model as a flat, numeric DAG the verifiers read (built by bench.verify.trace.to_graph).

Every value is a flat float64 vector per image (an image's CHW map in row-major order, as
`flatten(1)` gives it), so flattening is no node at all. The ops:

- `input`: the image, flattened, in [0, 1] pixel units (the model's Normalize is folded
  into the first affine op, so boxes are stated in pixels);
- `affine`: W @ v + b with W dense (out, in): Linear as it is, Conv2d as the equivalent
  matrix over flattened inputs, Normalize and eval-mode BatchNorm folded in as diagonals;
- `relu`; `maxpool`: kernel == stride windows over a CHW map, stored as a (out, k*k)
  table of input indices; `add`: the sum of two nodes (a residual connection).

An affine node also keeps the model's own ops it was folded from (`Step`s: the Linear or
convolution, Normalize, BatchNorm), as fp32 computes them one after the other: their
rounding, not the folded matrix's, is what bench.verify.rounding bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.errors import BenchError

SUPPORTED = (
    "verifiable networks are ReLU networks of Linear, Conv2d, BatchNorm, Normalize, MaxPool2d, "
    "Flatten and residual adds"
)


class Unsupported(BenchError):
    """A model the verifiers cannot encode; the message names the first offending layer."""


def unsupported(name: str, kind: str, why: str = "is not supported") -> Unsupported:
    return Unsupported(f"verify: layer {name!r} ({kind}) {why}; {SUPPORTED}")


@dataclass(frozen=True)
class Step:
    """One op of the model inside an affine node: v -> W v + b, as the model computes it."""

    weight: torch.Tensor
    """float64: (out, in) for a Linear, the kernel for a convolution, (size,) for an
    elementwise op (Normalize, BatchNorm)."""
    bias: torch.Tensor
    """(out,) float64: the constant the op adds, exactly."""
    const: torch.Tensor
    """(out,) float64: the size of the constants fp32 adds on the way, before they cancel
    (|bias| for a Linear or a convolution, |mean * scale| + |shift| for Normalize and
    BatchNorm): rounding is relative to these, not to `bias`."""
    roundings: int
    """Roundings on the way to one output (the k of gamma_k, bench.verify.rounding)."""
    conv: tuple | None = None
    """(input shape, stride, padding, dilation, groups) of a convolution."""

    def apply(self, v: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """W v + b for rows v (n, in), or |W| v with `absolute` (no constant)."""
        w = self.weight.abs() if absolute else self.weight
        if self.conv is not None:
            shape, stride, padding, dilation, groups = self.conv
            out = F.conv2d(v.reshape(len(v), *shape), w, None, stride, padding, dilation, groups).flatten(1)
        elif w.dim() == 1:
            out = v * w
        else:
            out = v @ w.T
        return out if absolute else out + self.bias


@dataclass(frozen=True)
class Node:
    op: str
    """`input`, `affine`, `relu`, `maxpool` or `add`."""
    inputs: tuple[int, ...]
    """Indices of the nodes this one reads (earlier in `Graph.nodes`)."""
    shape: tuple[int, ...]
    """Per-image shape of the value (its flat size is the product)."""
    name: str
    """The fx node it came from (the last one, for folded affine chains)."""
    weight: torch.Tensor | None = None
    """affine: (out, in) float64."""
    bias: torch.Tensor | None = None
    """affine: (out,) float64."""
    windows: torch.Tensor | None = None
    """maxpool: (out, k*k) int64 indices into the input's flat vector."""
    steps: tuple[Step, ...] = ()
    """affine: the model's ops it composes, first to last (none for the identity the
    logits may end in, which the model never computes)."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    """Topologically ordered; node 0 is the input, the last node the logits."""
    input_shape: tuple[int, ...]

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def num_classes(self) -> int:
        return self.nodes[-1].size

    def bound_nodes(self) -> list[int]:
        """Nodes whose bounds the relaxations need: the inputs of each relu and maxpool."""
        return sorted({n.inputs[0] for n in self.nodes if n.op in ("relu", "maxpool")})

    def relu_inputs(self) -> list[int]:
        return [n.inputs[0] for n in self.nodes if n.op == "relu"]

    def values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's value, float64, for images x (n, *input_shape)."""
        vals: list[torch.Tensor] = []
        for node in self.nodes:
            if node.op == "input":
                v = x.detach().to(torch.float64).reshape(len(x), -1)
            elif node.op == "affine":
                v = vals[node.inputs[0]] @ node.weight.T + node.bias
            elif node.op == "relu":
                v = vals[node.inputs[0]].clamp(min=0)
            elif node.op == "maxpool":
                v = vals[node.inputs[0]][:, node.windows].amax(-1)
            else:
                v = vals[node.inputs[0]] + vals[node.inputs[1]]
            vals.append(v)
        return vals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (n, classes) in float64."""
        return self.values(x)[-1]
