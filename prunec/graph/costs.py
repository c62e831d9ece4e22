"""The one place where parameters and multiply-accumulates are counted.

`inspect`, `run`, `profile` and `diff` all read these numbers, so they always agree. MACs are
per run at the resolved input shapes (symbolic batch = 1 unless told otherwise).

Control flow counts too: an If costs one of its branches, so the total is a range (`macs_min` to
`macs`); a Loop with a constant trip count costs its body that many times (at most: a loop with a
condition may stop early, so its lower end is 0); a Scan costs its body once per scanned element.
Parameters inside subgraphs are counted where they are stored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path

import onnx

from prunec.graph.fold import concrete_shapes
from prunec.graph.subgraphs import proto_subgraphs, walk_proto_graphs
from prunec.runtime.inputs import resolve_input_shapes

#: Ops whose multiply-accumulates are counted.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Fused attention ops (ONNX Runtime's com.microsoft ones, ONNX's from opset 23): their Q·Kᵀ and
#: scores·V products, and com.microsoft Attention's packed Q/K/V projection, are counted.
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
#: Quantized twins of the MAC ops, counted as the float op they compute (integer MACs):
#: op -> (float op, index of its weight input).
QUANTIZED_MAC_OPS = {"ConvInteger": ("Conv", 1), "MatMulInteger": ("MatMul", 1),
                     "QLinearConv": ("Conv", 3), "QLinearMatMul": ("MatMul", 3), "QGemm": ("Gemm", 3)}


@dataclass
class LayerCost:
    """Cost of one node: its constant parameters and its MACs (None when shapes are unknown)."""

    name: str
    op_type: str
    params: int
    macs: int | None
    output_shape: tuple | None = None
    weight_shape: tuple | None = None


@dataclass
class CostReport:
    """Whole-model costs plus the per-layer breakdown."""

    nodes: int
    params: int
    #: MACs of the most expensive path through control flow (every MAC when there is none).
    macs: int
    unknown_mac_layers: list[str]
    op_histogram: dict[str, int]
    layers: list[LayerCost] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: MACs of the cheapest path through control flow (If branches, Loops that may exit early).
    macs_min: int | None = None

    def __post_init__(self) -> None:
        if self.macs_min is None:
            self.macs_min = self.macs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return d


def constant_tensors(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every constant tensor (initializer, sparse initializer, Constant node), in subgraphs too,
    -> (dims, elem_type)."""
    consts: dict[str, tuple[tuple[int, ...], int]] = {}
    for g in walk_proto_graphs(model.graph):
        _graph_constants(g, consts)
    return consts


def _graph_constants(graph: onnx.GraphProto, consts: dict) -> None:
    for t in graph.initializer:
        consts[t.name] = (tuple(t.dims), t.data_type)
    for s in graph.sparse_initializer:
        consts[s.values.name] = (tuple(s.dims), s.values.data_type)
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = (tuple(a.t.dims), a.t.data_type)
                elif a.name == "sparse_value":
                    consts[n.output[0]] = (tuple(a.sparse_tensor.dims), a.sparse_tensor.values.data_type)


#: Element types of parameters: floating point weights, and the narrow integers quantized weights
#: are stored in (int32 biases and int64 shape constants are not counted).
_PARAM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                *(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E5M2")
                  if hasattr(onnx.TensorProto, n))}


