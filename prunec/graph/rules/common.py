"""Helpers shared by the channel rules of every op family."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Walker, weight_view
from prunec.graph.fold import const_value


def weight_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a constant weight (or a weight view: a dequantized constant) without loading its
    values; None when it is not constant."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    view = weight_view(t)
    return view.shape if view is not None else None


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis



def has_input(node: gs.Node, i: int) -> bool:
    """Whether optional input `i` is given (absent, or an empty name, means not given)."""
    return len(node.inputs) > i and bool(node.inputs[i].name)


def optional_const(node: gs.Node, i: int) -> np.ndarray | None:
    """Value of optional input `i` when given and constant, else None."""
    return const_value(node.inputs[i]) if has_input(node, i) else None


def axes_param(w: Walker, node: gs.Node) -> list[int] | None:
    """The `axes` of a Reduce/Squeeze-like op: input 1 (opset 13+) or the attribute; None if not constant."""
    if has_input(node, 1):
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in np.ravel(v)]
    a = node.attrs.get("axes")
    return None if a is None else [int(x) for x in a]


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name unused in `graph`: fix-ups of two passes (heads, then channels) rewrite
    the same shape vector, and each new constant needs its own name."""
    from prunec.graph.ir import NameGen

    gen = graph.__dict__.get("_prunec_names")
    if gen is None:
        gen = graph.__dict__["_prunec_names"] = NameGen(graph)
    return gen(base)
