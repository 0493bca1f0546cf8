"""`--model FILE.onnx`: a network exported from TensorFlow, JAX or PyTorch, read with the
`onnx` package and converted to torch by onnx2torch.

onnx2torch maps each ONNX operator to a torch module and the graph to a torch.fx
GraphModule, so the bench's attacks take gradients through it like any torch model.
Every operator of the file is checked against onnx2torch's converters before
converting, and the ones it lacks are named in one line. The file's sha256 is the
model's identity and the checkpoint folder keeps a copy, from which the architecture is
converted again when the model is rebuilt (the weights come from the stored safetensors,
the same as the copy's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import fx, nn

from bench.core.data import DatasetSpec
from bench.core.models import Normalize
from bench.errors import BenchError
from bench.store.factories import first_line
from bench.store.sources.base import Normalization

COPY = "model.onnx"
"""The copy of the ONNX file kept in the checkpoint folder."""


def _unsupported(proto) -> list[str]:
    """The file's operators onnx2torch has no converter for, as `Op (opset N)`."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    missing = []
    for node in proto.graph.node:
        domain = node.domain or ""
        try:
            get_converter(node.op_type, opsets.get(domain, opsets.get("", 1)), domain or "")
        except NotImplementedError:
            label = f"{node.op_type} (opset {opsets.get(domain, '?')}{', domain ' + domain if domain else ''})"
            if label not in missing:
                missing.append(label)
    return missing


def _inline_constant_identities(proto) -> None:
    """An Identity of an initializer made an initializer of its own, in place. PyTorch's
    exporter writes one tensor shared by two layers (or equal to another) as an Identity
    of it, and onnx2torch's Conv and Gemm converters read their weights from initializers
    only; the graph computes the same."""
    initializers = {t.name: t for t in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in initializers:
            copy = proto.graph.initializer.add()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            initializers[copy.name] = copy
        else:
            kept.append(node)
    if len(kept) < len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(kept)


DOWNGRADES = (18, 17, 16, 13)
"""Opsets onnx's version converter may take a file down to when onnx2torch lacks the
converter of an operator's newer version (exporters write opset 20 and later, where an
operator such as Identity gained only new types, and onnx2torch 1.5 stops at 18)."""


def _downgraded(proto, missing: list[str]):
    """(the file at the newest lower opset where every operator converts, []), or the file
    as it was and its missing operators, where none does."""
    from onnx import version_converter

    current = next((o.version for o in proto.opset_import if (o.domain or "") == ""), None)
    for opset in DOWNGRADES:
        if current is None or opset >= current:
            continue
        try:
            lower = version_converter.convert_version(proto, opset)
        except Exception:  # an operator with no adapter down to that opset: try no lower
            break
        if not _unsupported(lower):
            return lower, []
    return proto, missing


def convert(path: Path, reference: str) -> nn.Module:
    """The torch module of an ONNX file, or a one-line BenchError saying why not."""
    # Imported here: onnx and onnx2torch serve this shape of model alone (the `onnx` extra).
    try:
        import onnx
        from onnx2torch import convert as to_torch
    except ImportError as exc:
        raise BenchError(
            f"--model {reference!r} needs the onnx and onnx2torch packages: pip install 'robustness-bench[onnx]'"
        ) from exc

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # a truncated or foreign file: protobuf and the checker raise their own
        raise BenchError(
            f"--model {reference!r} is not a valid ONNX model ({type(exc).__name__}: {first_line(exc)[:160]}); "
            "export it again (torch.onnx.export, tf2onnx, jax2onnx)"
        ) from exc
    _inline_constant_identities(proto)
    missing = _unsupported(proto)
    if missing:
        proto, missing = _downgraded(proto, missing)
    if missing:
        raise BenchError(
            f"--model {reference!r} uses operator(s) onnx2torch cannot convert: {', '.join(missing)}; "
            "export the network without them, or give it as a Python factory"
        )
    try:
        converted = to_torch(proto)
    except Exception as exc:  # a converter refusing an attribute it does not support
        raise BenchError(
            f"--model {reference!r} does not convert to torch ({type(exc).__name__}: {first_line(exc)[:160]}); "
            "give the network as a Python factory instead"
        ) from exc
    return _normalize_at_input(converted).eval()


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a node stands for where it is a constant of the graph (an initializer,
    or onnx2torch's copy of one), else None."""
    from onnx2torch.node_converters.identity import OnnxCopyIdentity

    if (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(str(node.target)), OnnxCopyIdentity)
    ):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _normalize_at_input(gm: fx.GraphModule) -> fx.GraphModule:
    """`(x - mean) / std` on the graph's input, as exporters write a model's Normalize
    (Sub and Div by per-channel constants), made the bench's Normalize again. The network
    computes the same; the verifier, which encodes Normalize exactly and cannot trace
    onnx2torch's Div (it branches on its inputs' dtype), can then take a converted ReLU
    network like any other."""
    from onnx2torch.node_converters.binary_math_operations import (
        _TORCH_FUNCTION_FROM_ONNX_TYPE as FUNCTIONS,  # the functions its Sub and Div call
    )
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    def op(node: fx.Node, fn) -> bool:
        if node.op != "call_module":
            return False
        module = gm.get_submodule(str(node.target))
        return (
            isinstance(module, OnnxBinaryMathOperation) and module.math_op_function is fn and module.broadcast is None
        )

    for sub in list(gm.graph.nodes):
        if not (op(sub, FUNCTIONS["Sub"]) and sub.args[0].op == "placeholder" and len(sub.users) == 1):
            continue
        (div,) = sub.users
        mean, std = _constant(gm, sub.args[1]), _constant(gm, div.args[1]) if op(div, FUNCTIONS["Div"]) else None
        if mean is None or std is None or div.args[0] is not sub:
            continue
        if (
            mean.numel() != std.numel()
            or mean.numel() != max(mean.shape, default=1)
            or std.numel() != max(std.shape, default=1)
        ):
            continue  # not one value per channel
        name = "bench_normalize"
        gm.add_submodule(name, Normalize(tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())))
        with gm.graph.inserting_before(sub):
            normalized = gm.graph.call_module(name, (sub.args[0],))
        div.replace_all_uses_with(normalized)
        gm.graph.erase_node(div)
        gm.graph.erase_node(sub)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        break
    return gm


@dataclass(frozen=True)
class OnnxSource:
    kind: ClassVar[str] = "onnx"
    path: Path

    @property
    def reference(self) -> str:
        return str(self.path)

    def build(self, spec: DatasetSpec) -> nn.Module:
        if not self.path.is_file():
            raise BenchError(f"--model {self.reference!r}: no such file")
        return convert(self.path, self.reference).to("cpu")

    def normalization(self, spec: DatasetSpec) -> Normalization | None:
        return None  # an ONNX graph carries no normalization metadata: --mean/--std say it

    def digest(self, model: nn.Module) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": COPY, "file_name": self.path.name}

    def files(self) -> dict[str, Path]:
        return {COPY: self.path}


def architecture(record: dict[str, Any], directory: Path) -> nn.Module:
    """The converted network of the folder's copy (its weights are then loaded over it)."""
    return convert(directory / record["file"], str(directory / record["file"]))
