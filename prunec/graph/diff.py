"""What changed between two models, node by node: the analysis behind `prunec diff`.

`diff_models(before, after)` pairs nodes (prunec.graph.match), then for each pair compares
attributes, input/output shapes and dtypes (shape inference at resolved input shapes), weight
shapes and values, channel counts, params and MACs (from prunec.graph.costs, the one counter);
it compares initializers (shape, dtype, sparsity, dense/sparse storage, values), the model's
inputs and outputs (a changed output is *breaking*), and totals. Both models are only read.

The result is plain data; `ModelDiff.to_dict()` is the JSON document described in
docs/diff-schema.md (its `schema_version` is `SCHEMA_VERSION`), and the renderers in
prunec.report.diff only format it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from prunec.errors import InputShapeError
from prunec.graph.costs import CostReport, analyze_costs
from prunec.graph.fold import concrete_shapes
from prunec.graph.io import default_opset
from prunec.graph.match import GraphIndex, match_nodes
from prunec.graph.shapes import infer_shapes
from prunec.runtime.inputs import graph_inputs, resolve_input_shapes

#: Bump when a field of the JSON document changes meaning or disappears (adding fields is minor).
SCHEMA_VERSION = 1

#: Ops whose weight shape defines input/output channel counts.
CHANNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

Pair = list  # [before, after]; None on a side where the thing does not exist


@dataclass
class TensorInfo:
    """A tensor as seen on one side: name, dims (int, symbolic str, or None) and dtype name."""

    name: str
    shape: list | None
    dtype: str | None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype}


@dataclass
class SlotChange:
    """One input/output/weight slot of a matched node whose shape, dtype or values differ."""

    slot: int
    before: TensorInfo | None
    after: TensorInfo | None
    changes: list[str]

    def to_dict(self) -> dict:
        return {"slot": self.slot, "before": _opt(self.before), "after": _opt(self.after),
                "changes": self.changes}


@dataclass
class NodeRef:
    """A node on one side: name (may be empty), op type, position in the graph."""

    name: str
    op_type: str
    index: int

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "index": self.index}


@dataclass
class NodeDiff:
    """One node of either model: matched (changed or not), removed, or added."""

    status: str  # "unchanged" | "changed" | "removed" | "added"
    match: str | None  # "name" | "topology" | "order" for matched nodes
    before: NodeRef | None
    after: NodeRef | None
    changes: list[str] = field(default_factory=list)
    attributes: dict[str, Pair] = field(default_factory=dict)
    inputs: list[SlotChange] = field(default_factory=list)
    outputs: list[SlotChange] = field(default_factory=list)
    weights: list[SlotChange] = field(default_factory=list)
    channels: dict[str, Pair] = field(default_factory=dict)  # "in"/"out" -> [before, after]
    output_shape: Pair = field(default_factory=lambda: [None, None])
    params: Pair = field(default_factory=lambda: [None, None])
    macs: Pair = field(default_factory=lambda: [None, None])

    @property
    def name(self) -> str:
        """The after-name if the node exists after, else the before-name."""
        ref = self.after or self.before
        return ref.name or f"{ref.op_type}_{ref.index}"

    @property
    def op_type(self) -> str:
        return (self.after or self.before).op_type

    @property
    def renamed(self) -> bool:
        return bool(self.before and self.after and self.before.name != self.after.name)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "op_type": self.op_type, "status": self.status, "match": self.match,
            "renamed": self.renamed, "before": _opt(self.before), "after": _opt(self.after),
            "changes": self.changes, "attributes": self.attributes,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "weights": [s.to_dict() for s in self.weights],
            "channels": self.channels, "output_shape": self.output_shape,
            "params": self.params, "macs": self.macs,
        }


@dataclass
class InitInfo:
    """An initializer on one side: shape, dtype, storage ("dense"/"sparse"), fraction of zeros."""

    name: str
    shape: list[int]
    dtype: str
    storage: str
    sparsity: float

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype, "storage": self.storage,
                "sparsity": round(self.sparsity, 6)}


@dataclass
class InitializerDiff:
    """One initializer of either model and what changed about it."""

    status: str  # "unchanged" | "changed" | "removed" | "added"
    before: InitInfo | None
    after: InitInfo | None
    changes: list[str] = field(default_factory=list)  # shape, dtype, storage, sparsity, values

    @property
    def name(self) -> str:
        return (self.after or self.before).name

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "before": _opt(self.before),
                "after": _opt(self.after), "changes": self.changes}


@dataclass
class IODiff:
    """A graph input or output on both sides; `breaking` when callers of the model would break."""

    kind: str  # "input" | "output"
    status: str  # "unchanged" | "changed" | "renamed" | "removed" | "added"
    before: TensorInfo | None
    after: TensorInfo | None
    inferred_shape: Pair
    breaking: bool
    changes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (self.after or self.before).name

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "status": self.status,
                "before": _opt(self.before), "after": _opt(self.after),
                "inferred_shape": self.inferred_shape, "breaking": self.breaking,
                "changes": self.changes}


@dataclass
class ModelDiff:
    """Everything `prunec diff` reports; render with prunec.report.diff, serialise with to_dict()."""

    totals: dict[str, Pair]
    input_shapes: Pair
    nodes: list[NodeDiff]
    initializers: list[InitializerDiff]
    io: list[IODiff]
    matched_by: dict[str, int]
    warnings: list[str]
    file_bytes_source: str  # "file" (sizes given) or "serialized" (protobuf size)

    @property
    def changed_nodes(self) -> list[NodeDiff]:
        """Nodes that changed, were removed or were added, in graph order."""
        return [n for n in self.nodes if n.status != "unchanged"]

    @property
    def breaking(self) -> bool:
        """True when an input or output changed in a way that breaks callers."""
        return any(x.breaking for x in self.io)

    @property
    def empty(self) -> bool:
        """True when nothing but names differ."""
        return (not self.changed_nodes and all(i.status == "unchanged" for i in self.initializers)
                and all(x.status == "unchanged" for x in self.io)
                and all(v[0] == v[1] for k, v in self.totals.items() if k != "file_bytes"))

    def counts(self) -> dict[str, int]:
        """How many nodes are unchanged/changed/removed/added."""
        out = {"unchanged": 0, "changed": 0, "removed": 0, "added": 0}
        for n in self.nodes:
            out[n.status] += 1
        return out

    def to_dict(self, *, only_changed: bool = False) -> dict:
        """The JSON document (docs/diff-schema.md); `only_changed` drops unchanged entries."""
        keep = (lambda x: x.status != "unchanged") if only_changed else (lambda x: True)
        return {
            "schema_version": SCHEMA_VERSION,
            "only_changed": only_changed,
            "summary": {
                "breaking": self.breaking, "empty": self.empty, "nodes": self.counts(),
                "matched": sum(self.matched_by.values()), "matched_by": self.matched_by, "file_bytes_source": self.file_bytes_source,
            },
            "totals": self.totals,
            "input_shapes": self.input_shapes,
            "warnings": self.warnings,
            "io": [x.to_dict() for x in self.io if keep(x)],
            "nodes": [n.to_dict() for n in self.nodes if keep(n)],
            "initializers": [i.to_dict() for i in self.initializers if keep(i)],
        }


def _opt(x: Any) -> Any:
    return x.to_dict() if x is not None else None


# ---------------------------------------------------------------------------------------------
# One side of the diff: everything we need to know about one model, computed once.


def _dtype_name(elem_type: int) -> str | None:
    if not elem_type:
        return None
    try:
        return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        return str(elem_type)


def _dims(tt: onnx.TypeProto.Tensor) -> list | None:
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _sparse_to_dense(s: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(s.values)
    dense = np.zeros(tuple(s.dims), dtype=values.dtype)
    if values.size:
        idx = numpy_helper.to_array(s.indices).astype(np.int64)
        if idx.ndim == 1:  # linearised indices
            dense.reshape(-1)[idx] = values
        else:
            dense[tuple(idx.T)] = values
    return dense


@dataclass
class _Side:
    model: onnx.ModelProto
    index: GraphIndex
    costs: CostReport
    tensors: dict[str, TensorInfo]  # every tensor shape inference knows about
    inits: dict[str, tuple[InitInfo, str]]  # name -> (info, digest of the dense value)
    node_costs: list[tuple[int | None, int | None]]  # per node: (params, macs)


def _side(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]]) -> _Side:
    names = {s.name for s in graph_inputs(model)}
    shapes_in = resolve_input_shapes(model, {k: v for k, v in overrides.items() if k in names})
    costs = analyze_costs(model, shapes_in)
    # Shapes as the cost counter sees them (it folds run-time shape arithmetic); dtypes from
    # plain inference.
    shapes = concrete_shapes(model, shapes_in)
    g = infer_shapes(model, shapes_in).graph
    dtypes = {vi.name: _dtype_name(vi.type.tensor_type.elem_type)
              for vi in list(g.input) + list(g.value_info) + list(g.output)}
    tensors = {name: TensorInfo(name, list(shape), dtypes.get(name)) for name, shape in shapes.items()}
    for name, dtype in dtypes.items():
        tensors.setdefault(name, TensorInfo(name, None, dtype))
    # Keep a digest of each value, not the array: the diff must not hold two copies of big models.
    inits: dict[str, tuple[InitInfo, str]] = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        inits[t.name] = (InitInfo(t.name, list(t.dims), _dtype_name(t.data_type), "dense",
                                  _zeros(arr)), _array_digest(arr))
    for s in model.graph.sparse_initializer:
        arr = _sparse_to_dense(s)
        inits[s.values.name] = (InitInfo(s.values.name, list(s.dims), _dtype_name(s.values.data_type),
                                         "sparse", _zeros(arr)), _array_digest(arr))
    for name, (info, _) in inits.items():
        tensors[name] = TensorInfo(name, info.shape, info.dtype)
    return _Side(model, GraphIndex.of(model), costs, tensors, inits, _per_node_costs(model, costs))


def _array_digest(arr: np.ndarray) -> str:
    """Content digest of a dense value (dtype and shape are compared separately)."""
    if arr.dtype == object:  # strings: bytes of the objects, not of their pointers
        return hashlib.sha256(repr(arr.tolist()).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _zeros(arr: np.ndarray) -> float:
    return float(arr.size - np.count_nonzero(arr)) / arr.size if arr.size else 0.0


def _per_node_costs(model: onnx.ModelProto, costs: CostReport) -> list[tuple[int | None, int | None]]:
    """Line the cost report's layers (a subset of nodes, in graph order) up with node indices."""
    out: list[tuple[int | None, int | None]] = []
    layers = costs.layers
    j = 0
    for i, n in enumerate(model.graph.node):
        key = n.name or f"{n.op_type}_{i}"
        if j < len(layers) and layers[j].name == key and layers[j].op_type == n.op_type:
            out.append((layers[j].params, layers[j].macs))
            j += 1
        else:
            out.append((0, 0))  # analyze_costs lists every node with params or MACs
    return out


