"""The one place where parameters and multiply-accumulates are counted.

`inspect`, `run`, `profile` and `diff` all read these numbers, so they always agree. MACs are
per run at the resolved input shapes (symbolic batch = 1 unless told otherwise).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from math import prod

import onnx

from prunec.graph.fold import concrete_shapes
from prunec.runtime.inputs import resolve_input_shapes

#: Ops whose multiply-accumulates are counted.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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
    macs: int
    unknown_mac_layers: list[str]
    op_histogram: dict[str, int]
    layers: list[LayerCost] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return d


def constant_tensors(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every constant tensor (initializer, sparse initializer, Constant node) -> (dims, elem_type)."""
    consts: dict[str, tuple[tuple[int, ...], int]] = {}
    for t in model.graph.initializer:
        consts[t.name] = (tuple(t.dims), t.data_type)
    for s in model.graph.sparse_initializer:
        consts[s.values.name] = (tuple(s.dims), s.values.data_type)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = (tuple(a.t.dims), a.t.data_type)
                elif a.name == "sparse_value":
                    consts[n.output[0]] = (tuple(a.sparse_tensor.dims), a.sparse_tensor.values.data_type)
    return consts


def _is_float(elem_type: int) -> bool:
    return elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16)


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int | None:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul node given all tensor shapes, else None."""

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
    return 0


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
    macs = 0
    for n in model.graph.node:
        if n.op_type in MAC_OPS:
            macs += node_macs(n, shapes) or 0
    return int(params), int(macs)


def analyze_costs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  *, batch: int = 1) -> CostReport:
    """Count params and MACs per node and in total, at concrete input shapes."""
    shapes_in = resolve_input_shapes(model, input_shapes, batch=batch)
    shapes = concrete_shapes(model, shapes_in)
    consts = constant_tensors(model)
    for name, (dims, _) in consts.items():
        shapes.setdefault(name, dims)

    total_params = sum(prod(d) for d, et in consts.values() if _is_float(et))
    layers: list[LayerCost] = []
    unknown: list[str] = []
    hist = Counter(n.op_type for n in model.graph.node)
    total_macs = 0
    for i, n in enumerate(model.graph.node):
        if n.op_type == "Constant":
            continue
        params = sum(prod(consts[x][0]) for x in dict.fromkeys(n.input)
                     if x in consts and _is_float(consts[x][1]))
        macs = node_macs(n, shapes) if n.op_type in MAC_OPS else 0
        if macs is None:
            unknown.append(n.name or f"{n.op_type}_{i}")
        else:
            total_macs += macs
        if n.op_type in MAC_OPS or params:
            out = shapes.get(n.output[0]) if n.output else None
            w = consts[n.input[1]][0] if len(n.input) > 1 and n.input[1] in consts else None
            layers.append(LayerCost(n.name or f"{n.op_type}_{i}", n.op_type, params, macs,
                                    tuple(out) if out else None, w))
    return CostReport(nodes=len(model.graph.node), params=int(total_params), macs=int(total_macs),
                      unknown_mac_layers=unknown, op_histogram=dict(sorted(hist.items())),
                      layers=layers, input_shapes=shapes_in)
