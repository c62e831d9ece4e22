"""Channel rules for embedding lookups: Gather from a constant table [vocab, width] by token ids
makes `width` fresh channels (the table's columns), like a weight layer's output; Gather on an
axis without channels passes them through."""

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


@rule("Gather")
def _gather(w: Walker, node: gs.Node) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    lab, il = w.label(data), w.label(idx)
    if il is not None:
        w.freeze(il, f"Gather {node.name!r} uses channels as indices")
    if lab is None:
        embedding_lookup(w, node)
        return
    r, ri = w.rank(data), w.rank(idx)
    if r is None or ri is None:
        w.freeze(lab, f"Gather {node.name!r}: rank unknown")
        return
    axis = norm_axis(int(node.attrs.get("axis", 0)), r)
    if axis in lab.axes:
        w.freeze(lab, f"Gather {node.name!r} picks channels by index")
        return
    w.set(node.outputs[0], Label(tuple(a if a < axis else a + ri - 1 for a in lab.axes), lab.atoms))