# ---------------------------------------------------------------------------------------------
# Comparing.


def _attr_value(a: onnx.AttributeProto) -> Any:
    """An attribute as comparable, JSON-able data (tensors by dtype/shape/content digest)."""
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, onnx.TensorProto):
        arr = numpy_helper.to_array(v)
        return {"tensor": {"shape": list(v.dims), "dtype": _dtype_name(v.data_type),
                           "values": arr.tolist() if arr.size <= 16 and arr.dtype.kind in "biuf"
                           else f"<{arr.size} values>",
                           "_digest": _array_digest(arr)}}
    if isinstance(v, onnx.GraphProto):
        return {"graph": v.name, "_digest": _digest(v.SerializeToString(deterministic=True))}
    if isinstance(v, list):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x if isinstance(x, (int, float, str))
                else {type(x).__name__: _digest(x.SerializeToString(deterministic=True))} for x in v]
    if isinstance(v, (onnx.SparseTensorProto, onnx.TypeProto)):
        return {type(v).__name__: _digest(v.SerializeToString(deterministic=True))}
    return v


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _public(v: Any) -> Any:
    """Drop the private comparison keys before a value goes into the report."""
    if isinstance(v, dict):
        return {k: _public(x) for k, x in v.items() if not k.startswith("_")}
    return v


