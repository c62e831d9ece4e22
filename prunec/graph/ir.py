"""The in-memory graph passes edit: onnx-graphsurgeon's `gs.Graph`, and the two conversions.

Passes edit the graph freely; `normalize` restores the invariants (no dead nodes, topological
order) in this one place, and `to_onnx` carries the model-level fields (IR version, producer,
metadata, functions) that graphsurgeon does not keep.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

# graphsurgeon warns on stdout about types it does not model (sequences, maps) and about a
# missing colour package; prunec reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def from_onnx(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into an editable graph (sparse initializers stay sparse Constants)."""
    from prunec.graph.sparse import adopt_sparse_values

    graph = gs.import_onnx(model)
    adopt_sparse_values(graph)
    return graph


def normalize(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and unused constants, then sort topologically."""
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def to_onnx(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the template model's IR version, producer, metadata and opsets."""
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    # Keep every opset the original declared (graphsurgeon only writes the ones it saw in use).
    have = {imp.domain for imp in model.opset_import}
    for imp in template.opset_import:
        if imp.domain not in have:
            model.opset_import.append(imp)
    if not model.functions and template.functions:
        model.functions.extend(template.functions)
    _keep_declared_shapes(model.graph.output, template.graph.output)
    _keep_non_tensor_types(model, template)
    return model



def _keep_non_tensor_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """graphsurgeon knows only tensors: it writes a sequence or map input/output (a classifier's
    per-class scores) as an untyped tensor. Restore those types from the template, and drop
    inner value infos it left untyped."""
    typed = {vi.name: vi.type for vi in list(template.graph.input) + list(template.graph.output)
             if not vi.type.HasField("tensor_type")}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in typed:
            vi.type.CopyFrom(typed[vi.name])
    keep = [vi for vi in model.graph.value_info
            if not (vi.type.HasField("tensor_type") and not vi.type.tensor_type.elem_type)]
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)



def _keep_declared_shapes(values, declared) -> None:
    """A graph output that lost its declared shape in graphsurgeon (it drops a shape that a
    value_info entry without one shadows) gets the template's back: the checker requires it, and
    passes never change an output's interface."""
    by_name = {v.name: v for v in declared}
    for v in values:
        old = by_name.get(v.name)
        if old is not None and not v.type.tensor_type.HasField("shape") \
                and old.type.tensor_type.HasField("shape") \
                and old.type.tensor_type.elem_type == v.type.tensor_type.elem_type:
            v.type.CopyFrom(old.type)


class NameGen:
    """Fresh tensor/node names that collide with nothing already in the graph."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def name_unnamed_nodes(graph: gs.Graph) -> int:
    """Give every unnamed node a fresh, stable name (`<op>_<index in graph order>`); returns how
    many were named. Channel groups, plans and diffs refer to layers by node name, and some
    exporters (and hand-built graphs) leave names empty."""
    fresh = NameGen(graph)
    unnamed = [(i, n) for i, n in enumerate(graph.nodes) if not n.name]
    for i, node in unnamed:
        node.name = fresh(f"{node.op}_{i}")
    return len(unnamed)


def bypass(node: gs.Node) -> None:
    """Make every reader of `node`'s first output read its first input instead, then detach
    the node (an Identity, or anything equivalent to one); `normalize` removes it."""
    src, dst = node.inputs[0], node.outputs[0]
    for reader in list(dst.outputs):
        for i, t in enumerate(reader.inputs):
            if t is dst:
                reader.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()
