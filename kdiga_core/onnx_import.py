"""ONNX → PyTorch: our own small graph interpreter.

KDIGA needs input gradients of the teacher (and, for an uploaded student, double
backward), so an ONNX teacher must become a differentiable PyTorch module.
`onnx_to_torch` returns an `OnnxGraphModule` whose initializers are parameters
or buffers and whose forward runs the graph's nodes in topological order with
torch functional ops, so autograd flows through every node.

Why our own and not onnx2torch: exporters put initializers behind `Identity`
nodes (the legacy exporter does it for every BatchNorm folded into a Conv), which
onnx2torch cannot load; opset 18 moved `axes`/`split` from attributes to inputs.
The pre-pass here aliases Identity outputs, folds Constant nodes and sorts the
graph; each op reads its arguments the way its opset defines them.

Semantics are inference semantics whatever `.train()` says: BatchNormalization
uses the stored statistics and Dropout is the identity (a teacher is frozen; a
pre-trained student keeps its statistics).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from kdiga_core.errors import ModelFormatError

Tensor = torch.Tensor
OpFn = Callable[[list[Any], dict[str, Any], int], Any]
_OPS: dict[str, OpFn] = {}

_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
_DEFAULT_DOMAINS = {"", "ai.onnx"}
_MIN_NATIVE_OPSET = 11  # older graphs go through onnx.version_converter first

# Float initializers in these input slots are data, not weights: they stay buffers.
_NON_WEIGHT_SLOTS: dict[str, set[int]] = {
    "BatchNormalization": {3, 4},  # running mean / variance
    "Resize": {1, 2, 3},
    "Clip": {1, 2},
    "Pad": {1, 2, 3},
    "Sub": {1},  # normalisation constants (x - mean) / std
    "Div": {1},
}

_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


# How to upload an export whose weights sit in an external file (kdiga_core.onnx_archive reads the pair).
INLINE_HINT = (
    "inline the weights with `import onnx; onnx.save(onnx.load('model.onnx'), 'inline.onnx', "
    "save_as_external_data=False)` (or export with `torch.onnx.export(..., external_data=False)`), "
    "or upload model.onnx and model.onnx.data together as one zip or tar archive"
)

# The most bytes one node may build from a shape it computes (None: no limit); see `allocation_limit`.
_ALLOC_LIMIT: ContextVar[int | None] = ContextVar("kdiga_onnx_alloc_limit", default=None)


@contextmanager
def allocation_limit(max_bytes: int | None) -> Iterator[None]:
    """Within this block, refuse before allocating any tensor above `max_bytes` that a node builds
    from a shape held in the graph (ConstantOfShape, Expand, Tile, Range, Pad), and initializers
    summing above it: a small upload must not make the worker allocate gigabytes."""
    token = _ALLOC_LIMIT.set(max_bytes)
    try:
        yield
    finally:
        _ALLOC_LIMIT.reset(token)


def current_allocation_limit() -> int | None:
    """The byte limit `allocation_limit` set here (None: none)."""
    return _ALLOC_LIMIT.get()


def _check_alloc(op: str, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Raise before a node builds a tensor of `shape` larger than `allocation_limit` allows."""
    limit = _ALLOC_LIMIT.get()
    if limit is None:
        return
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"The ONNX model's {op} node asks for a negative size {list(shape)}.")
    size = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
    if size > limit:
        raise ModelFormatError(
            f"The ONNX model's {op} node would build a tensor of shape {list(shape)} "
            f"({size / 2**20:,.0f} MiB), above this service's teacher memory limit of "
            f"{limit / 2**20:,.0f} MiB (KDIGA_MAX_TEACHER_MEMORY_BYTES)."
        )


@dataclass(frozen=True)
class OnnxNode:
    """One graph node, with its attributes already turned into Python values."""

    op: str
    inputs: tuple[str, ...]  # '' marks an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    name: str = ""


# =========================================================================== the module


