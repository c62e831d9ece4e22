"""Channel rules for ops that act on each channel alone: unary activations, element-wise joins
(which unite the channels they join), pooling and reductions over non-channel axes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Label, Walker, rule
from prunec.graph.rules.common import axes_param, norm_axis


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Mish",
          "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg",
          "Sqrt", "Reciprocal", "Identity", "Cast", "CastLike", "Floor", "Ceil", "Round", "Sin", "Cos",
          "Sign", "Not", "IsNaN", "IsInf", "Clip", "Dropout", "Shrink", "Swish")
#: ONNX Runtime contrib activations of one input. (BiasGelu and FastGelu add a per-channel bias
#: input, so they are not unary: without their own rule they freeze.)
_UNARY_MS = ("Gelu", "QuickGelu")


@rule(*_UNARY_MS, domain="com.microsoft")
@rule(*_UNARY)
def _unary(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    for t in node.inputs[1:]:
        if w.label(t) is not None:
            w.freeze(w.label(t), f"{node.op} {node.name!r}: channels in a parameter input")
    w.set(node.outputs[0], lab)


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is not None and lab.axes != (1,):
        w.freeze(lab, f"{node.op} {node.name!r} pools over the channel axis")
        return
    w.set(node.outputs[0], lab)



_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu", "Mod",
                "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                "Where", "BitShift")


@rule(*_ELEMENTWISE)
def _elementwise(w: Walker, node: gs.Node) -> None:
    out = node.outputs[0]
    r_out = w.rank(out)
    ins = [t for t in node.inputs if t.name]
    labels = [(t, w.label(t)) for t in ins]
    labeled = [(t, lab) for t, lab in labels if lab is not None]
    if not labeled:
        return
    if r_out is None:
        w.freeze_node(node, f"{node.op} {node.name!r}: output rank unknown")
        return
    # Align every labeled input's axes to the output (numpy broadcasting aligns from the right).
    aligned = []
    for t, lab in labeled:
        r = w.rank(t)
        if r is None:
            w.freeze_node(node, f"{node.op} {node.name!r}: input rank unknown")
            return
        aligned.append((t, Label(tuple(a + r_out - r for a in lab.axes), lab.atoms)))
    # The input with the most channel axes; the others join it (broadcast along axes they lack).
    ref = max((lab for _, lab in aligned), key=lambda lab: len(lab.axes))
    for t, lab in aligned:
        if lab is ref:
            continue
        if lab.axes == ref.axes and lab.atoms.shape == ref.atoms.shape:
            w.union_labels(ref, lab)
        elif not w.union_broadcast(lab, ref):
            for _, l2 in aligned:
                w.freeze(l2, f"{node.op} {node.name!r} joins channels on different axes")
            return
    out_shape = w.shape(out)
    for t in ins:
        if w.label(t) is not None:
            continue
        s = w.shape(t)
        if s is None:
            w.freeze(ref, f"{node.op} {node.name!r}: operand shape unknown")
            return
        offs = r_out - len(s)
        dims = [s[a - offs] if a - offs >= 0 else 1 for a in ref.axes]
        # Label axes along which the operand varies and which a class may cut (an axis whose
        # positions are all one class, a head's head_dim in heads mode, is never cut).
        cut = [k for k, d in enumerate(dims) if d != 1 and not w.uniform_along(ref, k)]
        if not cut:
            continue  # broadcast along the channels, or varies only within whole classes
        k = cut[0]
        if len(cut) == 1 and isinstance(t, gs.Constant) and dims[k] == ref.atoms.shape[k] and \
                all(w.uniform_along(ref, j) for j in range(len(ref.axes)) if j != k):
            atoms = ref.atoms[tuple(slice(None) if j == k else 0 for j in range(len(ref.axes)))]
            w.site(node, t, ref.axes[k] - offs, atoms, "attached")
            continue
        w.freeze(ref, f"{node.op} {node.name!r} combines channels with an unprunable operand {t.name!r}")
        return
    if out_shape is not None and any(out_shape[a] != n for a, n in zip(ref.axes, ref.atoms.shape)):
        w.freeze(ref, f"{node.op} {node.name!r}: channels broadcast against a larger operand")
        return
    w.set(out, ref)



@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")
def _reduce(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze(lab, f"{node.op} {node.name!r}: rank unknown")
        return
    axes = axes_param(w, node)
    if axes is None:
        if len(node.inputs) > 1 and node.inputs[1].name or not node.attrs.get("noop_with_empty_axes", 0):
            axes = list(range(r)) if not (len(node.inputs) > 1 and node.inputs[1].name) else None
    if axes is None:
        w.freeze(lab, f"{node.op} {node.name!r}: axes not constant")
        return
    axes = sorted(norm_axis(a, r) for a in axes)
    whole = [a for a in set(axes) & set(lab.axes) if w.uniform_along(lab, lab.axes.index(a))]
    if whole and len(whole) < len(lab.axes):
        # Reduced over axes a class never cuts (a head's head_dim, in heads mode): the other
        # channel axes carry on.
        keep = [k for k, a in enumerate(lab.axes) if a not in whole]
        lab = Label(tuple(lab.axes[k] for k in keep),
                    lab.atoms[tuple(slice(None) if k in keep else 0 for k in range(len(lab.axes)))])
    if set(axes) & set(lab.axes):
        if node.op == "ReduceMean" and set(axes) == set(lab.axes) and node.attrs.get("keepdims", 1):
            # A decomposed LayerNorm/RMSNorm statistic: in hidden mode the mean covers only the
            # kept channels afterwards (lossy, reported); its output carries no channels.
            if w.mode.hidden:
                w.statistics.append((node, lab.atoms))
                w.no_channels(node.outputs[0])
                return
            w.freeze(lab, f"ReduceMean {node.name!r} averages over the channel axis (a LayerNorm or "
                          "RMSNorm statistic: the hidden width; -O channels.hidden=true prunes it, lossy)")
            return
        w.freeze(lab, f"{node.op} {node.name!r} reduces over the channel axis")
        return
    if node.attrs.get("keepdims", 1):
        w.set(node.outputs[0], lab)
    else:
        w.set(node.outputs[0], Label(tuple(a - sum(x < a for x in axes) for a in lab.axes), lab.atoms))


@rule("Shape", "Size")
def _shape_of(w: Walker, node: gs.Node) -> None:
    """Reading a shape is fine: downstream shape arithmetic sees the pruned shape at run time."""
    for o in node.outputs:
        w.no_channels(o)