"""Constant folding that also reads static dims out of partially symbolic shapes.

Exporters compute channel counts at run time (`Shape -> Gather -> Div -> Unsqueeze -> Concat`)
even when they are static. Folding those makes shapes inferable for the cost counter and
shape vectors readable for the channel rules.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.graph.ir import bypass
from prunec.graph.shapes import infer_shapes, tensor_shapes
from prunec.runtime.inputs import resolve_input_shapes
from prunec.runtime import session as _session  # noqa: F401  (quiets ONNX Runtime's logger)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """Value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if v is not None:
            return np.asarray(getattr(v, "values", v))
    return None


def graph_shapes(graph: gs.Graph, input_shapes: dict | None = None, *,
                 symbolic: bool = False) -> dict[str, tuple]:
    """Inferred shapes of every tensor of a gs.Graph: at concrete input shapes, or (with
    `symbolic`) at the declared ones, so symbolic dims stay symbolic."""
    model = _export_skeleton(graph)
    if symbolic:
        del model.graph.value_info[:]
        return tensor_shapes(infer_shapes(model))
    return concrete_shapes(model, resolve_input_shapes(model, input_shapes))


def _export_skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """Export a gs.Graph for shape inference, without copying float weight data."""
    g = graph.copy()  # copies nodes and tensors, not weight arrays
    moved = []
    for t in list(g.tensors().values()):
        if isinstance(t, gs.Constant) and np.dtype(t.dtype).kind == "f" and int(np.prod(t.shape)) > 64:
            v = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))
            for node in list(t.outputs):
                for i, x in enumerate(node.inputs):
                    if x is t:
                        node.inputs[i] = v
            moved.append(v)
    g.inputs = list(g.inputs) + moved
    model = gs.export_onnx(g, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    return model


def fold_constants(graph: gs.Graph, input_shapes: dict | None = None, *, max_rounds: int = 32) -> gs.Graph:
    """Fold constant subgraphs, including shape arithmetic on statically known dims.

    Tensors get their inferred (symbolic where the batch is) shapes first, so the
    `Shape -> Gather -> Div -> Unsqueeze` chains exporters emit for chunk/view fold into
    constants the channel rules can read. Folding can reveal more static shapes, so it
    repeats until nothing changes.
    """
    ins = {id(t) for t in graph.inputs}
    _share_identity_constants(graph)
    for _ in range(max_rounds):
        before = len(graph.nodes)
        shapes = graph_shapes(graph, input_shapes, symbolic=True)
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Variable) and t.shape is None and name in shapes and id(t) not in ins:
                t.shape = [d if isinstance(d, int) else None for d in shapes[name]]
        _fold_static_shape_reads(graph)
        graph.fold_constants(error_ok=True, fold_shapes=False).cleanup(remove_unused_graph_inputs=False)
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in ins and t not in graph.outputs:
                t.shape = None  # partial shapes were only for folding; export re-infers them
        if len(graph.nodes) == before:
            break
    return graph


def _share_identity_constants(graph: gs.Graph) -> None:
    """Point readers of `Identity(weight)` at the weight itself. Exporters write shared weights
    that way (torch: identical initializers deduplicated behind Identity); folding the Identity
    instead would give every reader its own copy and double the stored weights.

    Only matrices and kernels (2-D and up) stay shared: a shared constant couples the channels
    of all its readers, and per-channel vectors (BN parameters, biases) are often identical by
    coincidence, not by design; those get their own copies when folded."""
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Identity" or not isinstance(node.inputs[0], gs.Constant) \
                or len(node.inputs[0].shape) < 2 or id(node.outputs[0]) in outputs:
            continue
        bypass(node)
    graph.cleanup(remove_unused_graph_inputs=False)


def _fold_static_shape_reads(graph: gs.Graph) -> None:
    """Replace `Gather(Shape(x), i)` by a constant where dim i of x is static, even when
    other dims (the batch) are symbolic; graphsurgeon folds only fully static shapes."""
    for node in list(graph.nodes):
        if node.op != "Shape" or node.inputs[0].shape is None:
            continue
        dims = list(node.inputs[0].shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        dims = dims[slice(start, end)]
        out = node.outputs[0]
        if dims and all(isinstance(d, int) and d > 0 for d in dims) and out not in graph.outputs:
            # A fully static read (any start/end). graphsurgeon's own shape folding is off: it
            # ignores Shape's start/end (opset 15, which the dynamo exporter always writes) and
            # would fold Shape(x, start=1, end=2) to the whole shape.
            const = gs.Constant(out.name + "_static", np.asarray(dims, dtype=np.int64))
            for consumer in list(out.outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[k] = const
            node.outputs.clear()
            continue
        for g in list(node.outputs[0].outputs):
            if g.op != "Gather" or g.attrs.get("axis", 0) != 0:
                continue
            idx = const_value(g.inputs[1])
            if idx is None:
                continue
            picked = [dims[int(i)] for i in np.ravel(idx)]
            if not all(isinstance(d, int) and d > 0 for d in picked):
                continue
            value = np.asarray(picked, dtype=np.int64).reshape(np.shape(idx))
            const = gs.Constant(g.outputs[0].name + "_static", value)
            for consumer in list(g.outputs[0].outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is g.outputs[0]:
                        consumer.inputs[k] = const
            if g.outputs[0] in graph.outputs:
                continue
            g.outputs.clear()




def concrete_shapes(model: onnx.ModelProto, shapes_in: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Shapes of every tensor at concrete input shapes. When ONNX's inference cannot follow
    run-time shape arithmetic, a folded copy of the model is inferred instead."""
    from prunec.graph.shapes import with_fixed_inputs

    shapes = tensor_shapes(infer_shapes(model, shapes_in))
    if not _has_unknown(model, shapes):
        return shapes
    g = gs.import_onnx(with_fixed_inputs(model, shapes_in))
    fold_constants(g)
    folded = gs.export_onnx(g, do_type_check=False)
    folded.ir_version = min(model.ir_version or 8, 10)
    more = tensor_shapes(infer_shapes(folded))
    for k, v in more.items():
        old = shapes.get(k)
        if old is None or not all(isinstance(d, int) for d in old):
            shapes[k] = v
    return shapes


def _has_unknown(model: onnx.ModelProto, shapes: dict[str, tuple]) -> bool:
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        for o in n.output:
            s = shapes.get(o)
            if o and (s is None or not all(isinstance(d, int) for d in s)):
                return True
    return False
