"""Control flow (If, Loop, Scan): walking subgraphs, and inlining an If whose condition is constant.

prunec rewrites the outer graph only; subgraphs must stay valid around it. Two things break them
easily: onnx-graphsurgeon's own If flattening (in `fold_constants`) drops every If output after
the first when they are rebound, and leaves no producer for an output the branch passes through
from the outer scope; and a pass that does not see the outer values a subgraph reads. This module
inlines constant-condition Ifs correctly, and lists what lives inside subgraphs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

#: Ops whose attributes hold subgraphs in the default domain.
CONTROL_FLOW = ("If", "Loop", "Scan")


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The subgraphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    out = []
    for value in node.attrs.values():
        for g in (value if isinstance(value, list) else [value]):
            if isinstance(g, gs.Graph):
                out.append(g)
    return out


def walk_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Node, int]]:
    """Every node of the graph and of its subgraphs, at any depth, with its depth (0: outer)."""
    stack = [(graph, 0)]
    while stack:
        g, depth = stack.pop()
        for node in g.nodes:
            yield node, depth
            for sub in node_subgraphs(node):
                stack.append((sub, depth + 1))


def proto_subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for each subgraph of a NodeProto."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((a.name, g) for g in a.graphs)
    return out


def walk_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and all its subgraphs, at any depth."""
    yield graph
    for n in graph.node:
        for _, sub in proto_subgraphs(n):
            yield from walk_proto_graphs(sub)


def _scalar_bool(t: gs.Tensor) -> bool | None:
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        if v.size == 1:
            return bool(v.ravel()[0])
    return None


def flatten_constant_ifs(graph: gs.Graph) -> int:
    """Inline every If of `graph` (outer level) whose condition is a constant: the taken branch's
    nodes replace the If, its outputs become the If's outputs. Returns how many were inlined.

    A branch output produced by a branch node is rebound to the If's output tensor; one that
    the branch passes through (an outer value, a constant or a branch input) gets an Identity,
    so every If output keeps a producer. Branch-local names get a suffix so they cannot collide."""
    count = 0
    index = 0
    taken_names = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    while index < len(graph.nodes):
        node = graph.nodes[index]
        cond = _scalar_bool(node.inputs[0]) if node.op == "If" and node.inputs else None
        if cond is None:
            index += 1
            continue
        branch = node.attrs["then_branch" if cond else "else_branch"]
        suffix = f"_inl{count}_{node.name or 'if'}"
        local = branch._local_tensors()
        for t in local.values():
            # Constants keep their names: graphsurgeon exports a lazily loaded constant by
            # renaming the TensorProto it came from, which would edit the caller's model.
            if t.name and not isinstance(t, gs.Constant) and t.name + suffix not in taken_names:
                t.name += suffix
        for n in branch.nodes:
            if n.name:
                n.name += suffix
        pairs = list(zip(list(node.outputs), list(branch.outputs)))
        new_nodes = list(branch.nodes)
        node.inputs.clear()
        node.outputs.clear()
        for outer_out, sub_out in pairs:
            producer = next((p for p in sub_out.inputs if any(p is b for b in branch.nodes)), None)
            if producer is not None:
                k = next(i for i, o in enumerate(producer.outputs) if o is sub_out)
                producer.outputs[k] = outer_out
                # Readers inside the branch now read the rebound tensor.
                for reader in list(sub_out.outputs):
                    for i, x in enumerate(reader.inputs):
                        if x is sub_out:
                            reader.inputs[i] = outer_out
            else:
                new_nodes.append(gs.Node("Identity", f"{outer_out.name}_passthrough{suffix}",
                                         inputs=[sub_out], outputs=[outer_out]))
        del graph.nodes[index]
        graph.nodes[index:index] = new_nodes
        index += len(new_nodes)
        count += 1
    return count


#: Ops never folded: a quantized model keeps its quantization (DequantizeLinear of an int8 weight
#: is what a quantized runtime kernel reads; folding it would store the float weight instead).
KEEP_UNFOLDED = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def fold_constants_safely(graph: gs.Graph, **kw) -> gs.Graph:
    """graphsurgeon's constant folding with its If flattening replaced by `flatten_constant_ifs`,
    repeated while folding makes more conditions constant. Quantize/dequantize ops stay."""
    for _ in range(8):
        graph.fold_constants(flatten_subgraphs=False,
                             should_exclude_node=lambda n: n.op in KEEP_UNFOLDED, **kw)
        if not flatten_constant_ifs(graph):
            break
        graph.cleanup(remove_unused_graph_inputs=False)
    return graph


def subgraph_weight_layers(graph: gs.Graph) -> list[str]:
    """Names of Conv/ConvTranspose/Gemm/MatMul nodes that live inside subgraphs: prunec does not
    prune inside If/Loop/Scan bodies, so a run should say so rather than silently skip them."""
    return [n.name or n.op for n, depth in walk_nodes(graph)
            if depth > 0 and n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
