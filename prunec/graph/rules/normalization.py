"""Channel rules for normalizations: per-channel ones (BatchNorm, InstanceNorm) carry channels
with their parameters attached; ones that mix values across an axis freeze channels on it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Walker, rule
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
        if set(lab.axes) & mixed_axes(node, r):
            w.freeze(lab, f"{node.op} {node.name!r} normalizes across the channel axis")
            return
        if len(node.inputs) > 1 and any(w.label(t) is not None for t in node.inputs[1:]):
            w.freeze_node(node)
            return
        w.set(node.outputs[0], lab)
    return apply


_normalizing = _normalizing_rule(_mixed_axes)
rule("LayerNormalization", "GroupNormalization", "LpNormalization", "MeanVarianceNormalization",
     "SimplifiedLayerNormalization", "RMSNormalization")(_normalizing)
rule("Softmax", "LogSoftmax", "Hardmax", since=13)(_normalizing)
rule("Softmax", "LogSoftmax", "Hardmax", since=1)(_normalizing_rule(_mixed_axes_coerced_2d))
# ONNX Runtime's contrib ops (its transformer optimizer writes these).
rule("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
     "SkipSimplifiedLayerNormalization", domain="com.microsoft")(_normalizing)


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