class OnnxGraphModule(nn.Module):
    """Runs an ONNX graph with torch ops; initializers are its parameters and buffers.

    Attributes:
        input_names / output_names: the graph's real inputs and outputs, in order.
        opset: the default-domain opset the ops are interpreted with.
    """

    def __init__(
        self,
        nodes: list[OnnxNode],
        input_names: list[str],
        output_names: list[str],
        tensors: dict[str, Tensor],
        trainable: set[str],
        opset: int,
    ):
        super().__init__()
        self.weights = nn.Module()
        self._slots: dict[str, str] = {}
        taken = set(dir(self.weights))  # never shadow nn.Module's own attributes ("training", ...)
        for onnx_name, value in tensors.items():
            attr = _unique_attr(onnx_name, taken)
            taken.add(attr)
            if onnx_name in trainable:
                self.weights.register_parameter(attr, nn.Parameter(value))
            else:
                self.weights.register_buffer(attr, value)
            self._slots[onnx_name] = attr
        self._nodes = nodes
        self._free_after = _last_uses(nodes, output_names)
        self.input_names, self.output_names, self.opset = input_names, output_names, opset

    fixed_batch: int | None = None  # set when the graph only runs at its exported batch size
    free_batch: int | None = None  # the export batch baked into Reshape/Expand targets, replaced per run

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ModelFormatError(
                f"The ONNX graph takes {len(self.input_names)} input(s), got {len(inputs)}."
            )
        if self.fixed_batch is not None and inputs[0].shape[0] != self.fixed_batch:
            return self._run_chunked(inputs[0], self.fixed_batch)
        return self._run(*inputs)

    def _run(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        env: dict[str, Any] = {name: getattr(self.weights, attr) for name, attr in self._slots.items()}
        env.update(zip(self.input_names, inputs, strict=True))
        batch = inputs[0].shape[0] if self.free_batch is not None and inputs[0].dim() else None
        rebatch = batch is not None and batch != self.free_batch
        for i, node in enumerate(self._nodes):
            args = [env[name] if name else None for name in node.inputs]
            if rebatch and node.op in _BATCH_SHAPED:
                args[1] = _rebatched(args[1], self.free_batch, batch)
            result = _OPS[node.op](args, node.attrs, self.opset)
            results = result if isinstance(result, tuple | list) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
            for name in self._free_after[i]:  # drop intermediates nobody reads again
                env.pop(name, None)
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def _run_chunked(self, x: Tensor, batch: int) -> Tensor:
        """Run a fixed-batch graph on any batch: chunks of `batch`, the last one padded.

        Samples never interact in an inference graph, so this is exact, gradients included.
        """
        outputs = []
        for chunk in torch.split(x, batch):
            n = chunk.shape[0]
            if n < batch:  # pad by repeating the last sample; the extra rows are cut off below
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
            outputs.append(self._run(chunk)[:n])
        return torch.cat(outputs)

    def calibrate_batch(self, declared_shape: Sequence[int | None]) -> None:
        """Decide whether the graph runs at any batch size; if not, run it in chunks.

        Exporters without a dynamic batch axis bake the batch size into Reshape and
        Expand constants. We compare a batch of B+1 against the chunked result, first as
        exported, then with B in those targets replaced by the run's batch (`free_batch`);
        a graph that still fails or disagrees is pinned to its declared batch B.
        """
        batch, sample = declared_shape[0] if declared_shape else None, tuple(declared_shape[1:])
        self.fixed_batch = self.free_batch = None
        if not batch or None in sample or len(self.input_names) != 1 or len(self.output_names) != 1:
            return
        x = torch.rand(batch + 1, *sample, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            chunked = self._run_chunked(x, batch)
            if self._runs_whole(x, chunked):
                return
            # Running in chunks of the export batch (often 1 or 2) costs 4-30x on CPU. Most such graphs
            # bake the batch only into the target shapes of Reshape and Expand: give those the batch of
            # the input instead, and keep that only if a batch of B+1 then agrees with the chunked run.
            self.free_batch = batch
            if self._runs_whole(x, chunked):
                return
            self.free_batch = None
        self.fixed_batch = batch

    def _runs_whole(self, x: Tensor, chunked: Tensor) -> bool:
        try:
            whole = self._run(x)
        except Exception:  # a baked-in batch size usually makes a Reshape fail
            return False
        return whole.shape == chunked.shape and torch.allclose(whole, chunked, rtol=1e-4, atol=1e-5)


_BATCH_SHAPED = ("Reshape", "Expand")  # ops whose target shape may hold the export batch


def _rebatched(shape: Any, export_batch: int | None, batch: int) -> Any:
    """A target shape whose first entry is the export batch, with the run's batch there instead."""
    if not isinstance(shape, Tensor) or shape.dim() != 1 or not shape.numel() or int(shape[0]) != export_batch:
        return shape
    return torch.cat([shape.new_tensor([batch]), shape[1:]])


def _unique_attr(onnx_name: str, taken: set[str]) -> str:
    """A valid, stable module attribute name for an ONNX tensor name."""
    base = re.sub(r"\W", "_", onnx_name) or "t"
    base = base if not base[0].isdigit() else f"t_{base}"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _last_uses(nodes: list[OnnxNode], keep: list[str]) -> list[list[str]]:
    """For each node, the intermediate values that are read for the last time there."""
    produced = {name for node in nodes for name in node.outputs}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.inputs:
            if name in produced:
                last[name] = i
    free: list[list[str]] = [[] for _ in nodes]
    for name, i in last.items():
        if name not in keep:
            free[i].append(name)
    return free


# =========================================================================== loading and the pre-pass


def onnx_to_torch(model: str | Path | bytes | onnx.ModelProto, *, calibrate: bool = True) -> OnnxGraphModule:
    """Convert an ONNX model (path, bytes or ModelProto) to a differentiable torch module.

    Args:
        model: the ONNX model; a path is read without following external data.
        calibrate: probe whether a graph exported with a fixed batch size runs at
            other sizes (two small forward passes); if not, the module runs it in chunks.

    Raises:
        ModelFormatError: the file is not ONNX, stores weights outside the file,
            uses control flow, or uses operators we do not support.
    """
    proto = _load_proto(model)
    _refuse_external_data(proto)
    proto = _normalise_opset(proto)
    graph = proto.graph
    _check_initializer_bytes(graph.initializer)
    tensors = {init.name: _to_torch(init) for init in graph.initializer}
    nodes = _resolve_constants(_parse_nodes(graph.node), tensors)
    nodes, aliases = _resolve_identities(nodes)
    input_names = [i.name for i in graph.input if i.name not in tensors]
    output_names = [aliases.get(o.name, o.name) for o in graph.output]
    nodes = _toposort(nodes, set(input_names) | set(tensors))
    _check_supported(nodes)
    tensors = _prune_unused(tensors, nodes, output_names)
    module = OnnxGraphModule(
        nodes, input_names, output_names, tensors, _trainable(nodes, tensors), _opset(proto)
    )
    if calibrate and len(input_names) == 1:
        module.calibrate_batch(input_shape(proto, input_names[0]))
    return module


def _check_initializer_bytes(initializers: Sequence[onnx.TensorProto]) -> None:
    """The weights' size from their declared dims, before any is converted."""
    limit = _ALLOC_LIMIT.get()
    if limit is None:
        return
    total = 0
    for init in initializers:
        dtype = _DTYPES.get(init.data_type, torch.float32)
        total += math.prod(init.dims) * torch.empty((), dtype=dtype).element_size()
    if total > limit:
        raise ModelFormatError(
            f"The ONNX model's weights take {total / 2**20:,.0f} MiB, above this service's teacher memory "
            f"limit of {limit / 2**20:,.0f} MiB (KDIGA_MAX_TEACHER_MEMORY_BYTES)."
        )


def input_shape(proto: onnx.ModelProto, name: str) -> tuple[int | None, ...]:
    """The declared shape of graph input `name`; None marks a symbolic (dynamic) dimension."""
    value = next(i for i in proto.graph.input if i.name == name)
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _load_proto(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_model_from_string(model)
        # load_external_data=False: never follow paths written inside an uploaded file.
        return onnx.load_model(str(model), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError; any failure means "not ONNX"
        raise ModelFormatError(f"The file is not a readable ONNX model ({type(exc).__name__}).") from exc


def _refuse_external_data(proto: onnx.ModelProto) -> None:
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise ModelFormatError(f"This ONNX model keeps its weights in an external data file, which a bare .onnx "
                               f"upload cannot bring; {INLINE_HINT}.")
    if len(proto.graph.sparse_initializer):
        raise ModelFormatError("ONNX models with sparse initializers are not supported.")


def _opset(proto: onnx.ModelProto) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS]
    return max(versions) if versions else 1


def _normalise_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Inline local functions and upgrade graphs older than opset 11."""
    if len(proto.functions):
        # The dynamo exporter can leave model-local functions; inlining makes them plain nodes.
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    if _opset(proto) < _MIN_NATIVE_OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, 13)
        except Exception as exc:
            raise ModelFormatError(
                f"The ONNX model uses opset {_opset(proto)}, which could not be upgraded to 13; re-export with opset 13 or newer."
            ) from exc
    return proto


def _to_torch(tensor: onnx.TensorProto) -> Tensor:
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16 of its own
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ModelFormatError("ONNX models with string tensors are not supported.")
    return torch.from_numpy(np.array(array, copy=True))


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type == onnx.AttributeProto.TENSOR:
        return _to_torch(attr.t)
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return None  # only control-flow ops carry graphs, and those are refused
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _parse_nodes(proto_nodes: Sequence[onnx.NodeProto]) -> list[OnnxNode]:
    nodes = []
    for n in proto_nodes:
        op = n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}::{n.op_type}"
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        # How many outputs the graph asks for: Split (before opset 18) and LayerNormalization need it.
        attrs["_n_outputs"] = len(n.output)
        nodes.append(OnnxNode(op, tuple(n.input), tuple(n.output), attrs, n.name))
    return nodes


def _constant_value(attrs: dict[str, Any]) -> Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    names = ", ".join(k for k in attrs if not k.startswith("_"))
    raise ModelFormatError(f"Constant node with unsupported value attribute(s): {names}.")


def _resolve_constants(nodes: list[OnnxNode], tensors: dict[str, Tensor]) -> list[OnnxNode]:
    """Fold Constant nodes into the tensor table (they become buffers)."""
    kept = []
    for node in nodes:
        if node.op == "Constant":
            tensors[node.outputs[0]] = _constant_value(node.attrs)
        else:
            kept.append(node)
    return kept


def _resolve_identities(nodes: list[OnnxNode]) -> tuple[list[OnnxNode], dict[str, str]]:
    """Remove Identity nodes by aliasing their outputs to their inputs.

    This is what lets initializers hidden behind Identity nodes reach the Conv that uses them.
    """
    aliases: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    for node in nodes:
        if node.op == "Identity":
            aliases[node.outputs[0]] = node.inputs[0]
    kept = [
        OnnxNode(n.op, tuple(resolve(i) if i else i for i in n.inputs), n.outputs, n.attrs, n.name)
        for n in nodes
        if n.op != "Identity"
    ]
    return kept, {name: resolve(name) for name in aliases}


def _toposort(nodes: list[OnnxNode], available: set[str]) -> list[OnnxNode]:
    """Kahn's algorithm; ONNX asks for sorted graphs but not every producer obeys."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.inputs)]
        if not runnable:
            missing = sorted({i for n in pending for i in n.inputs if i not in ready})[:3]
            raise ModelFormatError(
                f"The ONNX graph is not well formed: values {', '.join(missing)} are never produced."
            )
        for n in runnable:
            ready.update(n.outputs)
        ordered += runnable
        runnable_ids = {id(n) for n in runnable}
        pending = [n for n in pending if id(n) not in runnable_ids]
    return ordered


def _check_supported(nodes: list[OnnxNode]) -> None:
    ops = {n.op for n in nodes}
    flow = sorted(ops & _CONTROL_FLOW)
    if flow:
        raise ModelFormatError(
            f"ONNX models with dynamic control flow ({', '.join(flow)}) are not supported; re-export with static shapes and no data-dependent branches."
        )
    unsupported = sorted(ops - set(_OPS))
    if unsupported:
        raise ModelFormatError(f"The ONNX model uses unsupported operators: {', '.join(unsupported)}.")


def _prune_unused(tensors: dict[str, Tensor], nodes: list[OnnxNode], outputs: list[str]) -> dict[str, Tensor]:
    used = {i for n in nodes for i in n.inputs} | set(outputs)
    return {name: t for name, t in tensors.items() if name in used}


def _trainable(nodes: list[OnnxNode], tensors: dict[str, Tensor]) -> set[str]:
    """Float initializers that act as weights become parameters; everything else stays a buffer.

    A weight is a floating tensor with more than one element (scalars are constants of the
    computation, such as GELU's 0.5), except in the data slots listed in `_NON_WEIGHT_SLOTS`.
    """
    data = {n.inputs[i] for n in nodes for i in _NON_WEIGHT_SLOTS.get(n.op, ()) if i < len(n.inputs)}
    return {
        name for name, t in tensors.items() if t.is_floating_point() and t.numel() > 1 and name not in data
    }


def supported_ops() -> list[str]:
    """Operator names the interpreter knows (default ONNX domain)."""
    return sorted(_OPS)


# =========================================================================== operators


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _arg(args: list[Any], i: int) -> Any:
    return args[i] if i < len(args) else None


def _axes(args: list[Any], attrs: dict[str, Any], index: int = 1) -> list[int] | None:
    """Axes come from an attribute (older opsets) or from an input (opset 13/18+)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return _ints(_arg(args, index))


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda args, attrs, opset: fn(args[0])


for _name, _fn in {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Identity": lambda x: x,
    "Selu": F.selu,
    "Mish": F.mish,
}.items():
    _OPS[_name] = _unary(_fn)


@_op("LeakyRelu")
def _leaky_relu(args, attrs, opset):
    return F.leaky_relu(args[0], attrs.get("alpha", 0.01))


@_op("Elu")
def _elu(args, attrs, opset):
    return F.elu(args[0], attrs.get("alpha", 1.0))


@_op("PRelu")
def _prelu(args, attrs, opset):
    x, slope = args
    return torch.where(x < 0, slope * x, x)


@_op("HardSigmoid")
def _hard_sigmoid(args, attrs, opset):
    # clamp, not F.hardsigmoid: the latter has no double-backward kernel (method.md §3).
    return torch.clamp(attrs.get("alpha", 0.2) * args[0] + attrs.get("beta", 0.5), 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(args, attrs, opset):
    x = args[0]
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@_op("Gelu")
def _gelu(args, attrs, opset):
    return F.gelu(args[0], approximate=attrs.get("approximate", "none"))


@_op("Clip")
def _clip(args, attrs, opset):
    lo, hi = _arg(args, 1), _arg(args, 2)
    lo = attrs.get("min") if lo is None else lo
    hi = attrs.get("max") if hi is None else hi
    x = args[0]
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


# --------------------------------------------------------------------------- elementwise binary


def _div(a: Tensor, b: Tensor) -> Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


for _name, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    _OPS[_name] = (lambda fn: lambda args, attrs, opset: fn(args[0], args[1]))(_fn)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(args, attrs, opset):
        out = args[0]
        for other in args[1:]:
            out = fn(out, other)
        return out

    return run


_OPS["Max"], _OPS["Min"], _OPS["Sum"] = (
    _variadic(torch.maximum),
    _variadic(torch.minimum),
    _variadic(torch.add),
)


@_op("Mean")
def _mean(args, attrs, opset):
    return _variadic(torch.add)(args, attrs, opset) / len(args)


@_op("Mod")
def _mod(args, attrs, opset):
    return torch.fmod(args[0], args[1]) if attrs.get("fmod", 0) else torch.remainder(args[0], args[1])


@_op("Where")
def _where(args, attrs, opset):
    return torch.where(args[0].bool(), args[1], args[2])


# --------------------------------------------------------------------------- convolution and pooling


def _pads(
    attrs: dict[str, Any],
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end, ...], auto_pad resolved."""
    nd = len(spatial)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * nd))
    if auto == "VALID":
        return [0] * 2 * nd
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX begin/end pads of the spatial dims → F.pad order (last dim first)."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _conv_geometry(
    x: Tensor, kernel: Sequence[int], attrs: dict[str, Any]
) -> tuple[Tensor, list[int], list[int], list[int]]:
    """Strides, dilations and padding; asymmetric padding is applied to `x` up front."""
    nd = x.dim() - 2
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = _pads(attrs, x.shape[2:], kernel, strides, dilations)
    if pads[:nd] == pads[nd:]:
        return x, strides, dilations, pads[:nd]
    return F.pad(x, _torch_pad(pads)), strides, dilations, [0] * nd