def _attr_changes(nb: onnx.NodeProto, na: onnx.NodeProto) -> dict[str, Pair]:
    ab = {a.name: _attr_value(a) for a in nb.attribute}
    aa = {a.name: _attr_value(a) for a in na.attribute}
    out = {}
    for k in sorted(set(ab) | set(aa)):
        if ab.get(k) != aa.get(k):
            out[k] = [_public(ab.get(k)), _public(aa.get(k))]
    return out


def _tensor(side: _Side, name: str) -> TensorInfo:
    return side.tensors.get(name) or TensorInfo(name, None, None)


def _channels(node: onnx.NodeProto, side: _Side) -> tuple[int | None, int | None]:
    """(in, out) channels: from the weight for Conv/ConvTranspose/Gemm/MatMul, else axis 1 of the
    first input/output (rank >= 2); None where unknown."""
    def const_shape(slot: int) -> list[int] | None:
        if slot < len(node.input) and node.input[slot] in side.inits:
            return side.inits[node.input[slot]][0].shape
        return None

    def attr(name: str, default: int) -> int:
        return next((a.i for a in node.attribute if a.name == name), default)

    op = node.op_type
    if op in CHANNEL_OPS and node.domain in ("", "ai.onnx"):
        w = const_shape(1)
        if w is None or len(w) < 2:
            return None, None
        if op == "Conv":
            return w[1] * attr("group", 1), w[0]
        if op == "ConvTranspose":
            return w[0], w[1] * attr("group", 1)
        if op == "Gemm":
            return (w[1], w[0]) if attr("transB", 0) else (w[0], w[1])
        return w[-2], w[-1]  # MatMul with a constant right-hand side

    def axis1(names) -> int | None:
        if not names or not names[0]:
            return None
        s = _tensor(side, names[0]).shape
        return s[1] if s and len(s) >= 2 and isinstance(s[1], int) else None

    return axis1(node.input), axis1(node.output)


