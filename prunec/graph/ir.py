"""The in-memory graph passes edit: onnx-graphsurgeon's `gs.Graph`, and the two conversions.

Passes edit the graph freely; `normalize` restores the invariants (no dead nodes, topological
order) in this one place, and `to_onnx` carries the model-level fields (IR version, producer,
metadata, functions) that graphsurgeon does not keep.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.counters import count

# graphsurgeon warns on stdout about types it does not model (sequences, maps) and about a
# missing colour package; prunec reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def from_onnx(model: onnx.ModelProto, *, own_weights: bool = False,
              base_dir: str | os.PathLike | None = None) -> gs.Graph:
    """Import a model into an editable graph (sparse initializers stay sparse Constants).

    graphsurgeon keeps each constant as a reference into `model` until it is read, and then holds
    a copy of its values, so a graph that reads every weight (channel ranking does) holds them
    twice while `model` lives. With `own_weights`, every constant is taken out of `model` now
    (weights as read-only arrays, other tensors as protobufs of their own): the graph then shares
    nothing with `model`, and a caller that drops `model` holds each weight once. Weights stored
    as external data (relative to `base_dir`) are then read from their files straight into
    arrays."""
    from prunec.graph.sparse import adopt_sparse_values

    count("import")
    graph = gs.import_onnx(model)
    adopt_sparse_values(graph)
    if own_weights:
        take_weights(graph, base_dir)
    return graph


#: numpy dtypes whose arrays graphsurgeon exports exactly as ONNX stores them.
_PLAIN = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                  np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def take_weights(graph: gs.Graph, base_dir: str | os.PathLike | None = None) -> None:
    """Make `graph` share nothing with the protobuf it was imported from: every lazily loaded
    constant (in subgraphs and node attributes too) becomes a read-only array for plain numeric
    types, else (strings, bfloat16, float8, int4, sparse) a copy of its protobuf; the opset list
    graphsurgeon kept becomes a copy."""
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

    seen: set[int] = set()
    files: dict[str, object] = {}

    def external(proto: onnx.TensorProto, np_type: np.dtype | None):
        """An external tensor's data: an array of `np_type`, else the raw bytes."""
        info = {e.key: e.value for e in proto.external_data}
        name = info["location"]
        if name not in files:
            files[name] = open(os.path.join(base_dir or ".", name), "rb")  # noqa: SIM115 (closed below)
        f = files[name]
        f.seek(int(info.get("offset", 0)))
        length = int(info.get("length", 0)) if "length" in info else None
        if np_type is None:
            return f.read() if length is None else f.read(length)
        shape = tuple(proto.dims)
        a = np.empty(shape, dtype=np_type.newbyteorder("<"))
        if a.nbytes and f.readinto(memoryview(a).cast("B")) != a.nbytes:
            raise ValueError(f"external data of {proto.name!r} ends early")
        return a if np_type.newbyteorder("<") == np_type else a.astype(np_type)

    def take(c: gs.Constant) -> None:
        lazy = c._values
        if id(c) in seen or not isinstance(lazy, LazyValues):
            return
        seen.add(id(c))
        proto = lazy.tensor
        np_type = None
        if not isinstance(lazy, SparseValues) and proto.data_type in _ONNX_PLAIN:
            np_type = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(proto.data_type))
        stored = proto.data_location == onnx.TensorProto.EXTERNAL if isinstance(proto, onnx.TensorProto) else False
        if stored:
            # The values are in memory now (graphsurgeon would export the mark); DEFAULT, as
            # onnx's own loader leaves it, so the output is the same whichever way it was read.
            c.data_location = onnx.TensorProto.DEFAULT
        if np_type in _PLAIN:
            a = external(proto, np_type) if stored else numpy_helper.to_array(proto)
            a.flags.writeable = False  # see prunec.graph.store: exported arrays are never edited in place
            c._values = a
            return
        own = type(proto)()
        own.CopyFrom(proto)
        if stored:
            own.raw_data = external(proto, None)
            own.ClearField("data_location")
            del own.external_data[:]
        c._values = type(lazy)(own)

    def detach(protos):
        if protos is None:
            return None
        out = []
        for x in protos:
            own = type(x)()
            own.CopyFrom(x)
            out.append(own)
        return out

    for g in [graph, *graph.subgraphs(recursive=True), *graph.functions]:
        # graphsurgeon keeps the model's opset list itself, which would keep the whole model alive.
        g.import_domains = detach(g.import_domains)
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                take(t)
        for node in g.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Constant):
                    take(v)
    for fn in graph.functions:
        for node in fn.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Constant):
                    take(v)
    for f in files.values():
        f.close()


_ONNX_PLAIN = {onnx.helper.np_dtype_to_tensor_dtype(d) for d in _PLAIN}


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """`graph.copy()` (new nodes and tensors, the same weight arrays and attributes), made once
    per tensor: graphsurgeon's copy walks the graph twice and copies every node output twice,
    which was a third of the masked reference's cost. Graphs with subgraphs copy as
    graphsurgeon copies them (the outer graph's tensors must reach into the bodies)."""
    from collections import OrderedDict

    if next(iter(graph.subgraphs()), None) is not None:
        return graph.copy()
    copies = {name: t.copy() for name, t in graph.tensors().items()}

    def get(t: gs.Tensor) -> gs.Tensor:
        return copies[t.name] if t.name else gs.Variable.empty()

    nodes = [gs.Node(n.op, n.name, OrderedDict(n.attrs), inputs=[get(t) for t in n.inputs],
                     outputs=[get(t) for t in n.outputs], domain=n.domain) for n in graph.nodes]
    return gs.Graph(nodes=nodes, inputs=[get(t) for t in graph.inputs], outputs=[get(t) for t in graph.outputs],
                    name=graph.name, doc_string=graph.doc_string, opset=graph.opset,
                    import_domains=graph.import_domains, functions=list(graph.functions),
                    ir_version=graph.ir_version)


