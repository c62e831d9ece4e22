"""Channel rules for quantized models, in both of ONNX Runtime's formats.

QDQ: a weight reaches its layer as DequantizeLinear(quantized constant, scale, zero point). That
output is a *weight view*: every rule that slices a constant weight slices the quantized
constant instead, and its scale and zero point with it when they are per channel on the sliced
axis (per-tensor ones stay as they are). Activation QuantizeLinear/DequantizeLinear pairs pass
channels through; per-channel activation parameters are attached to the channels.

QOperator: QLinearConv, QLinearMatMul and com.microsoft's QGemm read and make channels like their
float twins, with the weight's scale and zero point (and the int32 bias) sliced alongside;
QLinearAdd/QLinearMul join channels; unary and pooling QLinear ops pass them through.

Channels are ranked by the dequantized weights. Blocked quantization (opset 21 `block_size`)
is not followed: such weights are left alone, so their channels freeze.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import WEIGHT_VIEWS, Kept, Label, Walker, WeightView, rule
from prunec.graph.rules.common import has_input, norm_axis


def _per_channel(param: gs.Tensor | None, n: int) -> bool:
    """A 1-D constant scale/zero point with one entry per index of an axis of length n."""
    return isinstance(param, gs.Constant) and param.values.ndim == 1 and param.values.shape[0] == n \
        and n > 1


def _NO_WEIGHT(param: gs.Constant) -> np.ndarray:
    """Scales and zero points describe the encoding, not what a channel contributes: they are
    sliced with their channel but rank nothing (a zeroed channel may get scale 1)."""
    return np.zeros(np.shape(param.values), np.float32)


def _is_dq(node: gs.Node) -> bool:
    return node.op == "DequantizeLinear" and node.domain in ("", "ai.onnx", "com.microsoft", None)


def _dequantized(q: gs.Constant, scale: gs.Constant, zp: gs.Constant | None, axis: int) -> np.ndarray:
    """Float32 values of a quantized constant (for ranking channels)."""
    v = np.asarray(q.values).astype(np.float32)
    s = np.asarray(scale.values).astype(np.float32)
    z = np.asarray(zp.values).astype(np.float32) if zp is not None else np.zeros(1, np.float32)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * v.ndim
        shape[axis] = s.size
        s, z = s.reshape(shape), (z.reshape(shape) if z.size > 1 else z)
    return (v - z) * s


def _dq_weight_view(t: gs.Tensor) -> WeightView | None:
    """DequantizeLinear(constant, constant scale[, constant zero point]) is a weight."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1 or not _is_dq(t.inputs[0]):
        return None
    dq = t.inputs[0]
    q, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if has_input(dq, 2) else None
    if not isinstance(q, gs.Constant) or not isinstance(scale, gs.Constant) or \
            (zp is not None and not isinstance(zp, gs.Constant)) or dq.attrs.get("block_size", 0):
        return None
    ndim = q.values.ndim
    axis = norm_axis(int(dq.attrs.get("axis", 1)), ndim) if ndim else 0

    def record(w: Walker, reader: gs.Node, site_axis: int, atoms: np.ndarray, role: str) -> None:
        mag = _dequantized(q, scale, zp, axis)
        w.sites.append(_site(dq, q, site_axis, atoms, role, mag))
        if site_axis == axis and _per_channel(scale, q.values.shape[axis]):
            w.sites.append(_site(dq, scale, 0, atoms, "attached", _NO_WEIGHT(scale)))
            if zp is not None and _per_channel(zp, q.values.shape[axis]):
                w.sites.append(_site(dq, zp, 0, atoms, "attached", _NO_WEIGHT(zp)))
        _check_all_readers_pruned(w, t, reader)

    return WeightView(tuple(int(d) for d in q.values.shape), record)


WEIGHT_VIEWS.append(_dq_weight_view)


def _site(node, tensor, axis, atoms, role, magnitude=None):
    from prunec.graph.channel_core import WeightSite

    return WeightSite(node, tensor, axis, np.asarray(atoms, dtype=np.int64), role, magnitude)


def _check_all_readers_pruned(w: Walker, t: gs.Tensor, reader: gs.Node) -> None:
    """A dequantized weight sliced for one reader must be sliced for all: after the walk, freeze
    its sites if another reader recorded none (e.g. a Shape, or an op without a rule)."""
    readers = getattr(w, "_dq_readers", None)
    if readers is None:
        readers = w._dq_readers = {}
        w.checks.append(_readers_check)
    readers.setdefault(id(t), (t, set()))[1].add(id(reader))


