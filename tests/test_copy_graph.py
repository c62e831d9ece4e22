"""`copy_graph`: the masked reference's copy, equal to graphsurgeon's `Graph.copy` and sharing
no node or tensor with the graph it copies."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
import zoo

from prunec.graph.fold import fold_constants
from prunec.graph.ir import copy_graph, export_graph


@pytest.mark.parametrize("arch", ["shufflenet_v2", "inception", "misc_ops", "two_outputs"])
def test_the_copy_exports_as_graphsurgeons_copy_does(arch):
    a = zoo.ZOO[arch]
    g = gs.import_onnx(zoo.export(zoo.build(a).wide, a.hw, keep_bn=True))
    for graph in (g, fold_constants(g)):  # as imported (Constant nodes) and folded
        mine, theirs = copy_graph(graph), graph.copy()
        assert export_graph(mine).SerializeToString() == export_graph(theirs).SerializeToString()
        # (graphsurgeon's copy, like this one, leaves the producer fields behind)
        assert export_graph(mine).graph.SerializeToString() == export_graph(graph).graph.SerializeToString()


def test_the_copy_shares_no_node_or_tensor():
    a = zoo.ZOO["shufflenet_v2"]
    g = fold_constants(gs.import_onnx(zoo.export(zoo.build(a).wide, a.hw, keep_bn=True)))
    before = export_graph(g).SerializeToString()
    c = copy_graph(g)
    assert not {id(n) for n in c.nodes} & {id(n) for n in g.nodes}
    assert not {id(t) for t in c.tensors().values()} & {id(t) for t in g.tensors().values()}
    # Editing the copy (what the masked reference does) leaves the original as it was.
    for t in c.tensors().values():
        if isinstance(t, gs.Constant):
            t.values = t.values * 0
    c.nodes[0].inputs[0].name = "renamed"
    c.nodes.pop()
    assert export_graph(g).SerializeToString() == before


def test_domains_attributes_and_unnamed_inputs_are_copied():
    from onnx import helper

    from models import vi

    nodes = [helper.make_node("Foo", ["x", ""], ["f"], domain="custom.ops", alpha=0.5, names=["a", "b"]),
             helper.make_node("Clip", ["f", "", "hi"], ["y"])]
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 3])], [vi("y", ["N", 3])],
                              [helper.make_tensor("hi", 1, [], [6.0])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    g = gs.import_onnx(m)
    assert export_graph(copy_graph(g)).SerializeToString() == export_graph(g.copy()).SerializeToString()
    assert copy_graph(g).nodes[0].domain == "custom.ops"
