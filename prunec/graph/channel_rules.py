"""One channel rule per ONNX op family: how atoms flow through the op, which constants they
touch, and what must be rewritten when some are removed. An op without a rule freezes.

Each rule sees the node, reads its input labels, writes output labels, and records unions,
weight sites and fix-ups on the walker. Adding an op means adding one rule here and a test.
"""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept, Label, Walker, rule
from prunec.graph.fold import const_value




def _weight_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a constant weight without loading its values; None when it is not constant."""
    return tuple(int(d) for d in t.shape) if isinstance(t, gs.Constant) else None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _reads_and_writes(w: Walker, node: gs.Node, xl: Label | None, in_axis: int, in_len: int,
                      wt: gs.Constant, k_axis: int, n_axis: int, out_axis: int,
                      bias: gs.Constant | None = None) -> np.ndarray:
    """A weight layer reading channels along weight axis `k_axis` and writing fresh ones along
    `n_axis`: record the consumer and producer sites and label the output. Returns its atoms."""
    if xl is not None and (xl.axes != (in_axis,) or xl.atoms.shape[0] != in_len):
        w.freeze(xl, f"{node.op} {node.name!r} reads channels on an unexpected axis")
        xl = None
    out = w.fresh(node, int(wt.shape[n_axis]))
    if xl is not None:
        w.site(node, wt, k_axis, xl.atoms, "consumer")
    w.site(node, wt, n_axis, out, "producer")
    if bias is not None:
        w.site(node, bias, 0, out, "producer")
    w.set(node.outputs[0], Label((out_axis,), out))
    return out


@rule("Conv")
def _conv(w: Walker, node: gs.Node) -> None:
    x, wt = node.inputs[0], node.inputs[1]
    W = _weight_shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    xl = w.label(x)
    if W is None or (b is not None and not isinstance(b, gs.Constant)):
        w.freeze_node(node, f"Conv {node.name!r} has a non-constant weight or bias")
        return
    g = int(node.attrs.get("group", 1))
    cout, cin_g = W[0], W[1]
    cin = cin_g * g
    if xl is not None and (xl.axes != (1,) or xl.atoms.shape[0] != cin):
        w.freeze(xl, f"Conv {node.name!r} reads channels on an unexpected axis")
        xl = None
    if g > 1 and cin_g == 1 and cout % cin == 0:
        # Depthwise: output channel c*m+j is input channel c's j-th filter; channels pass through.
        mult = cout // cin
        if xl is None:
            # Its channels follow an input we cannot prune, so they cannot be removed either.
            atoms = w.fresh(node, cout)
            w.freeze(Label((1,), atoms), f"depthwise Conv {node.name!r} reads unprunable channels")
        else:
            atoms = np.repeat(xl.atoms, mult)
        lab = Label((1,), atoms)
        w.site(node, wt, 0, atoms, "attached" if xl is not None else "producer")
        if b is not None:
            w.site(node, b, 0, atoms, "attached" if xl is not None else "producer")
        w.set(node.outputs[0], lab)
        if xl is not None:
            def fix(kept: Kept, node=node, mult=mult):
                node.attrs["group"] = int(node.inputs[1].values.shape[0] // mult)
            w.fixups.append((node, fix))
        return
    if g == 1:
        _reads_and_writes(w, node, xl, 1, cin, wt, 1, 0, 1, b)
        return
    # Grouped: every group must keep the same count, so index j is coupled across groups.
    out_atoms = w.fresh(node, cout)
    cout_g = cout // g
    grid = out_atoms.reshape(g, cout_g)
    for j in range(cout_g):
        for k in range(1, g):
            w.uf.union(grid[0, j], grid[k, j])
    if xl is not None:
        ig = xl.atoms.reshape(g, cin_g)
        for j in range(cin_g):
            for k in range(1, g):
                w.uf.union(ig[0, j], ig[k, j])
        w.site(node, wt, 1, ig[0], "consumer")
    w.site(node, wt, 0, out_atoms, "producer")
    if b is not None:
        w.site(node, b, 0, out_atoms, "producer")
    w.set(node.outputs[0], Label((1,), out_atoms))


@rule("ConvTranspose")
def _conv_transpose(w: Walker, node: gs.Node) -> None:
    x, wt = node.inputs[0], node.inputs[1]
    W = _weight_shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    g = int(node.attrs.get("group", 1))
    xl = w.label(x)
    if W is None or g != 1 or \
            (b is not None and not isinstance(b, gs.Constant)) or "output_shape" in node.attrs:
        w.freeze_node(node, f"ConvTranspose {node.name!r}: only group=1 with constant weights is pruned")
        return
    _reads_and_writes(w, node, xl, 1, W[0], wt, 0, 1, 1, b)


@rule("Gemm")
def _gemm(w: Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    B = _weight_shape(bt)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    al = w.label(a)
    if B is None or node.attrs.get("transA", 0) or \
            (c is not None and not isinstance(c, gs.Constant)):
        w.freeze_node(node, f"Gemm {node.name!r}: transA or non-constant weight")
        return
    trans_b = int(node.attrs.get("transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    n = B[n_axis]
    out_atoms = _reads_and_writes(w, node, al, 1, B[k_axis], bt, k_axis, n_axis, 1)
    if c is not None:
        C = np.asarray(c.values)
        if C.ndim >= 1 and C.shape[-1] == n and prod(C.shape[:-1]) == 1:
            w.site(node, c, C.ndim - 1, out_atoms, "producer")
        elif C.size != 1:
            w.freeze(Label((1,), out_atoms), f"Gemm {node.name!r} bias is not per output feature")


@rule("MatMul")
def _matmul(w: Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    al, bl = w.label(a), w.label(bt)
    B = _weight_shape(bt)
    ra = w.rank(a)
    if B is not None and len(B) == 2 and ra is not None and ra >= 2:
        if al is not None and (al.axes != (ra - 1,) or al.atoms.shape[0] != B[0]):
            # Channels on a batch/row axis pass through the product unchanged.
            if al.single and al.axes[0] < ra - 1:
                w.set(node.outputs[0], al)
                return
        _reads_and_writes(w, node, al, ra - 1, B[0], bt, 0, 1, ra - 1)
        return
    rb = w.rank(bt)
    if ra is None or rb is None or ra < 2 or rb < 2:
        w.freeze_node(node)
        return
    _matmul_activations(w, node, al, ra, bl, rb)


def _matmul_activations(w: Walker, node: gs.Node, al: Label | None, ra: int,
                        bl: Label | None, rb: int) -> None:
    """Activation x activation (attention): the contracted axis couples A's atoms with B's.

    Each label axis has a role: a batch axis (aligned to the output, e.g. the heads), the
    contracted K axis, or the operand's own row/column axis. Labels holding K must have the
    same roles on both sides and are united; a label without K flows to the output. Removing a
    class then removes the same head_dim index from Q and K in every head.
    """
    out_rank = max(ra, rb)

    def roles(lab: Label, r: int, k_axis: int, own_axis: int):
        out = []
        for ax in lab.axes:
            if ax == k_axis:
                out.append(("K",))
            elif ax == own_axis:
                out.append(("own", ax + out_rank - r))
            elif ax < r - 2:
                out.append(("batch", ax + out_rank - r))
            else:
                return None
        return out

    ra_roles = roles(al, ra, ra - 1, ra - 2) if al is not None else None
    rb_roles = roles(bl, rb, rb - 2, rb - 1) if bl is not None else None
    why = f"MatMul {node.name!r} multiplies two tensors whose channels prunec cannot align"
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is not None and rl is None:
            w.freeze(lab, why)
    a_k = ra_roles is not None and ("K",) in ra_roles
    b_k = rb_roles is not None and ("K",) in rb_roles
    if a_k or b_k:
        ok = (a_k and b_k and [r for r in ra_roles if r[0] != "own"] == [r for r in rb_roles if r[0] != "own"]
              and not any(r[0] == "own" for r in ra_roles + rb_roles) and al.atoms.shape == bl.atoms.shape)
        if ok:
            w.union_labels(al, bl)
        else:
            if a_k:
                w.freeze(al, why)
            if b_k:
                w.freeze(bl, why)
        return  # labels holding K do not flow to the output (no class removes an output row)
    out: Label | None = None
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is None or rl is None:
            continue
        if out is not None:
            w.freeze(lab, f"MatMul {node.name!r}: both operands carry channels")
            w.freeze(out, f"MatMul {node.name!r}: both operands carry channels")
            out = None
            break
        new_axes = tuple(r[1] for r in rl)
        order = np.argsort(new_axes)
        out = Label(tuple(sorted(new_axes)), np.transpose(lab.atoms, order) if len(new_axes) > 1 else lab.atoms)
    w.set(node.outputs[0], out)


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Mish",
          "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg",
          "Sqrt", "Reciprocal", "Identity", "Cast", "CastLike", "Floor", "Ceil", "Round", "Sin", "Cos",
          "Sign", "Not", "IsNaN", "IsInf", "Clip", "Dropout", "Shrink", "Swish", "QuickGelu",
          "BiasGelu", "FastGelu")


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


@rule("LayerNormalization", "GroupNormalization", "LpNormalization", "Softmax", "LogSoftmax",
      "Hardmax", "MeanVarianceNormalization", "SimplifiedLayerNormalization",
      "SkipLayerNormalization", "RMSNormalization")
def _normalizing(w: Walker, node: gs.Node) -> None:
    """Ops that mix values across an axis: channels on that axis are frozen, others pass."""
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze_node(node)
        return
    if node.op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                   "SkipLayerNormalization"):
        start = _norm_axis(int(node.attrs.get("axis", -1)), r)
        mixed = set(range(start, r))
    elif node.op == "GroupNormalization":
        mixed = {1}
    elif node.op == "MeanVarianceNormalization":
        mixed = {_norm_axis(a, r) for a in node.attrs.get("axes", [0, 2, 3])}
    else:
        default = -1 if node.op != "LpNormalization" else -1
        mixed = {_norm_axis(int(node.attrs.get("axis", default)), r)}
    if set(lab.axes) & mixed:
        w.freeze(lab, f"{node.op} {node.name!r} normalizes across the channel axis")
        return
    if len(node.inputs) > 1 and any(w.label(t) is not None for t in node.inputs[1:]):
        w.freeze_node(node)
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
    ref = aligned[0][1]
    for t, lab in aligned[1:]:
        if lab.axes != ref.axes or lab.atoms.shape != ref.atoms.shape:
            for _, l2 in aligned:
                w.freeze(l2, f"{node.op} {node.name!r} joins channels on different axes")
            return
        w.union_labels(ref, lab)
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
        if all(d == 1 for d in dims):
            continue  # broadcast along the channels: nothing to slice
        if len(ref.axes) == 1 and isinstance(t, gs.Constant) and dims[0] == ref.atoms.shape[0]:
            w.site(node, t, ref.axes[0] - offs, ref.atoms, "attached")
            continue
        w.freeze(ref, f"{node.op} {node.name!r} combines channels with an unprunable operand {t.name!r}")
        return
    if out_shape is not None and any(out_shape[a] != n for a, n in zip(ref.axes, ref.atoms.shape)):
        w.freeze(ref, f"{node.op} {node.name!r}: channels broadcast against a larger operand")
        return
    w.set(out, ref)


@rule("Concat")
def _concat(w: Walker, node: gs.Node) -> None:
    out = node.outputs[0]
    r = w.rank(out)
    labs = [w.label(t) for t in node.inputs]
    if all(lab is None for lab in labs):
        return
    if r is None:
        w.freeze_node(node)
        return
    axis = _norm_axis(int(node.attrs["axis"]), r)
    if all(lab is None or lab.axes == (axis,) for lab in labs):
        parts = []
        for t, lab in zip(node.inputs, labs):
            if lab is None:
                s = w.shape(t)
                if s is None:
                    w.freeze_node(node, f"Concat {node.name!r}: unknown input size")
                    return
                fresh = w.uf.make(s[axis])
                w.freeze(Label((axis,), fresh), f"Concat {node.name!r}: channels from outside any group")
                parts.append(fresh)
            else:
                parts.append(lab.atoms)
        w.set(out, Label((axis,), np.concatenate(parts)))
        return
    # Concatenation along another axis: the channel axes of all inputs are joined.
    if any(lab is None for lab in labs) or any(lab.axes != labs[0].axes or
                                               lab.atoms.shape != labs[0].atoms.shape for lab in labs):
        for lab in labs:
            w.freeze(lab, f"Concat {node.name!r} mixes channels of different layouts")
        return
    for lab in labs[1:]:
        w.union_labels(labs[0], lab)
    w.set(out, labs[0])


def _split_sizes(w: Walker, node: gs.Node, axis_len: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in v]
    if "split" in node.attrs:
        return [int(x) for x in node.attrs["split"]]
    n = len(node.outputs)
    if "num_outputs" in node.attrs or axis_len % n == 0:
        step = -(-axis_len // n)
        sizes = [step] * (n - 1) + [axis_len - step * (n - 1)]
        return sizes
    return None


@rule("Split")
def _split(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze(lab, f"Split {node.name!r}: rank unknown")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), r)
    if axis not in lab.axes:
        for o in node.outputs:
            w.set(o, lab)
        return
    if not lab.single:
        w.freeze(lab, f"Split {node.name!r} splits multi-axis channels")
        return
    sizes = _split_sizes(w, node, lab.atoms.shape[0])
    if sizes is None or sum(sizes) != lab.atoms.shape[0]:
        w.freeze(lab, f"Split {node.name!r}: split sizes not constant")
        return
    offs = np.cumsum([0] + sizes)
    for o, a, b in zip(node.outputs, offs[:-1], offs[1:]):
        w.set(o, Label((axis,), lab.atoms[a:b]))

    outs = list(node.outputs)

    def fix_sizes(kept: Kept, node=node, outs=outs, axis=axis):
        sizes = [len(kept[o.name][axis]) for o in outs]
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(node.name + "_split_pruned", np.asarray(sizes, dtype=np.int64))
        elif "split" in node.attrs:
            node.attrs["split"] = sizes
        elif len(set(sizes)) != 1:
            node.inputs.append(gs.Constant(node.name + "_split_pruned", np.asarray(sizes, dtype=np.int64)))
            node.attrs.pop("num_outputs", None)
    w.fixups.append((node, fix_sizes))


@rule("Slice")
def _slice(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    starts, ends, axes, steps = (_optional_const(node, i) for i in range(1, 5))
    if starts is None or ends is None or r is None or \
            (_has_input(node, 3) and axes is None) or (_has_input(node, 4) and steps is None):
        w.freeze(lab, f"Slice {node.name!r}: non-constant parameters")
        return
    axes = [_norm_axis(int(a), r) for a in (axes if axes is not None else range(len(starts)))]
    steps = [int(s) for s in (steps if steps is not None else [1] * len(starts))]
    touched = [i for i, a in enumerate(axes) if a in lab.axes]
    if not touched:
        w.set(node.outputs[0], lab)
        return
    if not lab.single or len(touched) != 1 or steps[touched[0]] != 1:
        w.freeze(lab, f"Slice {node.name!r} slices channels with a step or on several axes")
        return
    i = touched[0]
    n = lab.atoms.shape[0]
    s, e, _ = slice(int(starts[i]), int(ends[i])).indices(n)
    w.set(node.outputs[0], Label(lab.axes, lab.atoms[s:e]))
    src = node.inputs[0]

    def fix(kept: Kept, node=node, i=i, s=s, e=e, src=src, axis=lab.axes[0]):
        idx = kept[src.name][axis]
        new_s = int(np.searchsorted(idx, s))
        new_e = int(np.searchsorted(idx, e))
        st = np.array(const_value(node.inputs[1]), dtype=np.int64).copy()
        en = np.array(const_value(node.inputs[2]), dtype=np.int64).copy()
        st[i], en[i] = new_s, new_e
        node.inputs[1] = gs.Constant(node.name + "_starts_pruned", st)
        node.inputs[2] = gs.Constant(node.name + "_ends_pruned", en)
    w.fixups.append((node, fix))


@rule("Transpose")
def _transpose(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    perm = list(node.attrs.get("perm", list(range(r - 1, -1, -1)) if r else []))
    if not perm:
        w.freeze(lab, f"Transpose {node.name!r}: rank unknown")
        return
    new_axes = [perm.index(a) for a in lab.axes]
    order = np.argsort(new_axes)
    w.set(node.outputs[0], Label(tuple(sorted(new_axes)), np.transpose(lab.atoms, order)))


def _has_input(node: gs.Node, i: int) -> bool:
    """Whether optional input `i` is given (absent, or an empty name, means not given)."""
    return len(node.inputs) > i and bool(node.inputs[i].name)


def _optional_const(node: gs.Node, i: int) -> np.ndarray | None:
    """Value of optional input `i` when given and constant, else None."""
    return const_value(node.inputs[i]) if _has_input(node, i) else None


def _axes_param(w: Walker, node: gs.Node) -> list[int] | None:
    if _has_input(node, 1):
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in np.ravel(v)]
    a = node.attrs.get("axes")
    return None if a is None else [int(x) for x in a]


@rule("Squeeze", "Unsqueeze", "Flatten", "Reshape")
def _reshape_like(w: Walker, node: gs.Node) -> None:
    """Any shape change: map channel axes by matching prefix products of the two shapes."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    sin, sout = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    if sin is None or sout is None:
        w.freeze(lab, f"{node.op} {node.name!r}: shapes unknown")
        return
    mapped = _map_reshape(lab, sin, sout, w, node)
    if mapped is None:
        w.freeze(lab, f"{node.op} {node.name!r} reshapes channels in a way prunec does not follow")
        return
    w.set(node.outputs[0], mapped)
    if node.op == "Reshape":
        src, dst = node.inputs[0], node.outputs[0]

        sin_ = sin
        pieces = _shape_pieces(w, node.inputs[1])
        if pieces is None or any(_piece_at(pieces, a) is None for a in mapped.axes):
            why = f"Reshape {node.name!r}: the channel dims of its shape are computed at run time"
            w.freeze(lab, why)
            w.freeze(mapped, why)
            return

        def fix(kept: Kept, node=node, src=src, dst=dst, sout=sout, sin_=sin_, pieces=pieces,
                graph=w.graph):
            new = _new_shape(kept, dst.name, sout)
            new_in = _new_shape(kept, src.name, sin_)
            values = []
            for t, offset, value in pieces:
                if value is None:
                    values.append(None)  # a run-time piece (the batch): checked not to hold channels
                    continue
                value = value.copy()
                for j, v in enumerate(value):
                    i = offset + j
                    if v == -1 or new[i] == sout[i]:
                        continue
                    if v == 0 and not node.attrs.get("allowzero", 0) and i < len(new_in) \
                            and new_in[i] == new[i]:
                        continue  # 0 copies the input dim, which is already the new size
                    value[j] = new[i]
                values.append(value)
            if any(v is not None and not np.array_equal(v, p[2]) for v, p in zip(values, pieces)):
                _set_shape_input(graph, node, pieces, values)
        w.fixups.append((node, fix))