def _readers_check(w: Walker) -> None:
    for t, seen in w._dq_readers.values():
        if {id(n) for n in t.outputs} - seen:
            dq = t.inputs[0]
            for s in w.sites:
                if s.node is dq:
                    w.freeze(Label((0,), s.atoms),
                             f"dequantized weight {t.name!r} is also read by an op that is not pruned")


# -- activation quantization ------------------------------------------------------------------


@rule("QuantizeLinear", "DequantizeLinear")
@rule("QuantizeLinear", "DequantizeLinear", domain="com.microsoft")
def _qdq(w: Walker, node: gs.Node) -> None:
    """Channels pass through; per-channel parameters on a channel axis are attached to it."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    for t in node.inputs[1:]:
        if w.label(t) is not None:
            w.freeze(w.label(t), f"{node.op} {node.name!r}: channels in a quantization parameter")
    r = w.rank(node.inputs[0])
    scale = node.inputs[1]
    zp = node.inputs[2] if has_input(node, 2) else None
    s_shape = w.shape(scale)
    if s_shape is None or r is None or node.attrs.get("block_size", 0):
        w.freeze(lab, f"{node.op} {node.name!r}: quantization parameters prunec cannot follow")
        return
    if len(s_shape) == 1 and s_shape[0] > 1:
        axis = norm_axis(int(node.attrs.get("axis", 1)), r)
        if axis in lab.axes:
            if not lab.single or not isinstance(scale, gs.Constant) or \
                    (zp is not None and not isinstance(zp, gs.Constant)):
                w.freeze(lab, f"{node.op} {node.name!r}: per-channel parameters computed at run time")
                return
            w.site(node, scale, 0, lab.atoms, "attached", _NO_WEIGHT(scale))
            if zp is not None:
                w.site(node, zp, 0, lab.atoms, "attached", _NO_WEIGHT(zp))
    w.set(node.outputs[0], lab)


# -- QOperator weight layers ------------------------------------------------------------------


def _weight_params(w: Walker, node: gs.Node, wt: gs.Tensor, scale: gs.Tensor, zp: gs.Tensor | None,
                   axis: int, atoms: np.ndarray, role: str) -> None:
    """Sites on a quantized weight along `axis`, plus its scale/zero point when per channel there."""
    mag = None
    if isinstance(scale, gs.Constant) and (zp is None or isinstance(zp, gs.Constant)):
        per = _per_channel(scale, wt.values.shape[axis])
        mag = _dequantized(wt, scale, zp, axis if per else 0)
    w.site(node, wt, axis, atoms, role, mag)
    if _per_channel(scale, wt.values.shape[axis]):
        w.site(node, scale, 0, atoms, "attached", _NO_WEIGHT(scale))
        if zp is not None and _per_channel(zp, wt.values.shape[axis]):
            w.site(node, zp, 0, atoms, "attached", _NO_WEIGHT(zp))


def _params_constant(node: gs.Node, idx: tuple[int, ...]) -> bool:
    return all(isinstance(node.inputs[i], gs.Constant) for i in idx if has_input(node, i))


@rule("QLinearConv")
def _qlinear_conv(w: Walker, node: gs.Node) -> None:
    """Inputs: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp[, B]. Per-output-channel w_scale
    and w_zp, and the int32 bias, are sliced with the output channels."""
    x, wt, ws, wz = node.inputs[0], node.inputs[3], node.inputs[4], node.inputs[5]
    b = node.inputs[8] if has_input(node, 8) else None
    xl = w.label(x)
    if not _params_constant(node, (3, 4, 5, 8)):
        w.freeze_node(node, f"QLinearConv {node.name!r} has a non-constant weight or bias")
        return
    cout, cin_g = wt.values.shape[0], wt.values.shape[1]
    g = int(node.attrs.get("group", 1))
    if xl is not None and (xl.axes != (1,) or xl.atoms.shape[0] != cin_g * g):
        w.freeze(xl, f"QLinearConv {node.name!r} reads channels on an unexpected axis")
        xl = None
    if g > 1 and cin_g == 1 and cout == g and xl is not None:
        # Depthwise: channel i in, channel i out; every per-channel parameter is attached.
        _weight_params(w, node, wt, ws, wz, 0, xl.atoms, "attached")
        if b is not None:
            w.site(node, b, 0, xl.atoms, "attached")
        w.set(node.outputs[0], xl)

        def fix(kept: Kept, node=node):
            node.attrs["group"] = int(node.inputs[3].values.shape[0])
        w.fixups.append((node, fix))
        return
    if g != 1:
        w.freeze(xl, f"QLinearConv {node.name!r}: grouped quantized convs are not pruned")
        return
    out = w.fresh(node, cout)
    if xl is not None:
        w.site(node, wt, 1, xl.atoms, "consumer", _magnitude(wt, ws, wz, 0))
    _weight_params(w, node, wt, ws, wz, 0, out, "producer")
    if b is not None:
        w.site(node, b, 0, out, "producer")
    w.set(node.outputs[0], Label((1,), out))


def _magnitude(wt, scale, zp, axis):
    if not isinstance(scale, gs.Constant) or (zp is not None and not isinstance(zp, gs.Constant)):
        return None
    per = _per_channel(scale, wt.values.shape[axis])
    return _dequantized(wt, scale, zp, axis if per else 0)


def _qmatmul_like(w: Walker, node: gs.Node, a: gs.Tensor, b: gs.Tensor, bs: gs.Tensor,
                  bz: gs.Tensor | None, k_axis: int, n_axis: int, bias: gs.Tensor | None) -> None:
    al = w.label(a)
    ra = w.rank(a)
    if not isinstance(b, gs.Constant) or b.values.ndim != 2 or ra is None or \
            not isinstance(bs, gs.Constant) or (bz is not None and not isinstance(bz, gs.Constant)):
        w.freeze_node(node, f"{node.op} {node.name!r}: weight or its parameters are not constant")
        return
    if al is not None and (al.axes != (ra - 1,) or al.atoms.shape[0] != b.values.shape[k_axis]):
        w.freeze(al, f"{node.op} {node.name!r} reads channels on an unexpected axis")
        al = None
    out = w.fresh(node, int(b.values.shape[n_axis]))
    if al is not None:
        w.site(node, b, k_axis, al.atoms, "consumer", _magnitude(b, bs, bz, n_axis))
    _weight_params(w, node, b, bs, bz, n_axis, out, "producer")
    if bias is not None:
        if isinstance(bias, gs.Constant) and bias.values.shape[-1:] == (len(out),):
            w.site(node, bias, bias.values.ndim - 1, out, "producer")
        else:
            w.freeze(Label((ra - 1,), out), f"{node.op} {node.name!r}: bias is not per output feature")
    w.set(node.outputs[0], Label((ra - 1,), out))


@rule("QLinearMatMul")
def _qlinear_matmul(w: Walker, node: gs.Node) -> None:
    """Inputs: a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp; b [K, N] constant."""
    _qmatmul_like(w, node, node.inputs[0], node.inputs[3], node.inputs[4], node.inputs[5], 0, 1, None)


@rule("QGemm", domain="com.microsoft")
def _qgemm(w: Walker, node: gs.Node) -> None:
    """Inputs: A, a_scale, a_zp, B, b_scale, b_zp, C[, y_scale, y_zp]; transB picks B's layout."""
    if node.attrs.get("transA", 0):
        w.freeze_node(node, f"QGemm {node.name!r}: transA")
        return
    k_axis, n_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
    c = node.inputs[6] if has_input(node, 6) else None
    _qmatmul_like(w, node, node.inputs[0], node.inputs[3], node.inputs[4], node.inputs[5], k_axis, n_axis, c)


