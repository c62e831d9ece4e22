"""Channel rules for embeddings: a Gather from a constant table [vocab, width] by token ids (the
`Gather` rule in `indexing` calls `embedding_lookup`) makes `width` fresh channels, the table's
columns, like a weight layer's output; ONNX Runtime's fused EmbedLayerNormalization likewise."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Label, Walker, rule
from prunec.graph.rules.common import norm_axis


def embedding_lookup(w: Walker, node: gs.Node) -> bool:
    """Gather(table, ids) from a constant float 2-D table along axis 0: the output's last axis
    carries fresh channels, one per table column (a producer site). False if not such a lookup."""
    table, ids = node.inputs[0], node.inputs[1]
    if not isinstance(table, gs.Constant) or table.values.ndim != 2 or table.values.dtype.kind != "f" \
            or norm_axis(int(node.attrs.get("axis", 0)), 2) != 0 or w.label(ids) is not None:
        return False
    r = w.rank(node.outputs[0])
    if r is None:
        return False
    atoms = w.fresh(node, int(table.values.shape[1]))
    w.site(node, table, 1, atoms, "producer")
    w.set(node.outputs[0], Label((r - 1,), atoms))
    return True


@rule("EmbedLayerNormalization", domain="com.microsoft")
def _embed_layer_norm(w: Walker, node: gs.Node) -> None:
    """ONNX Runtime's fused BERT embeddings: LayerNorm(word[ids] + position[pos] + segment[seg]).
    Its output channels are the tables' columns (producer sites), normalized across the hidden
    width: frozen unless hidden mode. Output 2 (the sum before normalizing) carries them too."""
    from prunec.graph.rules.common import has_input
    from prunec.graph.rules.normalization import HIDDEN_HINT

    tables = [node.inputs[i] for i in (2, 3, 4) if has_input(node, i)]
    params = [node.inputs[i] for i in (5, 6) if has_input(node, i)]
    r = w.rank(node.outputs[0])
    if r is None or not tables or not all(isinstance(t, gs.Constant) and t.values.ndim == 2 for t in tables):
        return  # no channels to follow: the output stays unlabeled (its readers see a constant width)
    n = int(tables[0].values.shape[1])
    atoms = w.fresh(node, n)
    lab = Label((r - 1,), atoms)
    ok = all(t.values.shape[1] == n for t in tables) and \
        all(isinstance(p, gs.Constant) and p.values.shape == (n,) for p in params)
    for t in tables:
        w.site(node, t, 1, atoms, "producer")
    for p in params if ok else ():
        w.site(node, p, 0, atoms, "attached")
    w.set(node.outputs[0], lab)
    if len(node.outputs) > 2 and node.outputs[2].name:
        w.set(node.outputs[2], lab)
    if not ok:
        w.freeze(lab, f"EmbedLayerNormalization {node.name!r}: tables or parameters of different widths")
    elif not w.mode.hidden:
        w.freeze(lab, f"EmbedLayerNormalization {node.name!r} normalizes across the channel axis ({HIDDEN_HINT})")
    else:
        w.statistics.append((node, atoms))
