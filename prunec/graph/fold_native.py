"""onnx-graphsurgeon's constant folding, done in numpy for the few ops exported CNNs fold.

`gs.Graph.fold_constants` copies the whole graph and builds an ONNX Runtime session for the
constant part, even when that part is a few `Identity(bias)` nodes (torch's deduplicated BN
vectors) or integer shape arithmetic (`Div`, `Cast`, `Unsqueeze` of static dims): that cost more
than the rest of the `channels` pass on most of the torchvision zoo. `fold_natively` does
exactly what graphsurgeon's folding does with `fold_shapes=False` (lower Constant nodes, find the
nodes computed from constants alone in node order, replace the tensors that leave the constant
part by their values) when every node to fold is one whose ONNX semantics numpy reproduces
exactly (`EXACT_OPS`: copies, reshaping of axes, and integer arithmetic); otherwise it changes
nothing and says so, and the caller folds with graphsurgeon.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

#: The Constant node attributes graphsurgeon lowers (others it leaves, with a warning).
_CONSTANT_ATTRS = {"value", "value_float", "value_floats", "value_int", "value_ints"}
#: Ops graphsurgeon never folds (a quantized weight stays quantized).
_NO_FOLD = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def _int(v: np.ndarray) -> bool:
    return v.dtype.kind in "iu"


def _axes(node: gs.Node, values: list) -> list[int] | None:
    """Axes of Squeeze/Unsqueeze: the second input (opset 13+) or the attribute."""
    if len(values) > 1 and values[1] is not None:
        return [int(a) for a in np.ravel(values[1])]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _identity(node, vals):
    return np.array(vals[0], copy=True)


def _unsqueeze(node, vals):
    axes = _axes(node, vals)
    if axes is None:
        raise ValueError("Unsqueeze without axes")
    return np.expand_dims(vals[0], tuple(axes))


def _squeeze(node, vals):
    axes = _axes(node, vals)
    return np.squeeze(vals[0], axis=None if axes is None else tuple(axes)).copy()


def _concat(node, vals):
    if len({v.dtype for v in vals}) != 1:
        raise ValueError("Concat of mixed types")
    return np.concatenate(vals, axis=int(node.attrs["axis"]))


def _integer_binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    def op(node, vals):
        a, b = vals
        if not (_int(a) and _int(b)) or a.dtype != b.dtype:
            raise ValueError("not an integer operation of one type")
        with np.errstate(over="ignore"):  # wraps around, as ONNX Runtime's integer kernels do
            return np.asarray(fn(a, b), dtype=a.dtype)
    return op


def _truncating_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero (C++ `/`, what ONNX Runtime's Div computes)."""
    if np.any(b == 0):
        raise ValueError("integer division by zero")
    q = np.floor_divide(a, b)
    return np.where((q < 0) & (q * b != a), q + 1, q)


def _cast(node, vals):
    import onnx

    v = vals[0]
    to = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
    if not (_int(v) or v.dtype == to) or np.dtype(to).kind not in "iu":
        raise ValueError("only integer to integer casts are folded here")
    return v.astype(to)


#: Ops evaluated here, each exactly as ONNX Runtime computes it (any input it does not cover
#: raises, and the caller then folds with graphsurgeon instead).
EXACT_OPS: dict[str, Callable[[gs.Node, list], np.ndarray]] = {
    "Identity": _identity,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Add": _integer_binary(np.add),
    "Sub": _integer_binary(np.subtract),
    "Mul": _integer_binary(np.multiply),
    "Div": _integer_binary(_truncating_div),
    "Cast": _cast,
}


def _array(v) -> np.ndarray:
    """A value as an array (a lazily loaded one is loaded)."""
    return v if isinstance(v, np.ndarray) else np.asarray(v.load() if hasattr(v, "load") else v)


def _constant_node_value(node: gs.Node):
    """The value graphsurgeon lowers a Constant node to, or None where it would not."""
    if len(node.attrs) != 1:
        return None
    name, value = next(iter(node.attrs.items()))
    if name not in _CONSTANT_ATTRS or isinstance(value, gs.Node.AttributeRef):
        return None
    return value._values if isinstance(value, gs.Constant) else np.array(value)


def fold_natively(graph: gs.Graph) -> bool:
    """Fold `graph`'s constants as `graph.fold_constants(fold_shapes=False, flatten_subgraphs=False,
    should_exclude_node=<quantize ops>)` would, without a graph copy or an ONNX Runtime session.
    Returns False, with the graph untouched, where that needs anything numpy does not reproduce
    exactly here (an op outside `EXACT_OPS`, subgraphs, functions, an unusual Constant node)."""
    if graph.functions:
        return False
    lowered = []
    for node in graph.nodes:
        if any(isinstance(v, (gs.Graph, gs.Node.AttributeRef)) for v in node.attrs.values()) or \
                any(isinstance(v, list) and v and isinstance(v[0], gs.Graph) for v in node.attrs.values()):
            return False
        if node.op == "Constant" and len(node.outputs) == 1:
            value = _constant_node_value(node)
            if value is None:
                return False
            lowered.append((node.outputs[0], value))
    # Graphsurgeon lowers every tensor whose one producer is a Constant node; here, too.
    known = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    known.update({t.name: t for t, _ in lowered})
    foldable: list[gs.Node] = []
    for node in graph.nodes:
        if node.op == "Constant" or node.op in _NO_FOLD:
            continue
        if all(t.name in known for t in node.inputs if not t.is_empty()):
            if node.op not in EXACT_OPS:
                return False
            foldable.append(node)
            known.update({o.name: o for o in node.outputs})
    # Evaluate before changing anything, so a value numpy cannot give leaves the graph as it was.
    values: dict[str, np.ndarray] = {t.name: _array(v) for t, v in lowered}
    for node in foldable:
        args = [None if t.is_empty() else
                values[t.name] if t.name in values else np.asarray(t.values) for t in node.inputs]
        try:
            out = EXACT_OPS[node.op](node, args)
        except (ValueError, TypeError, IndexError, KeyError, np.exceptions.AxisError):
            return False
        if len(node.outputs) != 1:
            return False
        values[node.outputs[0].name] = out
    for t, value in lowered:
        t.to_constant(value)
        t.inputs.clear()
    for node in foldable:
        t = node.outputs[0]
        # The tensors graphsurgeon evaluates: those without readers, and those with a reader
        # whose *node* name is not a constant tensor's name (its test, kept as it is, so that
        # the folded graph is the one graphsurgeon makes); the rest are cleaned up anyway.
        if not t.outputs or any(reader.name not in known for reader in t.outputs):
            t.to_constant(values[t.name])
            t.inputs.clear()
    return True