# -- QOperator element-wise and pass-through ops ----------------------------------------------


@rule("QLinearAdd", "QLinearMul", domain="com.microsoft")
def _qlinear_join(w: Walker, node: gs.Node) -> None:
    """Inputs: A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp: A and B are joined like Add."""
    a, b = node.inputs[0], node.inputs[3]
    la, lb = w.label(a), w.label(b)
    if la is None and lb is None:
        return
    ra, rb, ro = w.rank(a), w.rank(b), w.rank(node.outputs[0])
    if ra is None or rb is None or ro is None:
        w.freeze_node(node, f"{node.op} {node.name!r}: ranks unknown")
        return
    aligned = [Label(tuple(x + ro - r for x in lab.axes), lab.atoms) if lab is not None else None
               for lab, r in ((la, ra), (lb, rb))]
    if la is not None and lb is not None:
        if aligned[0].axes != aligned[1].axes or la.atoms.shape != lb.atoms.shape:
            w.freeze(la, f"{node.op} {node.name!r} joins channels on different axes")
            w.freeze(lb, f"{node.op} {node.name!r} joins channels on different axes")
            return
        w.union_labels(la, lb)
        w.set(node.outputs[0], aligned[0])
        return
    lab, other, r_other = (aligned[0], b, rb) if la is not None else (aligned[1], a, ra)
    s = w.shape(other)
    if s is None or any(s[x - (ro - r_other)] != 1 for x in lab.axes if x - (ro - r_other) >= 0):
        w.freeze(lab, f"{node.op} {node.name!r} combines channels with an unprunable operand")
        return
    w.set(node.outputs[0], lab)


