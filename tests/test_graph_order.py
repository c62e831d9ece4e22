"""`ir.toposort` and `ir.cleanup` do exactly what graphsurgeon's `Graph.toposort` and
`Graph.cleanup` do (node order decides group ids and names downstream; readers lists decide
what the channel rules see), whatever order the nodes come in."""

from __future__ import annotations

import random

import onnx_graphsurgeon as gs
import pytest
import zoo
from onnx import helper

from models import vi
from prunec.graph import fold
from prunec.graph.fold import fold_constants
from prunec.graph.ir import cleanup, toposort


def names(g: gs.Graph) -> list[int]:
    """The node order, by identity (exported nodes may share names)."""
    return [id(n) for n in g.nodes]


@pytest.mark.parametrize("arch", ["shufflenet_v2", "densenet", "inception", "misc_ops", "traps"])
def test_the_order_is_graphsurgeons_for_any_input_order(arch):
    a = zoo.ZOO[arch]
    m = zoo.export(zoo.build(a).wide, a.hw, keep_bn=True)
    for folded in (False, True):
        for seed in range(4):
            g = gs.import_onnx(m)
            if folded:
                fold_constants(g)
            if seed:
                random.Random(seed).shuffle(g.nodes)
            expected = _graphsurgeon_order(g)
            toposort(g)
            assert names(g) == expected, (arch, folded, seed)


def _graphsurgeon_order(g: gs.Graph) -> list[int]:
    """graphsurgeon's order, sorted on the same nodes (then put back as they were)."""
    before = list(g.nodes)
    g.toposort()
    order = names(g)
    g.nodes = before
    return order


def test_diamonds_and_unordered_inputs():
    nodes = [helper.make_node("Add", ["b", "c"], ["y"]),
             helper.make_node("Relu", ["a"], ["c"]),
             helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Relu", ["x"], ["z"])]
    g = gs.import_onnx(helper.make_model(helper.make_graph(nodes, "d", [vi("x", [2])], [vi("y", [2]), vi("z", [2])])))
    expected = _graphsurgeon_order(g)
    assert [n.outputs[0].name for n in toposort(g).nodes] == ["a", "z", "b", "c", "y"]
    assert names(g) == expected


def test_a_cycle_is_left_to_graphsurgeon():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    g = gs.import_onnx(helper.make_model(helper.make_graph(nodes, "c", [vi("x", [2])], [vi("b", [2])])))
    with pytest.raises(Exception, match="Cycle"):
        toposort(g)


def _state(g: gs.Graph) -> list:
    """Nodes in order with their inputs and outputs, and every tensor's producers and readers."""
    nodes = [(n.op, n.name, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in g.nodes]
    tensors = {t.name: t for n in g.nodes for t in [*n.inputs, *n.outputs]}
    tensors.update({t.name: t for t in [*g.inputs, *g.outputs]})
    return [nodes, sorted((k, [x.name for x in t.inputs], [x.name for x in t.outputs]) for k, t in tensors.items())]


@pytest.mark.parametrize("arch", ["shufflenet_v2", "densenet", "misc_ops", "traps"])
def test_cleanup_removes_what_graphsurgeons_removes(arch, monkeypatch):
    # Folding leaves dead shape arithmetic; the rest of the model is live. Both cleanups must
    # leave the same nodes and the same producer and reader lists.
    a = zoo.ZOO[arch]
    m = zoo.export(zoo.build(a).wide, a.hw, keep_bn=True)
    for seed in range(3):
        states = []
        for mine in (True, False):
            monkeypatch.setattr(fold, "cleanup", cleanup if mine else
                                (lambda g: g.cleanup(remove_unused_graph_inputs=False)))
            g = gs.import_onnx(m)
            if seed:
                random.Random(seed).shuffle(g.nodes)
                g.nodes = g.nodes[: len(g.nodes) - seed]  # some tensors now have no producer
            fold.fold_constants(g)
            g.outputs = g.outputs + [g.nodes[len(g.nodes) // 2].outputs[0]]
            before = _state(g)
            cleanup(g) if mine else g.cleanup(remove_unused_graph_inputs=False)
            states.append((before, _state(g)))
        assert states[0][1] == states[1][1], (arch, seed)


def test_cleanup_drops_dead_chains_and_keeps_live_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Shape", ["a"], ["s"]),          # read only by a dead chain
             helper.make_node("Cast", ["s"], ["c"], to=1),
             helper.make_node("Neg", ["c"], ["dead"]),
             helper.make_node("Neg", ["a"], ["y"])]
    g = gs.import_onnx(helper.make_model(helper.make_graph(nodes, "d", [vi("x", [3])], [vi("y", [3])])))
    cleanup(g)
    assert [n.op for n in g.nodes] == ["Relu", "Neg"]
    assert [n.op for n in g.tensors()["a"].outputs] == ["Neg"]