def _is_float(elem_type: int) -> bool:
    """Whether a constant of this element type counts as parameters."""
    return elem_type in _PARAM_TYPES


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int | None:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul (or fused attention) node given all tensor
    shapes, else None."""

    def known(name: str) -> tuple[int, ...] | None:
        s = shapes.get(name)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return s

    op = node.op_type
    if op == "Conv":
        y, w = known(node.output[0]), known(node.input[1])
        return prod(y) * prod(w[1:]) if y and w else None
    if op == "ConvTranspose":
        x, w = known(node.input[0]), known(node.input[1])
        return prod(x) * prod(w[1:]) if x and w else None
    if op == "Gemm":
        a, y = known(node.input[0]), known(node.output[0])
        if not (a and y):
            return None
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return prod(y) * k
    if op == "MatMul":
        a, y = known(node.input[0]), known(node.output[0])
        if a is None or y is None:
            return None
        return prod(y) * a[-1]
    if op in ATTENTION_OPS:
        return _attention_macs(node, known)
    return 0


def mac_positions(graph, shapes: dict[str, tuple]) -> dict[str, float] | None:
    """For every node of a (topologically sorted) gs.Graph, the share of the graph's MACs spent
    up to and including it, in graph order; None when some layer's MACs are unknown at `shapes`
    (symbolic dims) or the graph has none."""
    import onnx_graphsurgeon as gs

    known = dict(shapes)
    known.update({name: tuple(t.shape) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)})
    macs = []
    for n in graph.nodes:
        # node_macs reads only the tensors' shapes and a Gemm's transA.
        attrs = {"transA": n.attrs["transA"]} if n.op == "Gemm" and "transA" in n.attrs else {}
        proto = onnx.helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs],
                                      domain=n.domain or None, **attrs)
        m = node_macs(proto, known)
        if m is None:
            return None
        macs.append(m)
    total = sum(macs)
    if total <= 0:
        return None
    out, cum = {}, 0
    for n, m in zip(graph.nodes, macs):
        cum += m
        out[n.name] = cum / total
    return out


def totals_at(model: onnx.ModelProto, shapes: dict[str, tuple], const_dims: dict[str, tuple[int, ...]] | None = None
              ) -> tuple[int, int]:
    """(params, MACs) of `model` as `analyze_costs` counts them, at the given tensor shapes, with
    the dims of some constants replaced by `const_dims` (a removal priced without rewriting)."""
    consts = constant_tensors(model)
    shapes = dict(shapes)
    for name, (dims, elem) in consts.items():
        if const_dims and name in const_dims:
            consts[name] = (tuple(const_dims[name]), elem)
            shapes[name] = tuple(const_dims[name])
        else:
            shapes.setdefault(name, dims)
    params = sum(prod(d) for d, et in consts.values() if _is_float(et))
    # The same walk as analyze_costs (quantized and attention ops, control flow): its total.
    _, macs = _graph_macs(model.graph, shapes, consts, _int_scalars(model), [], [])
    return int(params), int(macs)


def _attention_macs(node: onnx.NodeProto, known) -> int | None:
    """A fused attention: Q·Kᵀ costs |Q|·L and scores·V |Y|·L (L keys per query, KV heads
    repeated for grouped queries); com.microsoft Attention adds its Q/K/V projection."""
    q, y = known(node.input[0]), known(node.output[0])
    if q is None or y is None or len(node.input) < 2:
        return None
    if node.op_type == "Attention" and node.domain == "com.microsoft":
        w = known(node.input[1])
        if w is None or len(q) != 3:
            return None
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), None) \
            or [w[1] // 3] * 3
        return prod(q) * w[1] + q[0] * q[1] * q[1] * (sizes[0] + sizes[2])
    present = known(node.output[1]) if len(node.output) > 1 and node.output[1] else None
    k = known(node.input[1]) if node.input[1] else None
    if present is not None and len(present) == 4:
        keys = present[2]
    elif k is not None and len(k) in (3, 4):
        keys = k[1] if len(k) == 3 else k[2]
    else:
        return None
    return (prod(q) + prod(y)) * keys


def analyze_costs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  *, batch: int = 1, base_dir: str | Path | None = None) -> CostReport:
    """Count params and MACs per node and in total, at concrete input shapes. `base_dir`: where
    the weights of a model kept as a skeleton lie (see `concrete_shapes`)."""
    shapes_in = resolve_input_shapes(model, input_shapes, batch=batch)
    shapes = concrete_shapes(model, shapes_in, base_dir=base_dir)
    consts = constant_tensors(model)
    for name, (dims, _) in consts.items():
        shapes.setdefault(name, dims)

    total_params = sum(prod(d) for d, et in consts.values() if _is_float(et))
    layers: list[LayerCost] = []
    unknown: list[str] = []
    all_nodes = [n for g in walk_proto_graphs(model.graph) for n in g.node]
    hist = Counter(n.op_type for n in all_nodes)
    lo, hi = _graph_macs(model.graph, shapes, consts, _int_scalars(model), layers, unknown)
    return CostReport(nodes=len(all_nodes), params=int(total_params), macs=int(hi),
                      unknown_mac_layers=unknown, op_histogram=dict(sorted(hist.items())),
                      layers=layers, input_shapes=shapes_in, macs_min=int(lo))


def _graph_macs(graph: onnx.GraphProto, shapes: dict, consts: dict, scalars: dict, layers: list[LayerCost],
                unknown: list[str]) -> tuple[int, int]:
    """(fewest, most) MACs of one run of `graph`; appends its layers and unknown layers."""
    lo = hi = 0
    for i, n in enumerate(graph.node):
        if n.op_type == "Constant":
            continue
        name = n.name or f"{n.op_type}_{i}"
        params = sum(prod(consts[x][0]) for x in dict.fromkeys(n.input)
                     if x in consts and _is_float(consts[x][1]))
        counted = n.op_type in MAC_OPS or n.op_type in QUANTIZED_MAC_OPS or n.op_type in ATTENTION_OPS
        macs = node_macs(_as_float_op(n), shapes) if counted else 0
        if macs is None:
            unknown.append(name)
        else:
            lo, hi = lo + macs, hi + macs
        if counted or params:
            out = shapes.get(n.output[0]) if n.output else None
            w = consts[n.input[1]][0] if len(n.input) > 1 and n.input[1] in consts else None
            layers.append(LayerCost(name, n.op_type, params, macs, tuple(out) if out else None, w))
        subs = proto_subgraphs(n)
        if not subs:
            continue
        costs = [_graph_macs(g, shapes, consts, scalars, layers, unknown) for _, g in subs]
        if n.op_type == "If":
            lo += min(c[0] for c in costs)
            hi += max(c[1] for c in costs)
            continue
        trips, may_stop = _trip_count(n, shapes, scalars)
        if trips is None:
            if any(c[1] for c in costs):
                unknown.append(f"{name} (body runs an unknown number of times)")
            continue
        lo += 0 if may_stop else trips * sum(c[0] for c in costs)
        hi += trips * sum(c[1] for c in costs)
    return lo, hi


def _as_float_op(n: onnx.NodeProto) -> onnx.NodeProto:
    """A quantized MAC op as its float twin (same activation input, weight, output) for counting."""
    if n.op_type not in QUANTIZED_MAC_OPS:
        return n
    op, wi = QUANTIZED_MAC_OPS[n.op_type]
    f = onnx.NodeProto()
    f.CopyFrom(n)
    f.op_type = op
    del f.input[:]
    f.input.extend([n.input[0], n.input[wi]])
    return f


def _trip_count(n: onnx.NodeProto, shapes: dict, scalars: dict[str, int]) -> tuple[int | None, bool]:
    """How many times a Loop or Scan runs its body (None if unknown), and whether it may stop
    earlier (a Loop with a condition input)."""
    if n.op_type == "Loop":
        m = n.input[0] if n.input else ""
        return scalars.get(m), len(n.input) > 1 and bool(n.input[1])
    if n.op_type == "Scan":
        n_scan = next((a.i for a in n.attribute if a.name == "num_scan_inputs"), 0)
        axes = next((list(a.ints) for a in n.attribute if a.name == "scan_input_axes"), [0] * n_scan)
        first = list(n.input)[len(n.input) - n_scan] if n_scan else None
        s = shapes.get(first) if first else None
        if s:
            ax = axes[0] + len(s) if axes[0] < 0 else axes[0]
            if isinstance(s[ax], int):
                return s[ax], False
    return None, False


def _int_scalars(model: onnx.ModelProto) -> dict[str, int]:
    """Integer scalar constants by name (Loop trip counts), in subgraphs too."""
    from onnx import numpy_helper

    out = {}
    for g in walk_proto_graphs(model.graph):
        tensors = [t for t in g.initializer]
        tensors += [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        names = [t.name for t in g.initializer] + [n.output[0] for n in g.node if n.op_type == "Constant"
                                                    for a in n.attribute if a.name == "value"]
        for name, t in zip(names, tensors):
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and prod(t.dims) == 1:
                out[name] = int(numpy_helper.to_array(t).ravel()[0])
    return out