@_op("Conv")
def _conv(args, attrs, opset):
    x, w, b = args[0], args[1], _arg(args, 2)
    x, strides, dilations, padding = _conv_geometry(x, w.shape[2:], attrs)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return conv(x, w, b, strides, padding, dilations, attrs.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(args, attrs, opset):
    x, w, b = args[0], args[1], _arg(args, 2)
    nd = x.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * nd))
    if (
        attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "")
        or "output_shape" in attrs
        or pads[:nd] != pads[nd:]
    ):
        raise ModelFormatError(
            "ConvTranspose with auto_pad, output_shape or asymmetric pads is not supported."
        )
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    return conv(
        x,
        w,
        b,
        attrs.get("strides", [1] * nd),
        pads[:nd],
        attrs.get("output_padding", [0] * nd),
        attrs.get("group", 1),
        attrs.get("dilations", [1] * nd),
    )


@_op("MaxPool")
def _max_pool(args, attrs, opset):
    x, kernel = args[0], list(attrs["kernel_shape"])
    nd = x.dim() - 2
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = _pads(attrs, x.shape[2:], kernel, strides, dilations)
    padding = pads[:nd]
    if pads[:nd] != pads[nd:] or any(p > k // 2 for p, k in zip(padding, kernel, strict=True)):
        x, padding = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * nd
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return pool(x, kernel, strides, padding, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))