def _shape_pieces(w: Walker, t: gs.Tensor) -> list[tuple[gs.Tensor, int, np.ndarray | None]] | None:
    """A shape vector as pieces (tensor, offset, constant value or None): one constant, or a
    Concat of 1-D constants and run-time pieces (exporters build `[N, C, H*W]` that way)."""
    v = const_value(t)
    if v is not None:
        return [(t, 0, np.asarray(v, dtype=np.int64).ravel())]
    if len(t.inputs) != 1 or t.inputs[0].op != "Concat":
        return None
    pieces, offset = [], 0
    for p in t.inputs[0].inputs:
        pv = const_value(p)
        if pv is not None:
            pv = np.asarray(pv, dtype=np.int64).ravel()
            pieces.append((p, offset, pv))
            offset += pv.size
        elif w.shape(p) is not None and len(w.shape(p)) == 1:
            pieces.append((p, offset, None))
            offset += w.shape(p)[0]
        else:
            return None
    return pieces


def _piece_at(pieces, index: int):
    """The constant value of the piece holding shape entry `index` (None: a run-time piece)."""
    for k, (t, offset, value) in enumerate(pieces):
        end = pieces[k + 1][1] if k + 1 < len(pieces) else float("inf")
        if offset <= index < end:
            return value
    return None


