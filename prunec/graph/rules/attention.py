"""Channel rules for attention: fused attention ops (ONNX Runtime's com.microsoft Attention,
MultiHeadAttention and GroupQueryAttention; ONNX's Attention from opset 23) and what exported
attention needs besides MatMul/Reshape/Softmax (a KV cache concatenated with new keys is in
`shape_ops`; the Q·Kᵀ and scores·V products in `weights`).

A fused op hides its `[heads, head_dim]` split behind a `num_heads` attribute, so its rule
recognizes the layout from the op's definition (not from a pattern of nodes) and couples rows
(heads mode) exactly as a Reshape into heads does; removal then rewrites the attribute. Pruning
head_dim inside a fused op would change its default softmax scale, so outside heads mode its
channels freeze.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept, Label, Walker, rule
from prunec.graph.rules.common import has_input

_HEADS_ONLY = "its heads are removed by the heads pass; pruning head_dim would change its softmax scale"


def _join_heads(w: Walker, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> bool:
    """Couple a fused op's heads: `q` [q_heads, dq], `k` [kv_heads, dk], `v` [kv_heads, dv]
    atoms. Query head h reads KV group h // (q_heads / kv_heads); one class is a KV group with
    its query heads. False when the counts do not divide."""
    if q.shape[0] % k.shape[0] or k.shape[0] != v.shape[0]:
        return False
    for grid in (q, k, v):
        w.couple_split(grid)
    rep = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        w.uf.union(int(q[h, 0]), int(k[h // rep, 0]))
        w.uf.union(int(q[h, 0]), int(v[h // rep, 0]))
    w.head_atoms.append(q[:, 0].copy())
    return True


def _heads_label(w: Walker, t: gs.Tensor, heads: int, what: str, node: gs.Node) -> np.ndarray | None:
    """Atoms of a fused op's 3-D input [B, S, heads*head_dim] as [heads, head_dim], or None
    (then the input is frozen): channels must sit on the last axis and divide into heads."""
    lab = w.label(t)
    r = w.rank(t)
    if lab is None:
        return None
    if r != 3 or lab.axes != (2,) or lab.atoms.shape[0] % heads:
        w.freeze(lab, f"{node.op} {node.name!r}: {what} is not [batch, sequence, heads*head_dim]")
        return None
    return lab.atoms.reshape(heads, -1)


def _frozen_fused(w: Walker, node: gs.Node, why: str) -> None:
    """Freeze every channel the op reads and give its outputs no channels."""
    w.freeze_node(node, f"{node.op} {node.name!r}: {why}")


@rule("Attention", domain="com.microsoft")
def _ms_attention(w: Walker, node: gs.Node) -> None:
    """input [B, S, C] x weights [C, q+k+v] (+ bias) -> heads -> output [B, S, v]."""
    x, wt = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if has_input(node, 2) else None
    heads = int(node.attrs.get("num_heads", 0))
    xl = w.label(x)
    if not isinstance(wt, gs.Constant) or (bias is not None and not isinstance(bias, gs.Constant)) \
            or heads < 1:
        _frozen_fused(w, node, "non-constant weights")
        return
    sizes = [int(v) for v in node.attrs.get("qkv_hidden_sizes", [])] or [wt.shape[1] // 3] * 3
    if sum(sizes) != wt.shape[1] or any(n % heads for n in sizes):
        _frozen_fused(w, node, "Q/K/V sizes do not divide into heads")
        return
    if xl is not None and (xl.axes != (2,) or xl.atoms.shape[0] != wt.shape[0]):
        w.freeze(xl, f"Attention {node.name!r} reads channels on an unexpected axis")
        xl = None
    if xl is not None:
        w.site(node, wt, 0, xl.atoms, "consumer")
    atoms = w.fresh(node, sum(sizes))
    q, k, v = (a.reshape(heads, -1) for a in np.split(atoms, np.cumsum(sizes)[:-1]))
    w.site(node, wt, 1, np.concatenate([q.ravel(), k.ravel(), v.ravel()]), "producer")
    if bias is not None:
        w.site(node, bias, 0, np.concatenate([q.ravel(), k.ravel(), v.ravel()]), "producer")
    out = Label((2,), v.ravel())
    w.set(node.outputs[0], out)
    if len(node.outputs) > 1 and node.outputs[1].name or has_input(node, 4):
        w.freeze(out, f"Attention {node.name!r}: a KV cache (past/present) inside the fused op; "
                      "the model's interface")
        return
    if not w.mode.heads:
        w.freeze(out, f"Attention {node.name!r}: {_HEADS_ONLY}")
        return
    _join_heads(w, q, k, v)

    def fix(kept: Kept, node=node, out=node.outputs[0], dims=tuple(n // heads for n in sizes)):
        n = len(kept[out.name][2]) // dims[2]
        node.attrs["num_heads"] = n
        if "qkv_hidden_sizes" in node.attrs:
            node.attrs["qkv_hidden_sizes"] = [n * d for d in dims]
    w.fixups.append((node, fix))


@rule("MultiHeadAttention", domain="com.microsoft")
def _ms_multi_head_attention(w: Walker, node: gs.Node) -> None:
    """query, key, value [B, S, heads*head_dim] (+ packed bias) -> output [B, S, heads*dv]."""
    heads = int(node.attrs.get("num_heads", 0))
    labs = [w.label(t) if has_input(node, i) else None for i, t in enumerate(node.inputs[:3])]
    if all(lab is None for lab in labs):
        return
    uses_cache = any(has_input(node, i) for i in (6, 7)) or any(o.name for o in node.outputs[1:3])
    if not w.mode.heads or uses_cache or not all(has_input(node, i) for i in range(3)) or heads < 1:
        why = _HEADS_ONLY if not w.mode.heads else (
            "a KV cache (past/present) inside the fused op; the model's interface" if uses_cache
            else "packed Q/K/V inputs")
        _frozen_fused(w, node, why)
        return
    q, k, v = (_heads_label(w, node.inputs[i], heads, name, node) for i, name in enumerate("qkv"))
    bias = node.inputs[3] if has_input(node, 3) else None
    if q is None or k is None or v is None or (bias is not None and not isinstance(bias, gs.Constant)) \
            or not _join_heads(w, q, k, v):
        _frozen_fused(w, node, "Q, K and V do not all carry heads prunec can follow")
        return
    if bias is not None:
        w.site(node, bias, 0, np.concatenate([q.ravel(), k.ravel(), v.ravel()]), "attached")
    w.set(node.outputs[0], Label((2,), v.ravel()))

    def fix(kept: Kept, node=node, out=node.outputs[0], dv=v.shape[1]):
        node.attrs["num_heads"] = len(kept[out.name][2]) // dv
    w.fixups.append((node, fix))


@rule("GroupQueryAttention", domain="com.microsoft")
def _ms_group_query_attention(w: Walker, node: gs.Node) -> None:
    """query [B, S, heads*d], key/value [B, S, kv_heads*d], a KV cache past_key/past_value
    [B, kv_heads, P, d] (graph inputs: the interface) -> output, present_key/present_value."""
    heads, kv = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
    labs = [w.label(t) if has_input(node, i) else None for i, t in enumerate(node.inputs[:3])]
    if all(lab is None for lab in labs):
        return
    if not w.mode.heads or not all(has_input(node, i) for i in range(3)) or heads < 1 or kv < 1:
        _frozen_fused(w, node, _HEADS_ONLY if not w.mode.heads else "packed Q/K/V inputs")
        return
    q = _heads_label(w, node.inputs[0], heads, "query", node)
    k = _heads_label(w, node.inputs[1], kv, "key", node)
    v = _heads_label(w, node.inputs[2], kv, "value", node)
    if q is None or k is None or v is None or not _join_heads(w, q, k, v):
        _frozen_fused(w, node, "Q, K and V do not all carry heads prunec can follow")
        return
    rep = heads // kv
    for i, name in ((3, "past_key"), (4, "past_value")):
        if not has_input(node, i):
            continue
        t = node.inputs[i]
        if isinstance(t, gs.Constant) and t.values.ndim == 4 and t.values.shape[1] == kv:
            w.site(node, t, 1, k[:, 0], "attached")  # a constant (often empty) cache: sliced too
            continue
        past = w.adopt_interface(t, Label((1,), k[:, 0]), f"graph input {t.name!r} ({name} of {node.name!r})")
        if past is None:
            _frozen_fused(w, node, f"{name} is computed in the graph")
            return
        w.union_labels(past, Label((1,), k[:, 0]))
    w.set(node.outputs[0], Label((2,), np.repeat(v, rep, axis=0).ravel()))
    for o in node.outputs[1:3]:
        w.set(o, Label((1,), k[:, 0]))
    out = node.outputs[0]

    def fix(kept: Kept, node=node, out=out, dv=v.shape[1], rep=rep):
        n = len(kept[out.name][2]) // dv
        node.attrs["num_heads"] = n
        node.attrs["kv_num_heads"] = n // rep
    w.fixups.append((node, fix))


@rule("Attention", since=23)
def _onnx_attention(w: Walker, node: gs.Node) -> None:
    """ONNX Attention: Q [B, q_heads, S, d] (or [B, S, q_heads*d] with q_num_heads and
    kv_num_heads), K/V likewise with kv heads -> Y in Q's layout."""
    labs = [w.label(t) for t in node.inputs[:3]]
    if all(lab is None for lab in labs):
        return
    uses_cache = any(has_input(node, i) for i in (4, 5)) or any(o.name and o.outputs for o in node.outputs[1:])
    r = w.rank(node.inputs[0])
    if not w.mode.heads or uses_cache or r not in (3, 4):
        why = _HEADS_ONLY if not w.mode.heads else (
            "a KV cache (past/present) or the QK output; the model's interface" if uses_cache
            else "rank unknown")
        _frozen_fused(w, node, why)
        return
    if r == 3:
        qh, kvh = int(node.attrs.get("q_num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        if qh < 1 or kvh < 1:
            _frozen_fused(w, node, "head counts missing")
            return
        q = _heads_label(w, node.inputs[0], qh, "Q", node)
        k = _heads_label(w, node.inputs[1], kvh, "K", node)
        v = _heads_label(w, node.inputs[2], kvh, "V", node)
    else:
        def grid(lab: Label | None):
            if lab is None or lab.axes != (1, 3):
                w.freeze(lab, f"Attention {node.name!r}: channels not on [heads, head_dim]")
                return None
            return lab.atoms
        q, k, v = (grid(lab) for lab in labs)
    if q is None or k is None or v is None or not _join_heads(w, q, k, v):
        _frozen_fused(w, node, "Q, K and V do not all carry heads prunec can follow")
        return
    rep = q.shape[0] // k.shape[0]
    y = np.repeat(v, rep, axis=0)
    w.set(node.outputs[0], Label((2,), y.ravel()) if r == 3 else Label((1, 3), y))
    if r == 3:
        out = node.outputs[0]

        def fix(kept: Kept, node=node, out=out, dv=v.shape[1], rep=rep):
            n = len(kept[out.name][2]) // dv
            node.attrs["q_num_heads"] = n
            node.attrs["kv_num_heads"] = n // rep
        w.fixups.append((node, fix))
