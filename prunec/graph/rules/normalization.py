"""Channel rules for normalizations: per-channel ones (BatchNorm, InstanceNorm) carry channels
with their parameters attached; ones that mix values across an axis freeze channels on it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Label, Walker, rule
from prunec.graph.rules.common import norm_axis


@rule("BatchNormalization", "InstanceNormalization")
def _per_channel_norm(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    if lab.axes != (1,):
        # Normalization is over axis 1, which carries no channels: pass through unchanged.
        w.set(node.outputs[0], lab)
        return
    params = node.inputs[1:5] if node.op == "BatchNormalization" else node.inputs[1:3]
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]) or \
            not all(isinstance(p, gs.Constant) for p in params):
        w.freeze(lab, f"{node.op} {node.name!r}: training mode or non-constant parameters")
        return
    for p in params:
        w.site(node, p, 0, lab.atoms, "attached")
    w.set(node.outputs[0], lab)


_LAYER_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def _mixed_axes(node: gs.Node, r: int) -> set[int]:
    """Axes whose values an op mixes, at the semantics of opset 13 and later."""
    if node.op in _LAYER_NORMS:
        return set(range(norm_axis(int(node.attrs.get("axis", -1)), r), r))
    if node.op == "GroupNormalization":
        return {1}
    if node.op == "MeanVarianceNormalization":
        return {norm_axis(a, r) for a in node.attrs.get("axes", [0, 2, 3])}
    return {norm_axis(int(node.attrs.get("axis", -1)), r)}


def _mixed_axes_coerced_2d(node: gs.Node, r: int) -> set[int]:
    """Softmax, LogSoftmax and Hardmax before opset 13 flatten the input to 2-D at `axis`
    (default 1) and normalize each row: every axis from `axis` on is mixed."""
    return set(range(norm_axis(int(node.attrs.get("axis", 1)), r), r))


def _normalizing_rule(mixed_axes):
    def apply(w: Walker, node: gs.Node) -> None:
        """Ops that mix values across axes: channels on those axes are frozen, others pass."""
        lab = w.label(node.inputs[0])
        r = w.rank(node.inputs[0])
        if lab is None:
            return
        if r is None:
            w.freeze_node(node)
            return
        mixed = set(lab.axes) & mixed_axes(node, r)
        if mixed and all(w.uniform_along(lab, lab.axes.index(a)) for a in mixed):
            mixed = set()  # whole heads (heads mode): a head's own positions are never cut apart
        if mixed:
            if node.op in _LAYER_NORMS and w.mode.hidden and lab.single:
                _hidden_norm(w, node, lab)
                return
            why = f"{node.op} {node.name!r} normalizes across the channel axis"
            if node.op in _LAYER_NORMS:
                why += f" ({HIDDEN_HINT})"
            w.freeze(lab, why)
            frozen_output(w, node.outputs[0], lab, why)
            return
        if len(node.inputs) > 1 and any(w.label(t) is not None for t in node.inputs[1:]):
            w.freeze_node(node)
            return
        w.set(node.outputs[0], lab)
    return apply


#: How to lift a freeze at a normalization across the hidden width.
HIDDEN_HINT = "the hidden width; -O channels.hidden=true prunes it, lossy"


def frozen_output(w: Walker, t: gs.Tensor, like: Label, why: str) -> None:
    """Label `t` with fresh frozen channels laid out as `like`: whatever later joins them (a
    residual Add) is frozen for the same reason, instead of for an 'unprunable operand'."""
    w.set(t, Label(like.axes, w.uf.make(like.atoms.size).reshape(like.atoms.shape)))
    w.freeze(w.label(t), why)


def _hidden_norm(w: Walker, node: gs.Node, lab: Label) -> None:
    """Hidden mode: a LayerNorm/RMSNorm over exactly the channel axis lets channels through with
    its scale and bias attached; its statistics then cover only the kept channels (lossy)."""
    params = [t for t in node.inputs[1:3] if t.name]
    n = lab.atoms.shape[0]
    for p in params:
        if not isinstance(p, gs.Constant) or p.values.size != n or p.values.ndim < 1 \
                or p.values.shape[-1] != n:
            why = f"{node.op} {node.name!r}: scale or bias is not one constant per channel"
            w.freeze(lab, why)
            frozen_output(w, node.outputs[0], lab, why)
            return
    for p in params:
        w.site(node, p, p.values.ndim - 1, lab.atoms, "attached")
    w.statistics.append((node, lab.atoms))
    w.set(node.outputs[0], lab)
    for o in node.outputs[1:]:  # Mean, InvStdDev: one value per normalized row
        w.no_channels(o)


_normalizing = _normalizing_rule(_mixed_axes)
rule("LayerNormalization", "GroupNormalization", "LpNormalization", "MeanVarianceNormalization",
     "SimplifiedLayerNormalization", "RMSNormalization")(_normalizing)
rule("Softmax", "LogSoftmax", "Hardmax", since=13)(_normalizing)
rule("Softmax", "LogSoftmax", "Hardmax", since=1)(_normalizing_rule(_mixed_axes_coerced_2d))
# ONNX Runtime's contrib ops (its transformer optimizer writes these).
rule("LayerNormalization", "SimplifiedLayerNormalization", domain="com.microsoft")(_normalizing)


@rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")
def _skip_layer_norm(w: Walker, node: gs.Node) -> None:
    """LayerNorm(input + skip + bias): a residual join (input and skip are united, the bias is
    attached) followed by a normalization across the hidden width (frozen unless hidden mode).
    Output 3 is the sum before normalizing; outputs 1-2 are statistics (no channels)."""
    from prunec.graph.rules.common import has_input

    x, skip = node.inputs[0], node.inputs[1]
    labs = [w.label(x), w.label(skip)]
    if all(lab is None for lab in labs):
        return
    r = w.rank(x)
    ref = next(lab for lab in labs if lab is not None)
    why = None
    if r is None or ref.axes != (r - 1,):
        why = f"{node.op} {node.name!r}: channels not on the normalized last axis"
    elif any(lab is None for lab in labs):
        why = f"{node.op} {node.name!r} adds channels to an operand without them"
    elif labs[0].atoms.shape != labs[1].atoms.shape:
        why = f"{node.op} {node.name!r}: input and skip carry different channels"
    if why:
        for lab in labs:
            w.freeze(lab, why)
        return
    w.union_labels(labs[0], labs[1])
    simplified = node.op == "SkipSimplifiedLayerNormalization"
    bias_at = 3 if simplified else 4
    params = [node.inputs[i] for i in ((2,) if simplified else (2, 3)) if has_input(node, i)]
    bias = node.inputs[bias_at] if has_input(node, bias_at) else None
    n = ref.atoms.shape[0]
    if any(not isinstance(p, gs.Constant) or p.values.shape != (n,) for p in params + ([bias] if bias else [])):
        w.freeze(ref, f"{node.op} {node.name!r}: parameters are not one constant per channel")
        return
    if bias is not None:
        w.site(node, bias, 0, ref.atoms, "attached")
    if len(node.outputs) > 3 and node.outputs[3].name:
        w.set(node.outputs[3], ref)
    if not w.mode.hidden:
        why = f"{node.op} {node.name!r} normalizes across the channel axis ({HIDDEN_HINT})"
        w.freeze(ref, why)
        frozen_output(w, node.outputs[0], ref, why)
        return
    for p in params:
        w.site(node, p, 0, ref.atoms, "attached")
    w.statistics.append((node, ref.atoms))
    w.set(node.outputs[0], ref)
    for o in node.outputs[1:3]:  # mean, inv_std_var: one value per normalized row
        w.no_channels(o)


@rule("LRN")
def _lrn(w: Walker, node: gs.Node) -> None:
    """LRN divides each channel by the energy of its `size` neighbours along axis 1. Removing a
    channel changes who the neighbours of the others are, so no removal is exact: freeze."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    if 1 in lab.axes:
        w.freeze(lab, f"LRN {node.name!r} mixes each channel with its neighbours, which removal would change")
        return
    w.set(node.outputs[0], lab)