@_op("AveragePool")
def _avg_pool(args, attrs, opset):
    x, kernel = args[0], list(attrs["kernel_shape"])
    nd = x.dim() - 2
    strides = list(attrs.get("strides", [1] * nd))
    if any(d != 1 for d in attrs.get("dilations", [1] * nd)):
        raise ModelFormatError("AveragePool with dilations is not supported.")
    pads = _pads(attrs, x.shape[2:], kernel, strides, [1] * nd)
    include = bool(attrs.get("count_include_pad", 0))
    padding = pads[:nd]
    if pads[:nd] != pads[nd:] or any(p > k // 2 for p, k in zip(padding, kernel, strict=True)):
        if not include:
            raise ModelFormatError(
                "AveragePool with asymmetric pads that exclude padding from the count is not supported."
            )
        x, padding = F.pad(x, _torch_pad(pads)), [0] * nd
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return pool(x, kernel, strides, padding, bool(attrs.get("ceil_mode", 0)), include)


@_op("GlobalAveragePool")
def _global_avg_pool(args, attrs, opset):
    x = args[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(args, attrs, opset):
    x = args[0]
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------- normalisation


@_op("BatchNormalization")
def _batch_norm(args, attrs, opset):
    x, scale, bias, mean, var = args[:5]
    # Inference form even when training_mode is set: the statistics are part of the model.
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


@_op("InstanceNormalization")
def _instance_norm(args, attrs, opset):
    x, scale, bias = args[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


@_op("LayerNormalization")
def _layer_norm(args, attrs, opset):
    x, scale, bias = args[0], args[1], _arg(args, 2)
    axis = attrs.get("axis", -1) % x.dim()
    eps = attrs.get("epsilon", 1e-5)
    dims = tuple(range(axis, x.dim()))
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:  # broadcastable scale/bias: spell it out
        mu = x.mean(dim=dims, keepdim=True)
        y = (x - mu) / torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps) * scale
        y = y if bias is None else y + bias
    if attrs["_n_outputs"] == 1:
        return y
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
    return y, mean, inv_std


# --------------------------------------------------------------------------- linear algebra and softmax


@_op("MatMul")
def _matmul(args, attrs, opset):
    return torch.matmul(args[0], args[1])


@_op("Gemm")
def _gemm(args, attrs, opset):
    a, b, c = args[0], args[1], _arg(args, 2)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = a.t()
    if not attrs.get("transA", 0) and attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)  # the common Linear layer: one fused kernel
    b = b.t() if attrs.get("transB", 0) else b
    y = a @ b
    y = y * alpha if alpha != 1.0 else y
    return y if c is None else y + beta * c


@_op("Einsum")
def _einsum(args, attrs, opset):
    return torch.einsum(attrs["equation"], *args)


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def run(args, attrs, opset):
        x = args[0]
        if opset >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        # Before opset 13 softmax flattened the input to 2-D at `axis` (default 1).
        axis = attrs.get("axis", 1) % max(x.dim(), 1)
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return run


_OPS["Softmax"], _OPS["LogSoftmax"] = _softmax(F.softmax), _softmax(F.log_softmax)


# --------------------------------------------------------------------------- reductions


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor]) -> OpFn:
    def run(args, attrs, opset):
        x, axes, keep = args[0], _axes(args, attrs), bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], keep)

    return run