def _slot_changes(nb: onnx.NodeProto, na: onnx.NodeProto, b: _Side, a: _Side, *, outputs: bool
                  ) -> tuple[list[SlotChange], list[SlotChange]]:
    """(tensor slot changes, weight slot changes) between two matched nodes."""
    tb_all, ta_all = (nb.output, na.output) if outputs else (nb.input, na.input)
    tensors, weights = [], []
    for slot in range(max(len(tb_all), len(ta_all))):
        tb = tb_all[slot] if slot < len(tb_all) and tb_all[slot] else None
        ta = ta_all[slot] if slot < len(ta_all) and ta_all[slot] else None
        if tb is None and ta is None:
            continue
        const = (tb in b.inits) or (ta in a.inits)
        ib = (b.inits[tb][0] if tb in b.inits else _tensor(b, tb)) if tb else None
        ia = (a.inits[ta][0] if ta in a.inits else _tensor(a, ta)) if ta else None
        ib_t = TensorInfo(ib.name, ib.shape, ib.dtype) if ib else None
        ia_t = TensorInfo(ia.name, ia.shape, ia.dtype) if ia else None
        changes = []
        if ib is None or ia is None:
            changes.append("added" if ib is None else "removed")
        else:
            if ib.shape != ia.shape:
                changes.append("shape")
            if ib.dtype != ia.dtype:
                changes.append("dtype")
            if const and tb in b.inits and ta in a.inits and not changes:
                if b.inits[tb][1] != a.inits[ta][1]:
                    changes.append("values")
        if changes:
            (weights if const else tensors).append(SlotChange(slot, ib_t, ia_t, changes))
    return tensors, weights


