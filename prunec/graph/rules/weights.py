"""Channel rules for weight layers: Conv, ConvTranspose, Gemm, MatMul (constant weights make and
read channels; activation x activation MatMuls couple the contracted axis)."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept, Label, Walker, rule
from prunec.graph.rules.common import weight_shape


def _reads_and_writes(w: Walker, node: gs.Node, xl: Label | None, in_axis: int, in_len: int,
                      wt: gs.Constant, k_axis: int, n_axis: int, out_axis: int,
                      bias: gs.Constant | None = None) -> np.ndarray:
    """A weight layer reading channels along weight axis `k_axis` and writing fresh ones along
    `n_axis`: record the consumer and producer sites and label the output. Returns its atoms."""
    if xl is not None and (xl.axes != (in_axis,) or xl.atoms.shape[0] != in_len):
        w.freeze(xl, f"{node.op} {node.name!r} reads channels on an unexpected axis")
        xl = None
    out = w.fresh(node, int(weight_shape(wt)[n_axis]))
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
    W = weight_shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    xl = w.label(x)
    if W is None or (b is not None and weight_shape(b) is None):
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
                node.attrs["group"] = int(weight_shape(node.inputs[1])[0] // mult)
            w.fixups.append((node, fix))
        return
    if g == 1:
        _reads_and_writes(w, node, xl, 1, cin, wt, 1, 0, 1, b)
        return
    # Grouped: every group must keep the same count, so index j is coupled across groups.
    out_atoms = w.fresh(node, cout)
    cout_g = cout // g
    grid = out_atoms.reshape(g, cout_g)
    w.uf.union_many(np.broadcast_to(grid[0], grid[1:].shape), grid[1:])
    if xl is not None:
        ig = xl.atoms.reshape(g, cin_g)
        w.uf.union_many(np.broadcast_to(ig[0], ig[1:].shape), ig[1:])
        w.site(node, wt, 1, ig[0], "consumer")
    w.site(node, wt, 0, out_atoms, "producer")
    if b is not None:
        w.site(node, b, 0, out_atoms, "producer")
    w.set(node.outputs[0], Label((1,), out_atoms))


@rule("ConvTranspose")
def _conv_transpose(w: Walker, node: gs.Node) -> None:
    x, wt = node.inputs[0], node.inputs[1]
    W = weight_shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    g = int(node.attrs.get("group", 1))
    xl = w.label(x)
    if W is None or g != 1 or \
            (b is not None and weight_shape(b) is None) or "output_shape" in node.attrs:
        w.freeze_node(node, f"ConvTranspose {node.name!r}: only group=1 with constant weights is pruned")
        return
    _reads_and_writes(w, node, xl, 1, W[0], wt, 0, 1, 1, b)


@rule("Gemm")
def _gemm(w: Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    B = weight_shape(bt)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    al = w.label(a)
    if B is None or node.attrs.get("transA", 0) or \
            (c is not None and weight_shape(c) is None):
        w.freeze_node(node, f"Gemm {node.name!r}: transA or non-constant weight")
        return
    trans_b = int(node.attrs.get("transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    n = B[n_axis]
    out_atoms = _reads_and_writes(w, node, al, 1, B[k_axis], bt, k_axis, n_axis, 1)
    if c is not None:
        C = weight_shape(c)
        if len(C) >= 1 and C[-1] == n and prod(C[:-1]) == 1:
            w.site(node, c, len(C) - 1, out_atoms, "producer")
        elif prod(C) != 1:
            w.freeze(Label((1,), out_atoms), f"Gemm {node.name!r} bias is not per output feature")


@rule("MatMul")
def _matmul(w: Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    al, bl = w.label(a), w.label(bt)
    B = weight_shape(bt)
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
    contracted K axis, or the operand's own row/column axis. Labels holding K are united where
    they meet (broadcast over batch axes one side lacks); they reach the output only through
    batch axes along which every K position is one class (in heads mode, the heads of Q·Kᵀ).
    Labels without K flow to the output, united where they share batch axes (the heads of
    softmax(Q·Kᵀ)·V). Removing a head_dim class then removes the same index from Q and K in
    every head; removing a head class removes the head from Q, K, V and the scores.
    """
    out_rank = max(ra, rb)
    K = out_rank  # the contracted axis, placed past the output's axes in the common frame

    def roles(lab: Label, r: int, k_axis: int, own_axis: int):
        out = []
        for ax in lab.axes:
            if ax == k_axis:
                out.append(("K", K))
            elif ax == own_axis:
                out.append(("own", ax + out_rank - r))
            elif ax < r - 2:
                out.append(("batch", ax + out_rank - r))
            else:
                return None
        return out

    def framed(lab: Label, rl) -> Label:
        axes = [r[1] for r in rl]
        return Label(tuple(sorted(axes)), np.transpose(lab.atoms, np.argsort(axes)))

    ra_roles = roles(al, ra, ra - 1, ra - 2) if al is not None else None
    rb_roles = roles(bl, rb, rb - 2, rb - 1) if bl is not None else None
    why = f"MatMul {node.name!r} multiplies two tensors whose channels prunec cannot align"
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is not None and rl is None:
            w.freeze(lab, why)
    with_k, pieces = [], []
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is not None and rl is not None:
            (with_k if any(r[0] == "K" for r in rl) else pieces).append((lab, rl))
    if with_k:
        joined = None
        if len(with_k) == 2 and not any(r[0] == "own" for _, rl in with_k for r in rl):
            small, big = sorted((framed(lab, rl) for lab, rl in with_k), key=lambda x: len(x.axes))
            joined = big if w.union_broadcast(small, big) else None
        if joined is None:
            for lab, _ in with_k:
                w.freeze(lab, why)
        else:
            # A's and B's channels meet in the sum over K: the masked-original proof masks them there.
            w.contraction(node, 0, ra, al)
        if joined is not None and len(joined.axes) > 1 and w.uniform_along(joined, joined.axes.index(K)):
            # Whole heads: the scores keep the heads' classes along the batch axes.
            heads = Label(joined.axes[:-1], np.take(joined.atoms, 0, axis=joined.axes.index(K)))
            pieces.append((heads, None))
            if w.mode.heads:
                w.head_atoms.append(heads.atoms)
        # Otherwise no class removes an output row (a head_dim index only shrinks the sum).
    framed_pieces = sorted((lab if rl is None else framed(lab, rl) for lab, rl in pieces),
                           key=lambda x: len(x.axes))
    out = framed_pieces[-1] if framed_pieces else None
    for p in framed_pieces[:-1]:
        if not w.union_broadcast(p, out):
            for q in framed_pieces:
                w.freeze(q, f"MatMul {node.name!r}: both operands carry channels")
            out = None
            break
    if out is None and with_k and not framed_pieces:
        w.no_channels(node.outputs[0])  # only a contraction: its result has no channel axis
    w.set(node.outputs[0], out)
