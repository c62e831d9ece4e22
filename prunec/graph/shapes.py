"""Shape inference with concrete input shapes, for cost counting and analyses."""

from __future__ import annotations

import onnx
from onnx import shape_inference



def with_fixed_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the given concrete shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    # Stale intermediate shapes would win over the new input shapes; drop them (in subgraphs too).
    from prunec.graph.subgraphs import walk_proto_graphs

    for g in walk_proto_graphs(m.graph):
        del g.value_info[:]
    return m


#: Float initializers larger than this are replaced by typed inputs in `skeleton`.
_SKELETON_MIN_ELEMENTS = 64


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its float weight data: large float initializers become typed graph
    inputs. Shape inference gives the same shapes and costs nothing to serialize."""
    g = model.graph
    keep, moved = [], []
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        is_float = t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                   onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
        if is_float and n > _SKELETON_MIN_ELEMENTS:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    # Sparse initializers become dense typed inputs too: ONNX would type them as sparse tensors,
    # which dense ops reject, while ONNX Runtime densifies them at load.
    moved += [onnx.helper.make_tensor_value_info(s.values.name, s.values.data_type, list(s.dims))
              for s in g.sparse_initializer]
    listed = {i.name for i in g.input}
    graph = onnx.helper.make_graph(
        list(g.node), g.name, list(g.input) + [v for v in moved if v.name not in listed],
        list(g.output), keep, value_info=list(g.value_info))
    m = onnx.helper.make_model(graph, opset_imports=list(model.opset_import),
                               functions=list(model.functions))
    m.ir_version = model.ir_version
    return m


def infer_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                 *, strict: bool = False) -> onnx.ModelProto:
    """Shape-infer `model` (with fixed inputs if given), propagating constant shape data.

    Weights are left out (see `skeleton`): the result carries shapes, not weight values."""
    m = skeleton(model)
    if shapes:
        m = with_fixed_inputs(m, shapes)
    return shape_inference.infer_shapes(m, check_type=strict, strict_mode=strict, data_prop=True)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Map every tensor name with a known rank to its dims (int, symbolic name or None), inside
    If/Loop/Scan bodies too (ONNX names are unique across a model's subgraphs)."""
    from prunec.graph.subgraphs import walk_proto_graphs

    out: dict[str, tuple[int | str | None, ...]] = {}
    graphs = list(walk_proto_graphs(model.graph))
    # The outer graph last: its declared shapes win over a subgraph's.
    for g in graphs[1:] + graphs[:1]:
        _add_shapes(out, g)
    return out


def _add_shapes(out: dict, graph: onnx.GraphProto) -> None:
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        out[vi.name] = tuple(dims)
    for t in graph.initializer:
        out[t.name] = tuple(t.dims)
