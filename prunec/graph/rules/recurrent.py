"""Channel rules for recurrent layers (LSTM, GRU, RNN): they read their input features through a
constant input weight, so upstream channels can be removed by slicing its columns; their hidden
units are never pruned."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Walker, rule


@rule("LSTM", "GRU", "RNN")
def _recurrent(w: Walker, node: gs.Node) -> None:
    """X [seq, batch, input] (or [batch, seq, input] with layout=1) times W [dirs, gates*H, input]:
    input channel i is column i of W, a consumer site like a Conv's input channel.

    Hidden units get no atoms: each one is tied across the gates (rows i, H+i, 2H+i.. of W and
    R), across R's columns, the biases, the initial states and every output, and the hidden
    size is an attribute; prunec does not prune recurrent layers, so what reads them is fixed."""
    x, wt = node.inputs[0], node.inputs[1]
    lab = w.label(x)
    for t in node.inputs[2:]:
        if w.label(t) is not None:
            w.freeze(w.label(t), f"{node.op} {node.name!r}: recurrent state or weights carry channels; "
                                 "prunec does not prune recurrent hidden units")
    if lab is None:
        return
    r = w.rank(x)
    if not isinstance(wt, gs.Constant) or lab.axes != (2,) or r != 3 or wt.shape[2] != lab.atoms.shape[0]:
        w.freeze(lab, f"{node.op} {node.name!r} reads channels prunec cannot map onto its input weight")
        return
    w.site(node, wt, 2, lab.atoms, "consumer")
    for o in node.outputs:
        w.no_channels(o)  # hidden units and states: no atoms
