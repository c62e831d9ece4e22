"""Pieces of a graph: what lies downstream of some nodes, the tensors that feed it, and a copy of
the graph cut so that chosen intermediate tensors are its inputs.

Sensitivity trials change only what lies downstream of the nodes they mask; the rest is computed
once and fed to a cut copy (`cut_graph`) that recomputes just the changed part.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def downstream(nodes: list[gs.Node]) -> set[int]:
    """ids of `nodes` and of every node that reads, directly or not, one of their outputs."""
    seen = {id(n) for n in nodes}
    todo = list(nodes)
    while todo:
        n = todo.pop()
        for out in n.outputs:
            for reader in out.outputs:
                if id(reader) not in seen:
                    seen.add(id(reader))
                    todo.append(reader)
    return seen


def feeding_tensors(graph: gs.Graph, inside: set[int]) -> list[str]:
    """Names of the non-constant tensors that nodes in `inside` read but that no node in
    `inside` produces (graph inputs or outputs of nodes outside), in graph order."""
    names: dict[str, None] = {}
    for n in graph.nodes:
        if id(n) not in inside:
            continue
        for t in n.inputs:
            if isinstance(t, gs.Constant) or not t.name:
                continue
            if any(id(p) in inside for p in t.inputs):
                continue
            if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
                continue
            names[t.name] = None
    return list(names)


def cut_graph(graph: gs.Graph, inputs: list[str], outputs: list[str],
              types: dict[str, tuple[np.dtype, list | None]]) -> gs.Graph:
    """A copy of `graph` computing `outputs` from the tensors named in `inputs` (their producers
    are cut off) plus whatever graph inputs are still needed; `types` gives each new input's
    dtype and shape (None dims are symbolic); every new input must be in it."""
    g = graph.copy()
    tensors = g.tensors()
    new_inputs = []
    for name in inputs:
        t = tensors[name]
        if t in g.inputs:
            new_inputs.append(t)
            continue
        for p in list(t.inputs):
            # Keep the producer's output positions (a Split's other outputs may still be used).
            i = next(k for k, o in enumerate(p.outputs) if o is t)
            p.outputs[i] = gs.Variable(f"{t.name}__cut", dtype=t.dtype)
        t.dtype, t.shape = types[name]
        new_inputs.append(t)
    keep = [t for t in g.inputs if t.name not in set(inputs)]
    g.inputs = new_inputs + keep
    outs = []
    for name in outputs:
        t = tensors[name]
        if t.dtype is None and name in types:
            t.dtype = types[name][0]
        # Still untyped (inference stops at contrib ops): left so; ONNX Runtime types it itself.
        outs.append(t)
    g.outputs = outs
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    return g


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list | None]]:
    """dtype and dims (None where symbolic or unknown) of every typed tensor of a shape-inferred model."""
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (dtype, dims)
    return out
