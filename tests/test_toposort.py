"""`ir.toposort` sorts exactly as graphsurgeon's `Graph.toposort` does (node order decides group
ids and names downstream), whatever order the nodes come in."""

from __future__ import annotations

import random

import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import zoo
from models import vi
from prunec.graph.fold import fold_constants
from prunec.graph.ir import toposort


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
