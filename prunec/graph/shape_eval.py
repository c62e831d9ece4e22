"""Shapes of a graph's tensors at concrete input shapes, computed in numpy from the op semantics.

Shape inference needs the graph exported (a protobuf per node) and ONNX's inference stops at
every `Reshape` whose target is run-time shape arithmetic (`Shape -> Gather -> Div -> Cast ->
Concat`), which ShuffleNet-style exports write for each channel shuffle; prunec then ran the graph
in ONNX Runtime to learn the shapes its Shape nodes read. Here the shapes travel through the
graph directly, with the values of the small integer tensors that shape arithmetic computes, for
the ops in `_SHAPE_OPS`. A tensor behind any other op (or behind an input the rules do not
cover) is left unknown, and the caller measures or infers as before: this never guesses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

#: Integer tensors up to this many elements carry their values (shape vectors, indices).
_MAX_VALUE = 1024


class _Unknown(Exception):
    """The op, or one of its attributes or inputs, is not covered: its outputs stay unknown."""


def tensor_shapes_at(graph: gs.Graph, *input_shapes: dict[str, tuple[int, ...]]) -> list[dict[str, tuple[int, ...]]]:
    """Shape of every tensor of `graph` (outer graph only) that follows from the given input
    shapes by the ops this module covers, keyed by name, one dict per set of input shapes
    (constants are read once for all); tensors it cannot tell are absent."""
    known: dict[int, tuple[int, ...]] = {}  # constants and Constant node outputs: the same for every set
    known_values: dict[int, np.ndarray] = {}
    plan = []
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in known:
                known[id(t)], value = _constant_value(t)
                if value is not None:
                    known_values[id(t)] = value
        if node.op == "Constant" and len(node.outputs) == 1:
            try:
                shape, value = _constant(node)
            except _Unknown:
                continue
            known[id(node.outputs[0])] = shape
            if value is not None:
                known_values[id(node.outputs[0])] = value
            continue
        fn = _SHAPE_OPS.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        if fn is None or any(isinstance(v, (gs.Graph, gs.Node.AttributeRef)) for v in node.attrs.values()):
            continue
        plan.append((node, fn, [None if t.is_empty() else id(t) for t in node.inputs],
                     [None if t.is_empty() else id(t) for t in node.outputs]))
    names = [(name, id(t)) for name, t in graph.tensors().items() if name]
    out = []
    for given in input_shapes:
        shapes, values = dict(known), dict(known_values)
        for t in graph.inputs:
            if t.name in given:
                shapes[id(t)] = tuple(int(d) for d in given[t.name])
        for node, fn, ins, outs in plan:
            _evaluate(node, fn, ins, outs, shapes, values)
        out.append({name: shapes[i] for name, i in names if i in shapes})
    return out


def _evaluate(node: gs.Node, fn, ins: list, outs: list, shapes: dict, values: dict) -> None:
    """Record the output shapes (and small integer values) of one node, where they follow."""
    in_shapes = [None if i is None else shapes.get(i, _MISSING) for i in ins]
    if _MISSING in in_shapes:
        return
    try:
        got = fn(node, in_shapes, [None if i is None else values.get(i) for i in ins])
    except (_Unknown, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError):
        return
    if len(got) != len(outs):
        return
    for i, (shape, value) in zip(outs, got):
        if i is None:
            continue
        if any(d < 0 for d in shape):
            return
        shapes[i] = tuple(int(d) for d in shape)
        if value is not None and value.dtype.kind in "iu" and value.size <= _MAX_VALUE:
            values[i] = value


def _constant_value(t: gs.Constant) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Shape of a constant, with its values when it is a small integer tensor (read without
    keeping them in the graph: a constant graphsurgeon has not loaded exports as it was)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    shape = tuple(int(d) for d in t.shape)
    try:
        kind = np.dtype(t.dtype).kind
    except TypeError:  # a type numpy does not name (bfloat16 as an ONNX enum): a weight
        return shape, None
    if kind not in "iu" or math.prod(shape) > _MAX_VALUE:
        return shape, None
    v = t._values
    return shape, np.asarray(v.load() if isinstance(v, LazyValues) else v)


_MISSING = object()
Out = list[tuple[tuple[int, ...], np.ndarray | None]]


def _same(node, ins, vals) -> Out:
    if len(node.outputs) != 1:
        raise _Unknown
    return [(ins[0], None)]


def _broadcast(*shapes) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*shapes))


def _elementwise(fn: Callable | None):
    def op(node, ins, vals) -> Out:
        shape = _broadcast(*[s for s in ins if s is not None])
        value = None
        if fn is not None and all(v is not None for v in vals) and len(vals) == 2:
            a, b = vals
            if a.dtype == b.dtype and a.dtype.kind in "iu":
                with np.errstate(over="ignore"):  # wraps around, as ONNX Runtime's integer kernels do
                    value = np.asarray(fn(a, b), dtype=a.dtype)
        return [(shape, value)]
    return op


def _truncating_div(a, b):
    from prunec.graph.fold_native import _truncating_div as div

    return div(a, b)


def _attr_ints(node, name, n, default):
    v = node.attrs.get(name)
    return [default] * n if v is None else [int(x) for x in v]


def _window(node, ins, kernel: list[int], *, ceil: bool) -> tuple[int, ...]:
    """Spatial output dims of a Conv or pooling window (explicit or VALID padding only)."""
    x = ins[0]
    n = len(x) - 2
    if len(kernel) != n:
        raise _Unknown
    strides = _attr_ints(node, "strides", n, 1)
    dil = _attr_ints(node, "dilations", n, 1)
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        pads = [0] * (2 * n)
    elif auto == "NOTSET":
        pads = _attr_ints(node, "pads", 2 * n, 0)
    else:
        raise _Unknown  # SAME_*: not needed by the exporters prunec meets
    out = []
    for i in range(n):
        size = x[2 + i] + pads[i] + pads[i + n] - dil[i] * (kernel[i] - 1) - 1
        if size < 0:
            raise _Unknown
        if ceil:
            d = -(-size // strides[i]) + 1
            if (d - 1) * strides[i] >= x[2 + i] + pads[i]:
                d -= 1  # the last window would start in the end padding
        else:
            d = size // strides[i] + 1
        out.append(d)
    return tuple(out)


def _conv(node, ins, vals) -> Out:
    x, w = ins[0], ins[1]
    if len(node.outputs) != 1 or len(x) != len(w) or len(x) < 3:
        raise _Unknown
    kernel = _attr_ints(node, "kernel_shape", len(x) - 2, 0) if "kernel_shape" in node.attrs else list(w[2:])
    if list(kernel) != list(w[2:]) or x[1] != w[1] * int(node.attrs.get("group", 1)):
        raise _Unknown
    return [((x[0], w[0]) + _window(node, ins, list(w[2:]), ceil=False), None)]


def _pool(node, ins, vals) -> Out:
    if len(node.outputs) != 1 or "kernel_shape" not in node.attrs:
        raise _Unknown
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    if node.op == "AveragePool" and node.attrs.get("dilations") is not None:
        raise _Unknown
    ceil = bool(node.attrs.get("ceil_mode", 0))
    return [(tuple(ins[0][:2]) + _window(node, ins, kernel, ceil=ceil), None)]


def _global_pool(node, ins, vals) -> Out:
    x = ins[0]
    return [(tuple(x[:2]) + (1,) * (len(x) - 2), None)]


def _flatten(node, ins, vals) -> Out:
    x = ins[0]
    axis = int(node.attrs.get("axis", 1))
    axis = axis + len(x) if axis < 0 else axis
    return [((math.prod(x[:axis]), math.prod(x[axis:])), None)]


def _gemm(node, ins, vals) -> Out:
    a, b = ins[0], ins[1]
    if len(a) != 2 or len(b) != 2:
        raise _Unknown
    m = a[1] if node.attrs.get("transA", 0) else a[0]
    n = b[0] if node.attrs.get("transB", 0) else b[1]
    return [((m, n), None)]


def _matmul(node, ins, vals) -> Out:
    a, b = ins
    if len(a) < 2 or len(b) < 2:
        raise _Unknown  # 1-D operands: left to ONNX
    return [(_broadcast(a[:-2], b[:-2]) + (a[-2], b[-1]), None)]


def _concat(node, ins, vals) -> Out:
    axis = int(node.attrs["axis"])
    rank = len(ins[0])
    axis = axis + rank if axis < 0 else axis
    if any(len(s) != rank for s in ins):
        raise _Unknown
    shape = list(ins[0])
    shape[axis] = sum(s[axis] for s in ins)
    value = None
    if all(v is not None for v in vals) and len({v.dtype for v in vals}) == 1:
        value = np.concatenate(vals, axis=axis)
    return [(tuple(shape), value)]


def _reshape(node, ins, vals) -> Out:
    x, target = ins[0], vals[1]
    if target is None:
        raise _Unknown
    allowzero = int(node.attrs.get("allowzero", 0))
    dims = [int(d) for d in np.ravel(target)]
    if not allowzero:
        dims = [x[i] if d == 0 else d for i, d in enumerate(dims)]
    if dims.count(-1) > 1:
        raise _Unknown
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        if rest == 0 or math.prod(x) % rest:
            raise _Unknown
        dims[dims.index(-1)] = math.prod(x) // rest
    if math.prod(dims) != math.prod(x):
        raise _Unknown
    value = vals[0].reshape(dims) if vals[0] is not None else None
    return [(tuple(dims), value)]


def _transpose(node, ins, vals) -> Out:
    x = ins[0]
    perm = [int(p) for p in node.attrs.get("perm", range(len(x) - 1, -1, -1))]
    value = np.transpose(vals[0], perm) if vals[0] is not None else None
    return [(tuple(x[p] for p in perm), value)]


def _shape(node, ins, vals) -> Out:
    x = ins[0]
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    dims = list(x)[slice(start, None if end is None else int(end))]
    return [((len(dims),), np.asarray(dims, dtype=np.int64))]


def _gather(node, ins, vals) -> Out:
    x, idx = ins
    axis = int(node.attrs.get("axis", 0))
    axis = axis + len(x) if axis < 0 else axis
    value = None
    if vals[1] is not None:
        i = vals[1]
        if np.any(i < -x[axis]) or np.any(i >= x[axis]):
            raise _Unknown
        if vals[0] is not None:
            value = np.take(vals[0], i, axis=axis)
    return [(tuple(x[:axis]) + tuple(idx) + tuple(x[axis + 1:]), value)]


def _axes(node, vals, rank) -> list[int] | None:
    if len(vals) > 1 and vals[1] is not None:
        axes = [int(a) for a in np.ravel(vals[1])]
    elif len(node.inputs) > 1 and not node.inputs[1].is_empty():
        raise _Unknown  # axes computed at run time
    elif "axes" in node.attrs:
        axes = [int(a) for a in node.attrs["axes"]]
    else:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


def _unsqueeze(node, ins, vals) -> Out:
    rank = len(ins[0])
    axes = _axes(node, vals, rank + len(np.ravel(vals[1])) if len(vals) > 1 and vals[1] is not None
                 else rank + len(node.attrs.get("axes", ())))
    if axes is None:
        raise _Unknown
    shape = list(ins[0])
    for a in axes:
        shape.insert(a, 1)
    value = vals[0].reshape(shape) if vals[0] is not None else None
    return [(tuple(shape), value)]


def _squeeze(node, ins, vals) -> Out:
    x = ins[0]
    axes = _axes(node, vals, len(x))
    if axes is None:
        axes = [i for i, d in enumerate(x) if d == 1]
    if any(x[a] != 1 for a in axes):
        raise _Unknown
    shape = tuple(d for i, d in enumerate(x) if i not in axes)
    value = vals[0].reshape(shape) if vals[0] is not None else None
    return [(shape, value)]


def _cast(node, ins, vals) -> Out:
    import onnx

    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    v = vals[0]
    value = v.astype(to) if v is not None and to.kind in "iu" and v.dtype.kind in "iu" else None
    return [(ins[0], value)]


def _slice(node, ins, vals) -> Out:
    x = ins[0]
    if len(node.inputs) > 1:  # opset 10+: starts, ends, axes, steps as inputs
        if any(len(node.inputs) > i and not node.inputs[i].is_empty() and vals[i] is None for i in range(1, 5)):
            raise _Unknown
        starts, ends = [int(s) for s in vals[1]], [int(e) for e in vals[2]]
        axes = [int(a) for a in vals[3]] if len(vals) > 3 and vals[3] is not None else list(range(len(starts)))
        steps = [int(s) for s in vals[4]] if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
    else:
        starts, ends = _attr_ints(node, "starts", 0, 0), _attr_ints(node, "ends", 0, 0)
        axes = _attr_ints(node, "axes", len(starts), 0) if "axes" in node.attrs else list(range(len(starts)))
        steps = [1] * len(starts)
    index = [slice(None)] * len(x)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st == 0:
            raise _Unknown
        index[a + len(x) if a < 0 else a] = slice(s, e, st)
    shape = tuple(len(range(*sl.indices(d))) for sl, d in zip(index, x))
    value = vals[0][tuple(index)] if vals[0] is not None else None
    return [(shape, value)]


def _split(node, ins, vals) -> Out:
    x = ins[0]
    axis = int(node.attrs.get("axis", 0))
    axis = axis + len(x) if axis < 0 else axis
    n = len(node.outputs)
    if len(vals) > 1 and vals[1] is not None:
        parts = [int(p) for p in vals[1]]
    elif len(node.inputs) > 1 and not node.inputs[1].is_empty():
        raise _Unknown
    elif "split" in node.attrs:
        parts = [int(p) for p in node.attrs["split"]]
    else:
        if "num_outputs" in node.attrs and int(node.attrs["num_outputs"]) != n:
            raise _Unknown
        if x[axis] % n:
            raise _Unknown  # uneven num_outputs split: left to ONNX
        parts = [x[axis] // n] * n
    if len(parts) != n or sum(parts) != x[axis]:
        raise _Unknown
    return [(tuple(x[:axis]) + (p,) + tuple(x[axis + 1:]), None) for p in parts]


def _reduce(node, ins, vals) -> Out:
    x = ins[0]
    keep = int(node.attrs.get("keepdims", 1))
    axes = _axes(node, vals, len(x))
    if axes is None:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return [(x, None)]
        axes = list(range(len(x)))
    shape = tuple(1 if i in axes else d for i, d in enumerate(x)) if keep else \
        tuple(d for i, d in enumerate(x) if i not in axes)
    return [(shape, None)]


def _binary_values(fn):
    return _elementwise(fn)


def _constant(node) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Shape (and small integer value) of a Constant node's output."""
    from prunec.graph.fold_native import _constant_node_value

    v = _constant_node_value(node)
    if v is None:
        raise _Unknown
    if not isinstance(v, np.ndarray) and hasattr(v, "shape") and hasattr(v, "load"):  # not read yet
        try:
            kind = np.dtype(v.dtype).kind
        except TypeError:
            kind = "?"
        if kind not in "iu" or math.prod(v.shape) > _MAX_VALUE:
            return tuple(int(d) for d in v.shape), None
        v = v.load()
    v = np.asarray(v)
    return v.shape, (v if v.dtype.kind in "iu" and v.size <= _MAX_VALUE else None)