def model_template(model: onnx.ModelProto) -> onnx.ModelProto:
    """What `to_onnx` needs of a model besides the graph: the model-level fields and the graph's
    declared inputs and outputs, without nodes or weights (small, so a run can keep it)."""
    t = onnx.ModelProto()
    t.ir_version = model.ir_version
    t.producer_name, t.producer_version = model.producer_name, model.producer_version
    t.domain, t.model_version, t.doc_string = model.domain, model.model_version, model.doc_string
    t.opset_import.extend(model.opset_import)
    t.metadata_props.extend(model.metadata_props)
    t.functions.extend(model.functions)
    t.graph.name = model.graph.name
    t.graph.input.extend(model.graph.input)
    t.graph.output.extend(model.graph.output)
    return t



def release_unused(c: gs.Tensor, graph: gs.Graph) -> None:
    """Free the values of a constant a pass has just replaced, if nothing reads it any more.

    graphsurgeon's tensors sit in reference cycles (each is the parent of its own input and
    output lists), so a replaced weight otherwise lives until the cycle collector runs, and a
    pass that replaces every weight would hold them all twice. The constant stays, empty, until
    `normalize` drops it."""
    if isinstance(c, gs.Constant) and not c.inputs and not c.outputs \
            and all(t is not c for t in graph.outputs):
        c._values = np.empty(0, dtype=c.dtype if isinstance(c.dtype, np.dtype) else np.float32)


def normalize(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and unused constants, then sort topologically."""
    return toposort(cleanup(graph))


def cleanup(graph: gs.Graph) -> gs.Graph:
    """`graph.cleanup(remove_unused_graph_inputs=False)`: the same nodes removed the same way,
    without graphsurgeon's per-call bookkeeping and the log line it formats for every node it
    removes whatever the log level. Graphs with subgraphs or functions go to graphsurgeon."""
    if graph.functions or next(iter(graph.subgraphs()), None) is not None:
        return graph.cleanup(remove_unused_graph_inputs=False)
    for t in graph.inputs:
        t.inputs.clear()
    local = _local_names(graph)
    seen: set[str] = set()

    def wanted(t: gs.Tensor) -> bool:  # graphsurgeon's filter: empty, else local and not yet seen
        if t.is_empty():
            return True
        if t.name not in local or t.name in seen:
            return False
        seen.add(t.name)
        return True

    used_tensors = [t for t in graph.outputs if wanted(t)]
    members = {id(n) for n in graph.nodes}
    used: set[int] = set()
    i = 0
    while i < len(used_tensors):
        t = used_tensors[i]
        i += 1
        for node in t.inputs:
            if id(node) not in members:
                # A producer outside the graph: graphsurgeon's own bookkeeping decides.
                return graph.cleanup(remove_unused_graph_inputs=False)
            used.add(id(node))
            used_tensors.extend(x for x in list(node.inputs) if wanted(x))
    if len(used) == len(graph.nodes):
        return graph
    kept = []
    for node in graph.nodes:
        if id(node) in used:
            kept.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = kept
    return graph


def _local_names(graph: gs.Graph) -> set[str]:
    """Names graphsurgeon counts as the graph's own: node outputs, graph inputs, constants."""
    local = {t.name for n in graph.nodes for t in n.outputs if not t.is_empty()}
    local.update(t.name for t in graph.inputs)
    local.update(t.name for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant))
    local.update(t.name for t in graph.outputs if isinstance(t, gs.Constant))
    return local


def toposort(graph: gs.Graph) -> gs.Graph:
    """`graph.toposort()`, in the same order, computed without recursion or graphsurgeon's
    per-call bookkeeping for graphs without subgraphs or functions (graphsurgeon's sort then
    only ranks nodes by depth, keeping its discovery order among equals); others, and any
    graph this does not recognise (a cycle, a producer outside the graph), are sorted by
    graphsurgeon."""
    if graph.functions or next(iter(graph.subgraphs()), None) is not None:
        return graph.toposort()
    nodes = graph.nodes
    members = {id(n) for n in nodes}
    local = _local_names(graph)

    def producers(node: gs.Node) -> list[gs.Node]:
        found: dict[int, gs.Node] = {}
        for t in node.inputs:
            if t.name in local:
                for p in t.inputs:
                    found.setdefault(id(p), p)
        return list(found.values())

    level: dict[int, int] = {}
    order: list[gs.Node] = []  # graphsurgeon's discovery order: producers first, depth first
    for root in nodes:
        if id(root) in level:
            continue
        stack = [(root, producers(root), 0)]
        path = {id(root)}
        while stack:
            node, ins, i = stack[-1]
            while i < len(ins) and id(ins[i]) in level:
                i += 1
            if i < len(ins):
                p = ins[i]
                if id(p) in path or id(p) not in members:
                    return graph.toposort()  # a cycle, or a stale producer: graphsurgeon decides
                stack[-1] = (node, ins, i + 1)
                path.add(id(p))
                stack.append((p, producers(p), 0))
                continue
            stack.pop()
            path.discard(id(node))
            level[id(node)] = 1 + max((level[id(p)] for p in ins), default=-1)
            order.append(node)
    graph.nodes = sorted(order, key=lambda n: level[id(n)])
    return graph


def to_onnx(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the template model's IR version, producer, metadata and opsets."""
    count("export")
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


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    """A graph as a model ONNX Runtime can run (for measurements, not for saving): no type check,
    IR version at most 10 (what this onnxruntime accepts)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    return model
