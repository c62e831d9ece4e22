"""Channel rules for ops that move data without mixing channels: Concat, Split, Slice,
Transpose, Reshape-like ops, Resize, Pad. Channels are lists of atoms; these ops cut, join and
permute the lists, and their fix-ups rewrite split sizes, slice bounds and shape vectors."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept, Label, Walker, rule
from prunec.graph.fold import const_value
from prunec.graph.rules.common import has_input, norm_axis, optional_const


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
    axis = norm_axis(int(node.attrs["axis"]), r)
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
    axis = norm_axis(int(node.attrs.get("axis", 0)), r)
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
    # Split takes its sizes as an attribute before opset 13 and as an input from 13 on.
    sizes_as_input = (w.opsets.get("") or 13) >= 13

    def fix_sizes(kept: Kept, node=node, outs=outs, axis=axis):
        sizes = [len(kept[o.name][axis]) for o in outs]
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(node.name + "_split_pruned", np.asarray(sizes, dtype=np.int64))
        elif "split" in node.attrs or (not sizes_as_input and len(set(sizes)) != 1):
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
    starts, ends, axes, steps = (optional_const(node, i) for i in range(1, 5))
    if starts is None or ends is None or r is None or \
            (has_input(node, 3) and axes is None) or (has_input(node, 4) and steps is None):
        w.freeze(lab, f"Slice {node.name!r}: non-constant parameters")
        return
    axes = [norm_axis(int(a), r) for a in (axes if axes is not None else range(len(starts)))]
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
    v = optional_const(node, 3)
    if v is not None:
        return [norm_axis(int(a), r) for a in np.ravel(v)]
    return list(range(r))