def _set_shape_input(graph: gs.Graph, node: gs.Node, pieces, values: list) -> None:
    """Give `node` a new shape input built from `values` (None keeps a run-time piece).

    A fresh Concat is built rather than editing the old one, which other nodes may share.
    """
    if len(pieces) == 1 and values[0] is not None:
        node.inputs[1] = gs.Constant(f"{node.name}_shape_pruned", values[0].astype(np.int64))
        return
    parts = [gs.Constant(f"{node.name}_shape{k}_pruned", v.astype(np.int64)) if v is not None else t
             for k, ((t, _, _), v) in enumerate(zip(pieces, values))]
    out = gs.Variable(f"{node.name}_shape_pruned", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", f"{node.name}_shape_concat_pruned", attrs={"axis": 0},
                               inputs=parts, outputs=[out]))
    node.inputs[1] = out


def _new_shape(kept: Kept, name: str, old_shape: tuple) -> list[int]:
    """A tensor's shape after removal: kept counts on its channel axes, old dims elsewhere."""
    new = list(old_shape)
    for ax, idx in kept.get(name, {}).items():
        new[ax] = len(idx)
    return new


def _map_reshape(lab: Label, sin: tuple, sout: tuple, w: Walker, node: gs.Node) -> Label | None:
    """Map a label through a reshape; None when the channel structure cannot be followed.

    The full atom pattern of the input (broadcast over non-channel axes) is reshaped to the
    output; the output's channel axes are those along which atoms vary. The mapping is kept
    only when removal stays rectangular: each output channel axis must either carry whole
    channels (repeated over merged spatial positions: Flatten->Gemm) or be a split of one input
    channel axis whose columns we couple (channel shuffle, head split).
    """
    if prod(sin) != prod(sout) or prod(sin) > 50_000_000:
        return None
    full = np.broadcast_to(_expand(lab, sin), sin).reshape(sout)
    varying = tuple(a for a in range(len(sout)) if not _constant_along(full, a))
    if not varying:
        return None
    sub = full[tuple(slice(None) if a in varying else 0 for a in range(len(sout)))]
    if len(varying) == 1:
        return Label(varying, np.ascontiguousarray(sub))
    if len(varying) == 2 and varying[1] == varying[0] + 1 and lab.single:
        # A channel axis split in two (rows x cols): couple each column so removal is rectangular.
        for j in range(sub.shape[1]):
            for i in range(1, sub.shape[0]):
                w.uf.union(sub[0, j], sub[i, j])
        return Label(varying, np.ascontiguousarray(sub))
    return None


