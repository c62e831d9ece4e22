"""Channel rules for ops that move data without mixing channels: Concat, Split, Slice,
Transpose, Reshape-like ops, Resize, Pad. Channels are lists of atoms; these ops cut, join and
permute the lists, and their fix-ups rewrite split sizes, slice bounds and shape vectors."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept, Label, Walker, rule
from prunec.graph.fold import const_value
from prunec.graph.rules.common import fresh_name, has_input, norm_axis, optional_const


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
    ref = next(lab for lab in labs if lab is not None)
    if any(lab is not None and lab.axes != ref.axes for lab in labs):
        for lab in labs:
            w.freeze(lab, f"Concat {node.name!r} mixes channels of different layouts")
        return
    if axis in ref.axes:
        # Pieces of a multi-axis label joined along one of its axes (rotary embeddings rebuild
        # a head's head_dim from two halves): the atoms are concatenated along that axis.
        k = ref.axes.index(axis)
        other = [n for i, n in enumerate(ref.atoms.shape) if i != k]
        if any(lab is None or [n for i, n in enumerate(lab.atoms.shape) if i != k] != other for lab in labs):
            for lab in labs:
                w.freeze(lab, f"Concat {node.name!r} mixes channels of different layouts")
            return
        w.set(out, Label(ref.axes, np.concatenate([lab.atoms for lab in labs], axis=k)))
        return
    # Concatenation along another axis: the channel axes of all inputs are joined. A graph
    # input among them (a KV cache before the new keys) carries the same channels: it is part
    # of the model's interface.
    for i, t in enumerate(node.inputs):
        if labs[i] is None:
            labs[i] = w.adopt_interface(t, ref, f"graph input {t.name!r} carries them (Concat {node.name!r})") \
                or _adopt_constant(w, node, t, ref)
    if any(lab is None or lab.atoms.shape != ref.atoms.shape for lab in labs):
        for lab in labs:
            w.freeze(lab, f"Concat {node.name!r} mixes channels of different layouts")
        return
    for lab in labs:
        if lab is not ref:
            w.union_labels(ref, lab)
    w.set(out, ref)


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

    def fix_sizes(kept: Kept, node=node, outs=outs, axis=axis, graph=w.graph):
        sizes = [len(kept[o.name][axis]) for o in outs]
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(fresh_name(graph, node.name + "_split_pruned"), np.asarray(sizes, dtype=np.int64))
        elif "split" in node.attrs or (not sizes_as_input and len(set(sizes)) != 1):
            node.attrs["split"] = sizes
        elif len(set(sizes)) != 1:
            node.inputs.append(gs.Constant(fresh_name(graph, node.name + "_split_pruned"), np.asarray(sizes, dtype=np.int64)))
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
    if len(touched) != 1 or steps[touched[0]] != 1:
        w.freeze(lab, f"Slice {node.name!r} slices channels with a step or on several axes")
        return
    i = touched[0]
    k = lab.axes.index(axes[i])
    n = lab.atoms.shape[k]
    s, e, _ = slice(int(starts[i]), int(ends[i])).indices(n)
    w.set(node.outputs[0], Label(lab.axes, np.take(lab.atoms, np.arange(s, e), axis=k)))
    src = node.inputs[0]

    def fix(kept: Kept, node=node, i=i, s=s, e=e, src=src, axis=axes[i], graph=w.graph):
        idx = kept[src.name][axis]
        new_s = int(np.searchsorted(idx, s))
        new_e = int(np.searchsorted(idx, e))
        st = np.array(const_value(node.inputs[1]), dtype=np.int64).copy()
        en = np.array(const_value(node.inputs[2]), dtype=np.int64).copy()
        st[i], en[i] = new_s, new_e
        node.inputs[1] = gs.Constant(fresh_name(graph, node.name + "_starts_pruned"), st)
        node.inputs[2] = gs.Constant(fresh_name(graph, node.name + "_ends_pruned"), en)
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
        if pieces is None or any(_piece_at(pieces, a) is None and not _follows_channels(w, pieces, a, mapped)
                                 for a in mapped.axes):
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
    if len(t.inputs) == 1 and t.inputs[0].op == "Reshape" and w.rank(t.inputs[0].inputs[0]) == 1:
        t = t.inputs[0].inputs[0]  # a 1-D vector reshaped to [-1]: the same vector
    inner = _unguarded(t)
    if inner is not None:
        # -1 there becomes 1; a rewrite builds the vector from the pieces, without the guard.
        pieces = _shape_pieces(w, inner)
        return None if pieces is None else [(p, o, None if v is None else np.where(v == -1, 1, v))
                                            for p, o, v in pieces]
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


def _adopt_constant(w: Walker, node: gs.Node, t: gs.Tensor, like: Label) -> Label | None:
    """A constant joined with channels (a ViT's class token, `cls.expand(B, -1, -1)`
    concatenated before the patches): its entries along the channel axis belong to those
    channels, so they are attached to them. `t` is the constant, or an Expand of it whose
    target keeps the channel axis (1 there, or the same size, rewritten to 1)."""
    r = w.rank(t)
    if not like.single or r is None:
        return None
    ax, n = like.axes[0], like.atoms.shape[0]
    expand = t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == "Expand" else None
    c = expand.inputs[0] if expand is not None else t
    if not isinstance(c, gs.Constant) or c.values.ndim > r:
        return None
    c_ax = ax - (r - c.values.ndim)
    if c_ax < 0 or c.values.shape[c_ax] != n:
        return None
    if expand is not None:
        pieces, length = _shape_pieces(w, expand.inputs[1]), w.shape(expand.inputs[1])
        if pieces is None or length is None or ax - (r - length[0]) < 0:
            return None
        j = ax - (r - length[0])
        value = _piece_at(pieces, j)
        if value is None:
            return None
        k = next(p for p in pieces if p[2] is value)
        if int(value[j - k[1]]) not in (1, n):
            return None
        if int(value[j - k[1]]) != 1:
            def fix(kept: Kept, node=expand, pieces=pieces, j=j, graph=w.graph):
                values = [None if v is None else v.copy() for _, _, v in pieces]
                for (_, off, v), nv in zip(pieces, values):
                    if nv is not None and off <= j < off + len(nv):
                        nv[j - off] = 1
                _set_shape_input(graph, node, pieces, values)
            w.fixups.append((expand, fix))
    lab = Label(like.axes, w.uf.make(n))
    w.site(expand or node, c, c_ax, lab.atoms, "attached")
    w.set(t, lab)
    return lab


def _follows_channels(w: Walker, pieces, index: int, mapped: Label) -> bool:
    """Whether run-time shape entry `index` reads the size of a tensor axis that carries the
    same channels as `mapped` there (`flatten(2)` writes `Concat(Shape(x)[0:2], [-1])`): it
    then yields the pruned size by itself and needs no rewrite."""
    for k, (t, offset, value) in enumerate(pieces):
        end = pieces[k + 1][1] if k + 1 < len(pieces) else float("inf")
        if offset <= index < end and value is None:
            src = _shape_source(w, t)
            if src is None or index - offset >= len(src):
                return False
            x, ax = src[index - offset]
            lab = w.label(x)
            return mapped.single and lab is not None and lab.axes == (ax,) and \
                np.array_equal(lab.atoms, mapped.atoms)
    return False


def _shape_source(w: Walker, t: gs.Tensor) -> list[tuple[gs.Tensor, int]] | None:
    """For a shape vector read at run time, the (tensor, axis) each entry is the size of:
    `Shape(x)` (with start/end), a constant `Slice` of it, `Gather(Shape(x), i)` and its
    `Unsqueeze`. None for anything else (arithmetic on sizes)."""
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op == "Shape":
        r = w.rank(node.inputs[0])
        if r is None:
            return None
        axes = list(range(r))[slice(node.attrs.get("start", 0), node.attrs.get("end", r))]
        return [(node.inputs[0], a) for a in axes]
    if node.op in ("Slice", "Gather", "Unsqueeze"):
        inner = _shape_source(w, node.inputs[0])
        if inner is None:
            return None
        if node.op == "Unsqueeze":
            return inner if len(inner) == 1 else None
        if node.op == "Gather":
            idx = const_value(node.inputs[1])
            return None if idx is None or node.attrs.get("axis", 0) != 0 else \
                [inner[int(i)] for i in np.ravel(idx)]
        starts, ends = optional_const(node, 1), optional_const(node, 2)
        axes, steps = optional_const(node, 3), optional_const(node, 4)
        if starts is None or ends is None or (axes is not None and int(np.ravel(axes)[0]) != 0) or \
                (steps is not None and int(np.ravel(steps)[0]) != 1):
            return None
        return inner[slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]))]
    return None


def _unguarded(t: gs.Tensor) -> gs.Tensor | None:
    """`s` when `t` is `Where(Equal(s, -1), ones, s)`: torch's legacy exporter guards every
    expand size that way (`-1` keeps a dim). It equals `s` wherever `s` is not -1, so the
    constant entries a rule reads and rewrites are those of `s`."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Where":
        return None
    cond, _, s = t.inputs[0].inputs
    if len(cond.inputs) != 1 or cond.inputs[0].op != "Equal":
        return None
    a, b = cond.inputs[0].inputs
    c = const_value(b)
    if a is not s or c is None or not np.all(c == -1):
        return None
    return s


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
        node.inputs[1] = gs.Constant(fresh_name(graph, f"{node.name}_shape_pruned"), values[0].astype(np.int64))
        return
    parts = [gs.Constant(fresh_name(graph, f"{node.name}_shape{k}_pruned"), v.astype(np.int64))
             if v is not None else t
             for k, ((t, _, _), v) in enumerate(zip(pieces, values))]
    out = gs.Variable(fresh_name(graph, f"{node.name}_shape_pruned"), dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", fresh_name(graph, f"{node.name}_shape_concat_pruned"), attrs={"axis": 0},
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
    channels (repeated over merged spatial positions: Flatten->Gemm) or be one of two axes whose
    columns (or rows, in heads mode) we couple (channel shuffle, head split).
    """
    if prod(sin) != prod(sout) or prod(sin) > 50_000_000:
        return None
    # Trailing dims both shapes share and that carry no channels (a shuffle's H, W) reshape as
    # themselves, and the atoms are constant along them: laid out at size 1 they give the same
    # varying axes and the same label, without materializing every spatial position.
    k = 0
    while k < min(len(sin), len(sout)) - 1 and sin[-1 - k] == sout[-1 - k] and len(sin) - 1 - k not in lab.axes:
        k += 1
    red_in = tuple(sin[:len(sin) - k]) + (1,) * k
    red_out = tuple(sout[:len(sout) - k]) + (1,) * k
    full = np.broadcast_to(_expand(lab, sin), red_in).reshape(red_out)
    varying = tuple(a for a in range(len(sout)) if not _constant_along(full, a))
    if not varying:
        return None
    sub = full[tuple(slice(None) if a in varying else 0 for a in range(len(sout)))]
    if len(varying) == 1:
        return Label(varying, np.ascontiguousarray(sub))
    if len(varying) == 2:
        # A channel axis split in two (rows x cols: a shuffle's groups, attention's heads x
        # head_dim), or such a split carried on (grouped-query attention repeating each KV
        # head): couple columns (or rows, for heads) so removal stays rectangular.
        w.couple_split(sub)
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

        def fix(kept: Kept, node=node, dst=dst, graph=w.graph):
            sizes = np.array(const_value(node.inputs[3]), dtype=np.int64).copy()
            for ax, idx in kept.get(dst.name, {}).items():
                sizes[ax] = len(idx)
            node.inputs[3] = gs.Constant(fresh_name(graph, node.name + "_sizes_pruned"), sizes)
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


@rule("Expand")
def _expand_rule(w: Walker, node: gs.Node) -> None:
    """Broadcast along axes without channels (grouped-query attention repeats each KV head:
    [B, kv, 1, S, d] -> [B, kv, rep, S, d]). The target shape may be assembled at run time
    (batch, sequence) as long as its entries on channel axes are constants."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    r_in, r_out = w.rank(node.inputs[0]), w.rank(node.outputs[0])
    pieces = _shape_pieces(w, node.inputs[1])
    if pieces is None or r_in is None or r_out is None:
        w.freeze(lab, f"Expand {node.name!r}: target shape unknown")
        return
    length = w.shape(node.inputs[1])[0] if w.shape(node.inputs[1]) else None
    if length is None:
        w.freeze(lab, f"Expand {node.name!r}: target shape unknown")
        return
    out_axes = tuple(a + r_out - r_in for a in lab.axes)
    entries = []
    for a, n in zip(out_axes, lab.atoms.shape):
        j = a - (r_out - length)
        if j < 0:
            continue
        value = _piece_at(pieces, j)
        if value is None:
            w.freeze(lab, f"Expand {node.name!r}: its size on the channel axis is computed at run time")
            return
        k = next(p for p in pieces if p[2] is value)
        v = int(value[j - k[1]])
        if v not in (1, n):
            w.freeze(lab, f"Expand {node.name!r} broadcasts the channel axis")
            return
        entries.append(j)
    w.set(node.outputs[0], Label(out_axes, lab.atoms))
    if not entries:
        return

    def fix(kept: Kept, node=node, pieces=pieces, entries=entries, graph=w.graph):
        # 1 on a channel axis keeps the input's (pruned) size.
        values = []
        for t, offset, value in pieces:
            if value is None:
                values.append(None)
                continue
            value = value.copy()
            for j in entries:
                if offset <= j < offset + len(value):
                    value[j - offset] = 1
            values.append(value)
        _set_shape_input(graph, node, pieces, values)
    w.fixups.append((node, fix))