_UNARY = ("Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Erf",
          "Sqrt", "Exp", "Neg", "Abs", "Softmax", "LogSoftmax", "Identity", "Floor", "Ceil", "Softplus",
          "Mish", "Gelu", "Reciprocal", "Log", "Not")

_SHAPE_OPS: dict[str, Callable[[gs.Node, list, list], Out]] = {
    **{op: _same for op in _UNARY},
    "BatchNormalization": _same,
    "Clip": lambda node, ins, vals: _same(node, ins[:1], vals),
    "Dropout": lambda node, ins, vals: _same(node, ins[:1], vals),
    "Add": _binary_values(np.add),
    "Sub": _binary_values(np.subtract),
    "Mul": _binary_values(np.multiply),
    "Div": _binary_values(_truncating_div),
    "Pow": _elementwise(None),
    "PRelu": _elementwise(None),
    "Max": _elementwise(None),
    "Min": _elementwise(None),
    "Sum": _elementwise(None),
    "Where": _elementwise(None),
    "Equal": _elementwise(None),
    "Conv": _conv,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Concat": _concat,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "Slice": _slice,
    "Split": _split,
    "ReduceMean": _reduce,
    "ReduceSum": _reduce,
    "ReduceMax": _reduce,
    "ReduceMin": _reduce,
}