def _expand(lab: Label, shape: tuple) -> np.ndarray:
    """The label's atoms laid out at full rank, with size-1 dims on non-channel axes."""
    view_shape = [1] * len(shape)
    order = np.argsort(lab.axes)
    atoms = np.transpose(lab.atoms, order) if len(lab.axes) > 1 else lab.atoms
    for a, n in zip(sorted(lab.axes), atoms.shape):
        view_shape[a] = n
    return atoms.reshape(view_shape)


def _constant_along(a: np.ndarray, axis: int) -> bool:
    if a.shape[axis] == 1:
        return True
    first = np.take(a, [0], axis=axis)
    return bool(np.all(a == first))


@rule("Resize", "Upsample")
def _resize(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    sin, sout = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    if sin is None or sout is None or any(sin[a] != sout[a] for a in lab.axes):
        w.freeze(lab, f"{node.op} {node.name!r} resizes the channel axis")
        return
    w.set(node.outputs[0], lab)
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        if const_value(node.inputs[3]) is None:
            w.freeze(lab, f"Resize {node.name!r}: sizes computed at run time")
            return
        dst = node.outputs[0]

        def fix(kept: Kept, node=node, dst=dst):
            sizes = np.array(const_value(node.inputs[3]), dtype=np.int64).copy()
            for ax, idx in kept.get(dst.name, {}).items():
                sizes[ax] = len(idx)
            node.inputs[3] = gs.Constant(node.name + "_sizes_pruned", sizes)
        w.fixups.append((node, fix))


@rule("Pad")
def _pad(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    r = w.rank(node.inputs[0])
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name \
        else node.attrs.get("pads")
    if pads is None or r is None:
        w.freeze(lab, f"Pad {node.name!r}: pads not constant")
        return
    pads = np.ravel(pads)
    axes = _axes_param_pad(node, r)
    for a in lab.axes:
        if a in axes:
            i = axes.index(a)
            if pads[i] != 0 or pads[i + len(axes)] != 0:
                w.freeze(lab, f"Pad {node.name!r} pads the channel axis")
                return
    w.set(node.outputs[0], lab)


def _axes_param_pad(node: gs.Node, r: int) -> list[int]:
    v = _optional_const(node, 3)
    if v is not None:
        return [_norm_axis(int(a), r) for a in np.ravel(v)]
    return list(range(r))


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
    axes = _axes_param(w, node)
    if axes is None:
        if len(node.inputs) > 1 and node.inputs[1].name or not node.attrs.get("noop_with_empty_axes", 0):
            axes = list(range(r)) if not (len(node.inputs) > 1 and node.inputs[1].name) else None
    if axes is None:
        w.freeze(lab, f"{node.op} {node.name!r}: axes not constant")
        return
    axes = sorted(_norm_axis(a, r) for a in axes)
    if set(axes) & set(lab.axes):
        w.freeze(lab, f"{node.op} {node.name!r} reduces over the channel axis")
        return
    if node.attrs.get("keepdims", 1):
        w.set(node.outputs[0], lab)
    else:
        w.set(node.outputs[0], Label(tuple(a - sum(x < a for x in axes) for a in lab.axes), lab.atoms))


@rule("Shape", "Size")
def _shape_of(w: Walker, node: gs.Node) -> None:
    """Reading a shape is fine: downstream shape arithmetic sees the pruned shape at run time."""
