"""Constant folding in numpy (`prunec.graph.fold_native`) gives exactly graphsurgeon's folded
graph, and declines whatever it does not reproduce exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from models import init, make_model, vi
from prunec.graph.fold_native import fold_natively
from prunec.graph.subgraphs import KEEP_UNFOLDED


def _by_graphsurgeon(m: onnx.ModelProto) -> bytes:
    g = gs.import_onnx(m)
    g.fold_constants(fold_shapes=False, flatten_subgraphs=False, error_ok=True,
                     should_exclude_node=lambda n: n.op in KEEP_UNFOLDED)
    return gs.export_onnx(g.cleanup(remove_unused_graph_inputs=False)).SerializeToString()


def _natively(m: onnx.ModelProto) -> tuple[bool, bytes]:
    g = gs.import_onnx(m)
    done = fold_natively(g)
    return done, gs.export_onnx(g.cleanup(remove_unused_graph_inputs=False)).SerializeToString()


def shape_arithmetic() -> onnx.ModelProto:
    """Integer arithmetic of the kinds exporters write for shapes, on negative values too (where
    truncating and flooring division differ), a Constant node, an Identity of a bias, and one
    Cast; every folded value ends in a graph output, so a wrong value changes the model."""
    i64 = lambda name, v: init(name, np.array(v, np.int64))  # noqa: E731
    nodes = [
        helper.make_node("Constant", [], ["seven"], value=helper.make_tensor("c", TensorProto.INT64, [2], [7, -7])),
        helper.make_node("Div", ["seven", "two"], ["q"]),            # [3, -3]: truncated, not floored (-4)
        helper.make_node("Mul", ["q", "neg"], ["m"]),
        helper.make_node("Sub", ["m", "one"], ["s"]),
        helper.make_node("Add", ["s", "big"], ["a"]),                  # wraps around
        helper.make_node("Cast", ["a"], ["c32"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["q", "ax0"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax0"], ["sq"]),
        helper.make_node("Concat", ["q", "sq", "m"], ["cat"], axis=0),
        helper.make_node("Identity", ["bias"], ["bias_copy"]),
        helper.make_node("Add", ["x", "bias_copy"], ["y"]),
    ]
    inits = [i64("two", [2, 2]), i64("neg", [-5]), i64("one", 1), i64("ax0", [0]),
             i64("big", [2**62, 2**62]), init("bias", np.arange(4, dtype=np.float32))]
    outs = [vi("y", ["N", 4]), vi("c32", [2], TensorProto.INT32), vi("cat", [6], TensorProto.INT64)]
    return make_model(nodes, [vi("x", ["N", 4])], outs, inits)


def test_numpy_folding_equals_graphsurgeons_byte_for_byte():
    m = shape_arithmetic()
    done, mine = _natively(m)
    assert done
    assert mine == _by_graphsurgeon(m)
    folded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(mine).graph.initializer}
    np.testing.assert_array_equal(folded["cat"], [3, -3, 3, -3, -15, 15])
    assert not [n for n in onnx.load_from_string(mine).graph.node if n.op_type != "Add"]


def test_ops_numpy_does_not_reproduce_exactly_are_left_to_graphsurgeon():
    # Float arithmetic (Sqrt) is ONNX Runtime's to compute: the graph stays exactly as it was.
    nodes = [helper.make_node("Sqrt", ["w"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])],
                   [init("w", np.arange(4, dtype=np.float32))])
    done, mine = _natively(m)
    assert not done
    assert mine == gs.export_onnx(gs.import_onnx(m)).SerializeToString()


def test_integer_division_by_zero_is_left_to_graphsurgeon():
    nodes = [helper.make_node("Div", ["a", "z"], ["q"]), helper.make_node("Add", ["x", "q"], ["y"])]
    m = make_model(nodes, [vi("x", [2], TensorProto.INT64)], [vi("y", [2], TensorProto.INT64)],
                   [init("a", np.array([4, 5], np.int64)), init("z", np.array([1, 0], np.int64))])
    assert not _natively(m)[0]