def _node_ref(side: _Side, i: int) -> NodeRef:
    n = side.index.nodes[i]
    return NodeRef(n.name, n.op_type, i)


def _out_shape(side: _Side, i: int) -> list | None:
    n = side.index.nodes[i]
    return _tensor(side, n.output[0]).shape if n.output and n.output[0] else None


def _compare_nodes(bi: int, ai: int, kind: str, b: _Side, a: _Side) -> NodeDiff:
    nb, na = b.index.nodes[bi], a.index.nodes[ai]
    d = NodeDiff("unchanged", kind, _node_ref(b, bi), _node_ref(a, ai))
    d.attributes = _attr_changes(nb, na)
    d.inputs, w_in = _slot_changes(nb, na, b, a, outputs=False)
    d.outputs, _ = _slot_changes(nb, na, b, a, outputs=True)
    d.weights = w_in
    d.params = [b.node_costs[bi][0], a.node_costs[ai][0]]
    d.macs = [b.node_costs[bi][1], a.node_costs[ai][1]]
    d.output_shape = [_out_shape(b, bi), _out_shape(a, ai)]
    cb, ca = _channels(nb, b), _channels(na, a)
    for key, x, y in (("in", cb[0], ca[0]), ("out", cb[1], ca[1])):
        if x != y:
            d.channels[key] = [x, y]
    if d.attributes:
        d.changes.append("attributes")
    if d.inputs:
        d.changes.append("inputs")
    if d.outputs:
        d.changes.append("outputs")
    if any(c in ("shape", "dtype", "added", "removed") for w in d.weights for c in w.changes):
        d.changes.append("weights")
    if any("values" in w.changes for w in d.weights):
        d.changes.append("weight_values")
    if d.channels:
        d.changes.append("channels")
    if d.params[0] != d.params[1]:
        d.changes.append("params")
    if d.macs[0] != d.macs[1]:
        d.changes.append("macs")
    if d.changes:
        d.status = "changed"
    return d


def _one_sided(side: _Side, i: int, status: str) -> NodeDiff:
    n = side.index.nodes[i]
    ref = _node_ref(side, i)
    params, macs = side.node_costs[i]
    ch = _channels(n, side)
    before = status == "removed"
    pair = (lambda v: [v, None]) if before else (lambda v: [None, v])
    weights = []
    for k, t in enumerate(n.input):
        if t in side.inits:
            info = side.inits[t][0]
            ti = TensorInfo(t, info.shape, info.dtype)
            weights.append(SlotChange(k, ti if before else None, None if before else ti, [status]))
    return NodeDiff(status, None, ref if before else None, None if before else ref,
                    changes=[status], weights=weights,
                    channels={k: pair(v) for k, v in (("in", ch[0]), ("out", ch[1])) if v is not None},
                    output_shape=pair(_out_shape(side, i)), params=pair(params), macs=pair(macs))


def _compare_inits(b: _Side, a: _Side, matching) -> list[InitializerDiff]:
    # Pair by name, then by the slot they occupy in matched nodes (passes rename weights too).
    pairs: dict[str, str] = {n: n for n in b.inits if n in a.inits}
    used_a = set(pairs.values())
    for bi, (ai, _) in matching.pairs.items():
        for tb, ta in zip(b.index.nodes[bi].input, a.index.nodes[ai].input):
            if tb in b.inits and ta in a.inits and tb not in pairs and ta not in used_a:
                pairs[tb] = ta
                used_a.add(ta)
    out: list[InitializerDiff] = []
    for name, (ib, digest_b) in b.inits.items():
        if name not in pairs:
            out.append(InitializerDiff("removed", ib, None, ["removed"]))
            continue
        ia, digest_a = a.inits[pairs[name]]
        changes = [k for k in ("shape", "dtype", "storage") if getattr(ib, k) != getattr(ia, k)]
        if round(ib.sparsity, 6) != round(ia.sparsity, 6):
            changes.append("sparsity")
        if not changes and digest_b != digest_a:
            changes.append("values")
        out.append(InitializerDiff("changed" if changes else "unchanged", ib, ia, changes))
    for name, (ia, _) in a.inits.items():
        if name not in used_a:
            out.append(InitializerDiff("added", None, ia, ["added"]))
    return out