def _prod(x: Tensor, axes: list[int], keep: bool) -> Tensor:
    for axis in sorted(axes, reverse=True):
        x = torch.prod(x, dim=axis, keepdim=keep)
    return x


for _name, _fn in {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
}.items():
    _OPS[_name] = _reduce(_fn)


def _arg_reduce(fn: Callable[..., Tensor]) -> OpFn:
    def run(args, attrs, opset):
        return fn(args[0], dim=attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))

    return run


_OPS["ArgMax"], _OPS["ArgMin"] = _arg_reduce(torch.argmax), _arg_reduce(torch.argmin)


# --------------------------------------------------------------------------- shapes and indexing


@_op("Shape")
def _shape(args, attrs, opset):
    x = args[0]
    dims = list(x.shape)[attrs.get("start", 0) : attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@_op("Size")
def _size(args, attrs, opset):
    return torch.tensor(args[0].numel(), dtype=torch.int64, device=args[0].device)


@_op("Reshape")
def _reshape(args, attrs, opset):
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):  # 0 means "copy this dimension from the input"
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Flatten")
def _flatten(args, attrs, opset):
    x = args[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_op("Transpose")
def _transpose(args, attrs, opset):
    x = args[0]
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


@_op("Squeeze")
def _squeeze(args, attrs, opset):
    x, axes = args[0], _axes(args, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


@_op("Unsqueeze")
def _unsqueeze(args, attrs, opset):
    x, axes = args[0], _axes(args, attrs)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Concat")
def _concat(args, attrs, opset):
    return torch.cat([a for a in args if a is not None], dim=attrs["axis"])


@_op("Split")
def _split(args, attrs, opset):
    x, axis = args[0], attrs.get("axis", 0)
    sizes = _ints(_arg(args, 1)) or attrs.get("split")
    if not sizes:
        parts = attrs.get("num_outputs") or attrs["_n_outputs"]
        # Opset 18's num_outputs: equal chunks, the last one possibly smaller.
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return torch.split(x, list(sizes), dim=axis)


@_op("Slice")
def _slice(args, attrs, opset):
    x = args[0]
    if opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends, axes, steps = _ints(args[1]), _ints(args[2]), _ints(_arg(args, 3)), _ints(_arg(args, 4))
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _clamp_index(v: int, dim: int, lo: int, hi: int) -> int:
    v = v + dim if v < 0 else v
    return min(max(v, lo), hi)


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    dim = x.shape[axis]
    if step > 0:
        s, e = _clamp_index(start, dim, 0, dim), _clamp_index(end, dim, 0, dim)
        index = [slice(None)] * axis + [slice(s, e, step)]
        return x[tuple(index)]
    # Negative steps (torch slicing has none): clamp as ONNX does, then gather.
    s, e = _clamp_index(start, dim, 0, dim - 1), _clamp_index(end, dim, -1, dim - 1)
    return x.index_select(axis, torch.arange(s, e, step, device=x.device))


@_op("Gather")
def _gather(args, attrs, opset):
    data, idx = args[0], args[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    dim = data.shape[axis]
    idx = torch.where(idx < 0, idx + dim, idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1 :]))


@_op("GatherElements")
def _gather_elements(args, attrs, opset):
    data, idx = args[0], args[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


@_op("Expand")
def _expand(args, attrs, opset):
    x, shape = args[0], _ints(args[1])
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's size.
    out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    _check_alloc("Expand", out, x.dtype)  # a view now, but the next op materialises it
    return x.expand(out)


@_op("Tile")
def _tile(args, attrs, opset):
    repeats = _ints(args[1])
    _check_alloc("Tile", [d * r for d, r in zip(args[0].shape, repeats, strict=False)], args[0].dtype)
    return args[0].repeat(repeats)


@_op("Cast")
def _cast(args, attrs, opset):
    to = attrs["to"]
    if to not in _DTYPES:
        raise ModelFormatError(f"Cast to ONNX data type {to} is not supported.")
    return args[0].to(_DTYPES[to])


@_op("CastLike")
def _cast_like(args, attrs, opset):
    return args[0].to(args[1].dtype)


@_op("ConstantOfShape")
def _constant_of_shape(args, attrs, opset):
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    _check_alloc("ConstantOfShape", _ints(args[0]), value.dtype)
    return torch.full(_ints(args[0]), value.reshape(-1)[0].item(), dtype=value.dtype, device=args[0].device)


@_op("Constant")
def _constant(args, attrs, opset):
    return _constant_value(attrs)


@_op("Range")
def _range(args, attrs, opset):
    start, limit, delta = args
    if float(delta.item()) != 0:
        _check_alloc("Range", [max(0, math.ceil((limit.item() - start.item()) / delta.item()))], start.dtype)
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@_op("Dropout")
def _dropout(args, attrs, opset):
    x = args[0]
    return x, torch.ones_like(x, dtype=torch.bool)


@_op("Pad")
def _pad(args, attrs, opset):
    x = args[0]
    pads = attrs.get("pads") if opset < 11 else _ints(args[1])
    value = attrs.get("value", 0.0) if opset < 11 else _arg(args, 2)
    value = (
        0.0 if value is None else float(value.reshape(-1)[0].item() if isinstance(value, Tensor) else value)
    )
    axes = _ints(_arg(args, 3)) or list(range(x.dim()))
    full = [0] * 2 * x.dim()
    for i, axis in enumerate(a % x.dim() for a in axes):
        full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
    _check_alloc("Pad", [d + full[i] + full[i + x.dim()] for i, d in enumerate(x.shape)], x.dtype)
    torch_pads = _torch_pad(full)
    while torch_pads and torch_pads[-2:] == [0, 0]:  # F.pad wants only the padded trailing dims
        torch_pads = torch_pads[:-2]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        attrs.get("mode", "constant")
    ]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode=mode)
