"""Channel rules for ops that index, repeat or rearrange along axes: Gather, GatherElements, Tile,
DepthToSpace/SpaceToDepth, CumSum, TopK, ArgMax/ArgMin, Einsum. (Expand reads its target shape
like Reshape does, so its rule is in `shape_ops`.)

On an axis that carries no channels these ops pass channels through (moving the channel axis
where the op changes the rank). On the channel axis they either map channels exactly (Tile and
SpaceToDepth repeat them, DepthToSpace folds blocks of them into one) or they freeze them:
picking a channel by index, accumulating or ranking across channels all change meaning when a
channel disappears.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Label, Walker, rule
from prunec.graph.fold import const_value
from prunec.graph.rules.common import norm_axis, optional_const
from prunec.graph.rules.embeddings import embedding_lookup


def _axis(node: gs.Node, w: Walker, t: gs.Tensor, default: int = 0) -> int | None:
    r = w.rank(t)
    return None if r is None else norm_axis(int(node.attrs.get("axis", default)), r)


@rule("Gather")
def _gather(w: Walker, node: gs.Node) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    lab, il = w.label(data), w.label(idx)
    if il is not None:
        w.freeze(il, f"Gather {node.name!r} uses channels as indices")
    if lab is None:
        embedding_lookup(w, node)  # a constant table's columns are channels (token embeddings)
        return
    axis = _axis(node, w, data)
    ri = w.rank(idx)
    if axis is None or ri is None:
        w.freeze(lab, f"Gather {node.name!r}: rank unknown")
        return
    if axis in lab.axes:
        w.freeze(lab, f"Gather {node.name!r} picks channels by index")
        return
    # Output = data dims before axis, then the index dims, then data dims after axis.
    w.set(node.outputs[0], Label(tuple(a if a < axis else a + ri - 1 for a in lab.axes), lab.atoms))


@rule("GatherElements")
def _gather_elements(w: Walker, node: gs.Node) -> None:
    """out[.., j, ..] reads data[.., j, ..] on every axis but `axis`: a channel axis other than
    `axis` passes through, with the indices sliced alongside (constant) or united (labeled)."""
    data, idx = node.inputs[0], node.inputs[1]
    lab, il = w.label(data), w.label(idx)
    if lab is None:
        if il is not None:
            w.freeze(il, f"GatherElements {node.name!r}: indices carry channels the data does not")
        return
    axis = _axis(node, w, data)
    s_idx = w.shape(idx)
    if axis is None or s_idx is None or axis in lab.axes or not lab.single:
        w.freeze(lab, f"GatherElements {node.name!r} gathers along the channel axis")
        w.freeze(il, f"GatherElements {node.name!r} gathers along the channel axis")
        return
    ax, n = lab.axes[0], lab.atoms.shape[0]
    if s_idx[ax] != n:
        w.freeze(lab, f"GatherElements {node.name!r}: indices cover only part of the channels")
        w.freeze(il, f"GatherElements {node.name!r}: indices cover only part of the channels")
        return
    if il is not None:
        if il.axes != lab.axes or il.atoms.shape != lab.atoms.shape:
            w.freeze(lab, f"GatherElements {node.name!r}: indices carry channels on another axis")
            w.freeze(il, f"GatherElements {node.name!r}: indices carry channels on another axis")
            return
        w.union_labels(lab, il)
    elif isinstance(idx, gs.Constant):
        w.site(node, idx, ax, lab.atoms, "attached")
    else:
        w.freeze(lab, f"GatherElements {node.name!r}: run-time indices over the channels")
        return
    w.set(node.outputs[0], lab)


@rule("Tile")
def _tile(w: Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    reps = const_value(node.inputs[1])
    if reps is None or not lab.single:
        w.freeze(lab, f"Tile {node.name!r}: repeats computed at run time")
        return
    k = int(np.ravel(reps)[lab.axes[0]])
    # Tiling k times concatenates k copies: channel i sits at i, n+i, 2n+i, ...
    w.set(node.outputs[0], Label(lab.axes, np.tile(lab.atoms, k)))


@rule("DepthToSpace")
def _depth_to_space(w: Walker, node: gs.Node) -> None:
    """Input channel (block k, c) becomes output channel c at block position k: one output
    channel is a block of b*b input channels (DCR: k*C'+c; CRD: c*b*b+k), removed together."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    b2 = int(node.attrs["blocksize"]) ** 2
    if lab.axes != (1,) or lab.atoms.shape[0] % b2:
        w.freeze(lab, f"DepthToSpace {node.name!r}: channels on an unexpected axis")
        return
    blocks = lab.atoms.reshape(b2, -1) if node.attrs.get("mode", "DCR") == "DCR" \
        else lab.atoms.reshape(-1, b2).T
    for k in range(1, b2):
        for a, b in zip(blocks[0], blocks[k]):
            w.uf.union(int(a), int(b))
    w.set(node.outputs[0], Label((1,), blocks[0].copy()))


@rule("SpaceToDepth")
def _space_to_depth(w: Walker, node: gs.Node) -> None:
    """Output channel k*C + c is input channel c at block position k: channels repeat b*b times."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    if lab.axes != (1,):
        w.freeze(lab, f"SpaceToDepth {node.name!r}: channels on an unexpected axis")
        return
    b2 = int(node.attrs["blocksize"]) ** 2
    w.set(node.outputs[0], Label((1,), np.tile(lab.atoms, b2)))


def _along_axis_rule(what: str, axis_of):
    """Ops that work along one axis (accumulate, rank, pick the best): channels on that axis
    freeze, channels elsewhere pass to every output (moved if the axis is dropped)."""

    def apply(w: Walker, node: gs.Node) -> None:
        lab = w.label(node.inputs[0])
        if lab is None:
            return
        r = w.rank(node.inputs[0])
        axis = axis_of(node)
        if r is None or axis is None:
            w.freeze(lab, f"{node.op} {node.name!r}: axis not constant")
            return
        axis = norm_axis(axis, r)
        if axis in lab.axes:
            w.freeze(lab, f"{node.op} {node.name!r} {what} across the channel axis")
            return
        out = lab
        if node.op in ("ArgMax", "ArgMin") and not node.attrs.get("keepdims", 1):
            out = Label(tuple(a - (a > axis) for a in lab.axes), lab.atoms)
        for o in node.outputs:
            w.set(o, out)
    return apply


def _cumsum_axis(node: gs.Node) -> int | None:
    v = optional_const(node, 1)
    return None if v is None else int(np.ravel(v)[0])


rule("CumSum")(_along_axis_rule("accumulates", _cumsum_axis))
rule("TopK")(_along_axis_rule("ranks values", lambda n: int(n.attrs.get("axis", -1))))
rule("ArgMax", "ArgMin")(_along_axis_rule("picks the extreme", lambda n: int(n.attrs.get("axis", 0))))


# -- Einsum ------------------------------------------------------------------------------------


def _einsum_terms(eq: str, n_inputs: int) -> tuple[list[str], str] | None:
    """Input subscripts and output subscript of an explicit equation without an ellipsis."""
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != n_inputs or any(len(set(t)) != len(t) for t in terms):
        return None
    return terms, out


@rule("Einsum")
def _einsum(w: Walker, node: gs.Node) -> None:
    """Each channel axis is a letter. A letter kept in the output passes its channels through;
    the same letter labeled in two operands unites them; a contracted letter is read: a constant
    operand holding it is a consumer weight sliced along that letter."""
    labs = [w.label(t) for t in node.inputs]
    if all(lab is None for lab in labs):
        return
    why = f"Einsum {node.name!r}: equation prunec does not follow"
    parsed = _einsum_terms(str(node.attrs.get("equation", "")), len(node.inputs))
    if parsed is None or any(lab is not None and not lab.single for lab in labs):
        for lab in labs:
            w.freeze(lab, why)
        return
    terms, out_term = parsed
    by_letter: dict[str, Label] = {}
    for t, term, lab in zip(node.inputs, terms, labs):
        if lab is None:
            continue
        letter = term[lab.axes[0]]
        if letter in by_letter:
            prev = by_letter[letter]
            if prev.atoms.shape != lab.atoms.shape:
                w.freeze(prev, why)
                w.freeze(lab, why)
                continue
            w.union_labels(prev, lab)
        else:
            by_letter[letter] = lab
    kept_letters = [k for k in by_letter if k in out_term]
    if len(kept_letters) > 1:  # one label per tensor: channels on two output axes are not followed
        for k in kept_letters:
            w.freeze(by_letter.pop(k), why)
    if not any(k in out_term for k in by_letter):
        w.no_channels(node.outputs[0])  # every labeled letter is summed over
    for letter, lab in by_letter.items():
        contracted = letter not in out_term
        holders = [i for i, (t, term) in enumerate(zip(node.inputs, terms))
                   if letter in term and w.label(t) is not None]
        if contracted and len(holders) > 1:
            # Two activations summed over this letter (attention written as Einsum): where a
            # removed channel meets kept values, like MatMul's Q·Kᵀ.
            t = node.inputs[holders[0]]
            w.contraction(node, holders[0], len(terms[holders[0]]), Label(w.label(t).axes, w.label(t).atoms))
        for t, term in zip(node.inputs, terms):
            if letter not in term or w.label(t) is not None:
                continue
            s = w.shape(t)
            ax = term.index(letter)
            if s is not None and s[ax] == 1:
                continue  # broadcast along the channels
            if isinstance(t, gs.Constant) and s is not None and s[ax] == lab.atoms.shape[0]:
                w.site(node, t, ax, lab.atoms, "consumer" if contracted else "attached")
                continue
            w.freeze(lab, f"Einsum {node.name!r} combines channels with a run-time operand {t.name!r}")
            break
        else:
            if not contracted:
                w.set(node.outputs[0], Label((out_term.index(letter),), lab.atoms))