def _io_infos(side: _Side, kind: str) -> list[tuple[TensorInfo, list | None]]:
    g = side.model.graph
    vis = [vi for vi in g.input if vi.name not in side.inits] if kind == "input" else list(g.output)
    return [(TensorInfo(vi.name, _dims(vi.type.tensor_type), _dtype_name(vi.type.tensor_type.elem_type)),
             _tensor(side, vi.name).shape) for vi in vis]


def _declared_equal(x: list | None, y: list | None) -> bool:
    # Symbolic dims may be renamed freely; only fixed values and rank matter to callers.
    if x is None or y is None:
        return x is y
    return len(x) == len(y) and all((p == q) if isinstance(p, int) or isinstance(q, int) else True
                                    for p, q in zip(x, y))


def _compare_io(b: _Side, a: _Side, warnings: list[str]) -> list[IODiff]:
    out: list[IODiff] = []
    for kind in ("input", "output"):
        xb, xa = _io_infos(b, kind), _io_infos(a, kind)
        names_a = {t.name: k for k, (t, _) in enumerate(xa)}
        used: set[int] = set()
        rows: list[tuple[int | None, int | None]] = []
        for k, (t, _) in enumerate(xb):
            if t.name in names_a:
                rows.append((k, names_a[t.name]))
                used.add(names_a[t.name])
            else:
                rows.append((k, None))
        # An output that kept its position but not its name is a rename (consumers still break).
        rows = [(k, k if j is None and k < len(xa) and k not in used and xa[k][0].name not in
                 {t.name for t, _ in xb} else j) for k, j in rows]
        used = {j for _, j in rows if j is not None}
        rows += [(None, j) for j in range(len(xa)) if j not in used]
        for k, j in rows:
            tb, sb = xb[k] if k is not None else (None, None)
            ta, sa = xa[j] if j is not None else (None, None)
            changes: list[str] = []
            if tb is None or ta is None:
                status = "added" if tb is None else "removed"
                changes.append(status)
            else:
                if tb.name != ta.name:
                    changes.append("name")
                if tb.dtype != ta.dtype:
                    changes.append("dtype")
                if not _declared_equal(tb.shape, ta.shape) or sb != sa:
                    changes.append("shape")
                status = "renamed" if changes == ["name"] else ("changed" if changes else "unchanged")
            # An added output breaks nobody; anything else that changed breaks callers.
            breaking = bool(changes) and not (kind == "output" and status == "added")
            d = IODiff(kind, status, tb, ta, [sb, sa], breaking, changes)
            out.append(d)
            if breaking:
                warnings.append(_io_warning(d))
    return out


def _fmt_shape(s: list | None) -> str:
    return "?" if s is None else "x".join("?" if v is None else str(v) for v in s) or "scalar"


def _io_warning(d: IODiff) -> str:
    what = {"input": "callers must feed it differently", "output": "consumers of the model break"}
    if d.status in ("added", "removed"):
        return f"BREAKING: {d.kind} {d.name!r} {d.status}: {what[d.kind]}"
    parts = []
    if "name" in d.changes:
        parts.append(f"renamed {d.before.name!r} → {d.after.name!r}")
    if "dtype" in d.changes:
        parts.append(f"dtype {d.before.dtype} → {d.after.dtype}")
    if "shape" in d.changes:
        sb, sa = d.inferred_shape
        if sb != sa:
            parts.append(f"shape {_fmt_shape(sb)} → {_fmt_shape(sa)}")
        else:
            parts.append(f"declared shape {_fmt_shape(d.before.shape)} → {_fmt_shape(d.after.shape)}")
    return f"BREAKING: {d.kind} {d.before.name!r} {', '.join(parts)}: {what[d.kind]}"


