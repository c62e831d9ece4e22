"""`channels round=measure`: choose kept widths by timing candidates on the target runtime.

For each of the costliest channel groups (MACs of every layer that reads or writes the group),
a small model of the group's two costliest layers is built at each candidate width: its
costliest producer (a Conv, Gemm or MatMul writing the group's channels) followed by ReLU and
its costliest consumer (reading them), with the real kernel sizes, strides, groups and input
shapes, random weights. Two layers rather than one, because what a misaligned width costs on a
CPU is mostly the layout change between layers (ONNX Runtime leaves its blocked NCHWc path and
inserts reorders), which a lone layer does not show.

Candidates are the nominal width k = n - floor(n * ratio) and k rounded down and up to
multiples of 4, 8, 16 and 32, within 25% of k. Each candidate is timed round-robin on the
target; the chosen width keeps the most channels per millisecond (w / median ms), and among
widths within 2% of the best, the one nearest k, so the ratio asked for moves only as far as
speed pays for.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from prunec.graph.channels import ChannelAnalysis
from prunec.runtime.inputs import resolve_input_shapes
from prunec.runtime.runtimes import check_target
from prunec.runtime.target import Target
from prunec.runtime.timing import interleaved_ms

MULTIPLES = (4, 8, 16, 32)
SPREAD = 0.25
TOLERANCE = 0.02
RUNS = 20
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def candidate_widths(k: int, n: int, minimum: int = 1) -> list[int]:
    """k and its neighbours on multiples of 4, 8, 16, 32, within 25% of k, in [minimum, n]."""
    lo, hi = max(1, minimum), n
    span = max(1.0, SPREAD * k)
    out = {k}
    for m in MULTIPLES:
        for w in (m * math.floor(k / m), m * math.ceil(k / m)):
            if lo <= w <= hi and abs(w - k) <= span:
                out.add(w)
    return sorted(w for w in out if lo <= w <= hi)


def choose_width(k: int, ms: dict[int, float]) -> int:
    """The width with the most channels per millisecond; within TOLERANCE of it, the nearest to k
    (ties: the wider)."""
    score = {w: w / t for w, t in ms.items() if t > 0}
    best = max(score.values())
    near = [w for w, s in score.items() if s >= best * (1 - TOLERANCE)]
    return min(near, key=lambda w: (abs(w - k), -w))


def _macs(node: gs.Node, shapes: dict[str, tuple]) -> int:
    out = shapes.get(node.outputs[0].name)
    w = node.inputs[1]
    if out is None or not isinstance(w, gs.Constant) or not all(isinstance(d, int) for d in out):
        return 0
    wshape = w.values.shape
    if node.op == "Conv":
        return int(np.prod(out)) * int(np.prod(wshape[1:]))
    return int(np.prod(out)) * int(wshape[0] if node.op == "MatMul" or not node.attrs.get("transB", 0)
                                   else wshape[1])


def _group_layers(analysis: ChannelAnalysis, group, shapes) -> tuple[int, gs.Node | None, gs.Node | None]:
    """(MACs of the group's layers, costliest producer, costliest consumer) among the layers
    whose weights hold exactly one slice per class of the group."""
    roots = analysis.roots
    classes = np.asarray(group.classes)
    best = {"producer": (0, None), "consumer": (0, None)}
    total = 0
    seen = set()
    for s in analysis.sites:
        if s.role not in best or s.node.op not in _WEIGHT_OPS:
            continue
        hits = np.isin(roots[s.atoms], classes)
        if not hits.any():
            continue
        macs = _macs(s.node, shapes)
        if s.node.name not in seen:
            total += macs
            seen.add(s.node.name)
        if hits.sum() != group.size or len(s.atoms) != group.size:
            continue  # not one slice per class (Flatten->Gemm, partial concat): not a model of width
        if macs > best[s.role][0]:
            best[s.role] = (macs, s.node)
    return total, best["producer"][1], best["consumer"][1]


def _layer_model(prod: gs.Node | None, cons: gs.Node | None, width: int, shapes, seed: int = 0
                 ) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]] | None:
    """producer(width out) -> Relu -> consumer(width in) when the shapes chain, else both side by
    side; None when a layer's shapes are unknown or it is not a plain dense layer."""
    rng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs, feeds = [], [], [], [], {}

    def add_input(name, shape):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        feeds[name] = tuple(shape)

    def weight(name, shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))

    def layer(node: gs.Node, x: str, in_c: int, out_c: int, tag: str) -> str | None:
        if node.op == "Conv":
            attrs = dict(node.attrs)
            group = int(attrs.get("group", 1))
            kshape = tuple(node.inputs[1].values.shape[2:])
            c_in_orig = node.inputs[1].values.shape[1] * group
            if group == 1:
                weight(f"w_{tag}", (out_c, in_c) + kshape)
            elif group == c_in_orig == node.inputs[1].values.shape[0]:  # depthwise: width on both sides
                out_c = in_c
                attrs["group"] = in_c
                weight(f"w_{tag}", (in_c, 1) + kshape)
            else:
                return None
            nodes.append(helper.make_node("Conv", [x, f"w_{tag}"], [f"y_{tag}"], **attrs))
            return f"y_{tag}"
        weight(f"w_{tag}", (in_c, out_c))
        nodes.append(helper.make_node("MatMul", [x, f"w_{tag}"], [f"y_{tag}"]))
        return f"y_{tag}"

    def in_shape(node):
        s = shapes.get(node.inputs[0].name)
        return tuple(s) if s is not None and all(isinstance(d, int) for d in s) else None

    def out_channels(node):
        w = node.inputs[1].values.shape
        if node.op == "Conv":
            return w[0]
        return w[1] if node.op == "MatMul" or not node.attrs.get("transB", 0) else w[0]

    if prod is not None and prod.op == "Gemm" and prod.attrs.get("transA", 0):
        prod = None
    if cons is not None and cons.op == "Gemm" and cons.attrs.get("transA", 0):
        cons = None
    chained = out_p = None
    if prod is not None:
        sp = in_shape(prod)
        if sp is None:
            return None
        add_input("x_p", sp)
        chan_axis = 1 if prod.op == "Conv" else len(sp) - 1
        y = layer(prod, "x_p", sp[chan_axis], width, "p")
        if y is None:
            return None
        nodes.append(helper.make_node("Relu", [y], ["r_p"]))
        chained = "r_p"
        out_p = shapes.get(prod.outputs[0].name)
    if cons is not None:
        sc = in_shape(cons)
        if sc is None:
            return None
        chan_axis = 1 if cons.op == "Conv" else len(sc) - 1
        cs = list(sc)
        cs[chan_axis] = width
        x = chained if chained is not None and out_p is not None and tuple(out_p) == tuple(sc) else None
        if x is None:
            if chained is not None:
                outputs.append(chained)
            add_input("x_c", cs)
            x = "x_c"
        y = layer(cons, x, width, out_channels(cons), "c")
        if y is None:
            return None
        outputs.append(y)
    elif chained is not None:
        outputs.append(chained)
    if not outputs:
        return None
    graph = helper.make_graph(nodes, "width", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, feeds


def measure_widths(analysis: ChannelAnalysis, ratios: dict[str, float], target: Target, *, minimum: int,
                   top: int, input_shapes: dict | None = None, runs: int = RUNS) -> dict[str, dict]:
    """{group id: {"nominal", "chosen", "ms": {width: median ms}, "macs", "layers"}} for the `top`
    costliest prunable groups on `target` (the caller rounds the others)."""
    from prunec.graph.fold import concrete_shapes
    from prunec.passes.channels import kept_count

    if top <= 0:
        return {}
    model = gs.export_onnx(analysis.graph, do_type_check=False)
    model.ir_version = min(model.ir_version or 8, 10)
    shapes = concrete_shapes(model, resolve_input_shapes(model, input_shapes))
    runtime = check_target(target)
    ranked = []
    for g in analysis.groups:
        if g.frozen or analysis.channels_per_class(g) != 1:
            continue
        k = kept_count(g.size, ratios[g.id], minimum=minimum, multiple=1)
        if k >= g.size:
            continue
        cost, prod, cons = _group_layers(analysis, g, shapes)
        if prod is None and cons is None:
            continue
        ranked.append((cost, g, k, prod, cons))
    ranked.sort(key=lambda r: -r[0])
    out: dict[str, dict] = {}
    for cost, g, k, prod, cons in ranked[:top]:
        widths = candidate_widths(k, g.size, minimum)
        if len(widths) < 2:
            continue
        runners, sessions = {}, []
        for w in widths:
            built = _layer_model(prod, cons, w, shapes)
            if built is None:
                break
            m, feed_shapes = built
            sess = runtime.open(m, target, shapes=feed_shapes)
            feeds = {n: np.random.default_rng(1).standard_normal(s).astype(np.float32)
                     for n, s in feed_shapes.items()}
            runners[w] = (lambda s=sess, f=feeds: s.infer(f))
            sessions.append(sess)
        else:
            ms = interleaved_ms(runners, runs=runs, warmup=3)
            out[g.id] = {"nominal": k, "chosen": choose_width(k, ms), "ms": {str(w): t for w, t in ms.items()},
                         "macs": cost, "layers": [n.name for n in (prod, cons) if n is not None]}
        for s in sessions:
            s.close()
    return out