@rule("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", domain="com.microsoft")
def _qlinear_unary(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    if node.op == "QLinearSoftmax":
        r = w.rank(node.inputs[0])
        if r is None or norm_axis(int(node.attrs.get("axis", -1)), r) in lab.axes:
            w.freeze(lab, f"QLinearSoftmax {node.name!r} normalizes across the channel axis")
            return
    w.set(node.outputs[0], lab)


@rule("QLinearGlobalAveragePool", "QLinearAveragePool", domain="com.microsoft")
def _qlinear_pool(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    r = w.rank(node.inputs[0])
    channel_axis = (r - 1 if r else None) if node.attrs.get("channels_last", 0) else 1
    if lab.axes != (channel_axis,):
        w.freeze(lab, f"{node.op} {node.name!r} pools over the channel axis")
        return
    w.set(node.outputs[0], lab)


# -- dynamic quantization (ConvInteger / MatMulInteger after DynamicQuantizeLinear) ------------


@rule("DynamicQuantizeLinear")
def _dynamic_quantize(w: Walker, node: gs.Node) -> None:
    """y = saturate(round(x / scale) + zp) with one scale over the whole tensor, from its range
    (which always includes 0): channels pass to y; removing a channel can move the range, so the
    pruned model's deviation is measured like any lossy rewrite's."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    r = w.rank(node.inputs[0])
    if r is None:
        w.freeze(lab, f"DynamicQuantizeLinear {node.name!r}: rank unknown")
        return
    w.set(node.outputs[0], lab)
    # The scale and zero point are reduced over every channel: a removed channel reaches the
    # kept ones there, so the masked-original proof masks it at this input.
    w.contraction(node, 0, r, lab)
    for o in node.outputs[1:]:
        w.no_channels(o)


@rule("ConvInteger")
def _conv_integer(w: Walker, node: gs.Node) -> None:
    """Inputs: x, w (int8 constant), x_zero_point, w_zero_point (per output channel or scalar)."""
    x, wt = node.inputs[0], node.inputs[1]
    wz = node.inputs[3] if has_input(node, 3) else None
    xl = w.label(x)
    if not isinstance(wt, gs.Constant) or (wz is not None and not isinstance(wz, gs.Constant)) or \
            int(node.attrs.get("group", 1)) != 1:
        w.freeze_node(node, f"ConvInteger {node.name!r}: only group=1 with constant weights is pruned")
        return
    cout, cin = wt.values.shape[0], wt.values.shape[1]
    if xl is not None and (xl.axes != (1,) or xl.atoms.shape[0] != cin):
        w.freeze(xl, f"ConvInteger {node.name!r} reads channels on an unexpected axis")
        xl = None
    out = w.fresh(node, cout)
    if xl is not None:
        w.site(node, wt, 1, xl.atoms, "consumer", wt.values.astype(np.float32))
    w.site(node, wt, 0, out, "producer", wt.values.astype(np.float32))
    if wz is not None and _per_channel(wz, cout):
        w.site(node, wz, 0, out, "attached", _NO_WEIGHT(wz))
    w.set(node.outputs[0], Label((1,), out))


@rule("MatMulInteger")
def _matmul_integer(w: Walker, node: gs.Node) -> None:
    """Inputs: A, B (int8 constant [K, N]), a_zero_point, b_zero_point (per column or scalar)."""
    a, b = node.inputs[0], node.inputs[1]
    bz = node.inputs[3] if has_input(node, 3) else None
    al, ra = w.label(a), w.rank(a)
    if not isinstance(b, gs.Constant) or b.values.ndim != 2 or ra is None or \
            (bz is not None and not isinstance(bz, gs.Constant)):
        w.freeze_node(node, f"MatMulInteger {node.name!r}: weight not a constant matrix")
        return
    k, n = b.values.shape
    if al is not None and (al.axes != (ra - 1,) or al.atoms.shape[0] != k):
        w.freeze(al, f"MatMulInteger {node.name!r} reads channels on an unexpected axis")
        al = None
    out = w.fresh(node, n)
    if al is not None:
        w.site(node, b, 0, al.atoms, "consumer", b.values.astype(np.float32))
    w.site(node, b, 1, out, "producer", b.values.astype(np.float32))
    if bz is not None and _per_channel(bz, n):
        w.site(node, bz, 0, out, "attached", _NO_WEIGHT(bz))
    w.set(node.outputs[0], Label((ra - 1,), out))
