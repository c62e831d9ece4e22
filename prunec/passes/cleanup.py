"""`cleanup`: fold constant subgraphs, drop Identity/inference Dropout, dead nodes and unused weights.

Constant folding is onnx-graphsurgeon's (it evaluates constant subgraphs with ONNX Runtime), which
prunec already depends on; onnxslim or onnxoptimizer would add a dependency for the same result
plus fusions we do not want in an exact, reviewable pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.ir import bypass
from prunec.graph.subgraphs import fold_constants_safely
from prunec.passes.base import Pass, PassContext, PassResult, option, register


def _is_identity(node: gs.Node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout" and len([o for o in node.outputs if o.outputs]) <= 1:
        # Inference Dropout is identity unless training_mode is a constant True or unknown.
        if len(node.inputs) >= 3 and node.inputs[2].name:
            tm = node.inputs[2]
            return isinstance(tm, gs.Constant) and not bool(np.asarray(tm.values))
        return True
    return False


def remove_identities(graph: gs.Graph) -> int:
    """Bypass Identity/inference-Dropout nodes; graph outputs keep their names. Returns count."""
    removed = 0
    out_ids = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if not _is_identity(node) or not node.inputs or not node.outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # a Dropout mask someone reads
        if id(dst) in out_ids:
            # Keep the output's name: make the producer write it, when that is unambiguous.
            if id(src) in out_ids or not src.inputs or len(src.outputs) != 1 \
                    or isinstance(src, gs.Constant):
                continue
            producer = src.inputs[0]
            idx = producer.outputs.index(src)
            producer.outputs[idx] = dst
            node.outputs.clear()
            node.inputs.clear()
        else:
            bypass(node)
        removed += 1
    return removed


def _census(graph: gs.Graph) -> tuple[int, int]:
    """Nodes and distinct constants of the graph and its subgraphs (cleanup works in both)."""
    graphs = [graph, *graph.subgraphs(recursive=True)]
    consts = {id(t) for g in graphs for t in g.tensors().values() if isinstance(t, gs.Constant)}
    return sum(len(g.nodes) for g in graphs), len(consts)


@register
class Cleanup(Pass):
    name = "cleanup"
    summary = "Fold constant subgraphs, remove Identity/Dropout, dead nodes and unused initializers."
    exact = True

    @dataclass
    class Options:
        fold_constants: bool = option(True, "evaluate constant subgraphs and store the results")
        fold_size_limit: int = option(16 * 2**20, "do not materialise folded tensors larger than this many bytes")
        remove_identity: bool = option(True, "bypass Identity and inference-mode Dropout nodes")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before, consts_before = _census(graph)
        identities = remove_identities(graph) if self.options.remove_identity else 0
        graph.cleanup(remove_unused_graph_inputs=False)
        if self.options.fold_constants:
            # Not graphsurgeon's own If flattening: it loses If outputs (see graph.subgraphs).
            fold_constants_safely(graph, size_threshold=self.options.fold_size_limit, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False)
        nodes_after, consts_after = _census(graph)
        removed = nodes_before - nodes_after
        return PassResult(
            changed=removed > 0 or consts_after != consts_before,
            details={"nodes_removed": removed, "identities_removed": identities,
                     "constants_before": consts_before, "constants_after": consts_after},
        )