def _graph_order(nodes: list[NodeDiff], matching) -> list[NodeDiff]:
    """After-graph order; a removed node goes right after its nearest matched predecessor."""
    keyed = []
    last_after = -1.0
    removed_rank = {}
    for bi in range(max([bi for bi in matching.pairs] + matching.removed + [-1]) + 1):
        if bi in matching.pairs:
            last_after = float(matching.pairs[bi][0])
        else:
            removed_rank[bi] = last_after + 0.5
    for d in nodes:
        if d.after is not None:
            keyed.append(((float(d.after.index), 0, d.after.index), d))
        else:
            keyed.append(((removed_rank[d.before.index], 1, d.before.index), d))
    return [d for _, d in sorted(keyed, key=lambda x: x[0])]


def diff_models(before: onnx.ModelProto, after: onnx.ModelProto, *,
                input_shapes: dict[str, tuple[int, ...]] | None = None,
                file_sizes: tuple[int | None, int | None] | None = None) -> ModelDiff:
    """Compare two models node by node (see the module docstring); neither model is modified."""
    overrides = dict(input_shapes or {})
    known = {s.name for s in graph_inputs(before)} | {s.name for s in graph_inputs(after)}
    stray = sorted(set(overrides) - known)
    if stray:
        raise InputShapeError(f"--input-shape names unknown input(s) {', '.join(stray)}; "
                              f"the models' inputs are {', '.join(sorted(known)) or '(none)'}")
    b, a = _side(before, overrides), _side(after, overrides)
    matching = match_nodes(b.index, a.index)

    nodes = [_compare_nodes(bi, ai, kind, b, a) for bi, (ai, kind) in matching.pairs.items()]
    nodes += [_one_sided(b, i, "removed") for i in matching.removed]
    nodes += [_one_sided(a, i, "added") for i in matching.added]
    nodes = _graph_order(nodes, matching)

    warnings: list[str] = []
    io = _compare_io(b, a, warnings)
    inits = _compare_inits(b, a, matching)
    unknown = [f"MACs unknown for {len(s.costs.unknown_mac_layers)} layer(s) of the {w} model"
               for s, w in ((b, "before"), (a, "after")) if s.costs.unknown_mac_layers]
    warnings += unknown

    if file_sizes is not None:
        fb, source = list(file_sizes), "file"
    else:
        fb, source = [before.ByteSize(), after.ByteSize()], "serialized"
    totals = {
        "nodes": [b.costs.nodes, a.costs.nodes],
        "params": [b.costs.params, a.costs.params],
        "macs": [b.costs.macs, a.costs.macs],
        "file_bytes": fb,
        "opset": [default_opset(before), default_opset(after)],
        "ir_version": [before.ir_version, after.ir_version],
        "inputs": [len(_io_infos(b, "input")), len(_io_infos(a, "input"))],
        "outputs": [len(before.graph.output), len(after.graph.output)],
        "initializers": [len(b.inits), len(a.inits)],
        "sparse_initializers": [len(before.graph.sparse_initializer), len(after.graph.sparse_initializer)],
    }
    matched_by = {k: 0 for k in ("name", "topology", "order")}
    for _, kind in matching.pairs.values():
        matched_by[kind] += 1
    shapes = [{k: list(v) for k, v in s.costs.input_shapes.items()} for s in (b, a)]
    return ModelDiff(totals, shapes, nodes, inits, io, matched_by, warnings, source)


__all__ = ["SCHEMA_VERSION", "ModelDiff", "NodeDiff", "InitializerDiff", "IODiff", "TensorInfo",
           "SlotChange", "NodeRef", "InitInfo", "diff_models", "CHANNEL_OPS"]
