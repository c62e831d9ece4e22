"""cleanup: Identity/Dropout removal (graph outputs keep their names), constant folding,
dead nodes and unused initializers; the outputs stay the same (ONNX Runtime is the oracle)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from models import apply_pass, init, make_model, ops, rng, run, vi

X = {"x": rng(0).standard_normal((2, 3)).astype(np.float32)}


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds=X):
    want, got = run(a, feeds), run(b, feeds)
    assert list(want) == list(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def _cleanup(m, **opts):
    new, result = apply_pass(m, "cleanup", **opts)
    onnx.checker.check_model(new, full_check=True)
    _same_outputs(m, new)
    return new, result


def _io(outputs=("y",)):
    return [vi("x", ["N", 3])], [vi(o, ["N", 3]) for o in outputs]


def test_identity_in_the_middle():
    ins, outs = _io()
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
                    helper.make_node("Identity", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["y"])],
                   ins, outs)
    new, result = _cleanup(m)
    assert ops(new) == ["Relu", "Neg"]
    assert result.details["identities_removed"] == 2 and result.details["nodes_removed"] == 2


def test_identity_writing_a_graph_output_keeps_the_name():
    ins, outs = _io()
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"])],
                   ins, outs)
    new, _ = _cleanup(m)
    assert ops(new) == ["Relu"]
    assert [o.name for o in new.graph.output] == ["y"]
    assert list(new.graph.node[0].output) == ["y"]


def test_identity_to_graph_output_with_other_readers_of_its_input():
    # `a` is read by the Identity and by Neg: the Relu cannot be renamed to write `y`.
    ins, outs = _io(("y", "z"))
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"]),
                    helper.make_node("Neg", ["a"], ["z"])], ins, outs)
    new, _ = _cleanup(m)
    assert [o.name for o in new.graph.output] == ["y", "z"]


def test_two_identities_to_two_graph_outputs():
    ins, outs = _io(("y1", "y2"))
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y1"]),
                    helper.make_node("Identity", ["a"], ["y2"])], ins, outs)
    new, _ = _cleanup(m)
    assert [o.name for o in new.graph.output] == ["y1", "y2"]


def test_identity_from_graph_input_to_graph_output_is_kept():
    ins, outs = _io()
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], ins, outs)
    new, _ = _cleanup(m)
    assert [o.name for o in new.graph.output] == ["y"]
    assert [i.name for i in new.graph.input] == ["x"]


def test_identity_between_two_graph_outputs():
    ins, outs = _io(("a", "y"))
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"])],
                   ins, outs)
    new, _ = _cleanup(m)
    assert [o.name for o in new.graph.output] == ["a", "y"]


@pytest.mark.parametrize("form", ["plain", "ratio", "training-false"])
def test_inference_dropout_removed(form):
    inputs = {"plain": ["a"], "ratio": ["a", "r"], "training-false": ["a", "r", "t"]}[form]
    inits = [init("r", np.array(0.5, np.float32)), init("t", np.array(False))]
    inits = [t for t in inits if t.name in inputs]
    ins, outs = _io()
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Dropout", inputs, ["d"]),
                    helper.make_node("Neg", ["d"], ["y"])], ins, outs, inits)
    new, _ = _cleanup(m)
    assert ops(new) == ["Relu", "Neg"]


def test_dropout_with_read_mask_is_kept():
    m = make_model([helper.make_node("Dropout", ["x"], ["d", "mask"]),
                    helper.make_node("Cast", ["mask"], ["m"], to=onnx.TensorProto.FLOAT),
                    helper.make_node("Add", ["d", "m"], ["y"])], *_io())
    new, _ = apply_pass(m, "cleanup")
    assert "Dropout" in ops(new)


def test_training_dropout_is_kept():
    m = make_model([helper.make_node("Dropout", ["x", "", "t"], ["y"])], [vi("x", ["N", 3]), vi("t", [], onnx.TensorProto.BOOL)],
                   [vi("y", ["N", 3])])
    new, _ = apply_pass(m, "cleanup")
    assert ops(new) == ["Dropout"]


def _const_chain():
    """y = x * (a + b) * shape-derived scale: everything but the Muls is constant."""
    a, b = rng(1).standard_normal(3).astype(np.float32), rng(2).standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Constant", [], ["two"], value=onnx.numpy_helper.from_array(np.float32(2.0))),
             helper.make_node("Mul", ["ab", "two"], ["ab2"]),
             helper.make_node("Mul", ["x", "ab2"], ["y"])]
    return make_model(nodes, *_io(), [init("a", a), init("b", b)]), (a + b) * 2


def test_constant_folding():
    m, want = _const_chain()
    new, result = _cleanup(m)
    assert ops(new) == ["Mul"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    assert set(inits) == {new.graph.node[0].input[1]}
    np.testing.assert_allclose(next(iter(inits.values())), want, rtol=1e-6)
    assert result.details["constants_after"] < result.details["constants_before"]


def test_constant_folding_off():
    m, _ = _const_chain()
    new, _ = _cleanup(m, fold_constants=False)
    assert ops(new) == ops(m)


def test_shape_arithmetic_folds_with_static_dims():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["c"], axis=0),
             helper.make_node("Concat", ["m1", "c"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3])],
                   [init("i", np.array([1], np.int64)), init("m1", np.array([-1], np.int64))])
    new, _ = _cleanup(m)
    assert ops(new) == ["Reshape"]


def test_dead_nodes_and_unused_initializers_removed_but_inputs_kept():
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["dead1"]),
             helper.make_node("Sigmoid", ["dead1"], ["dead2"])]
    m = make_model(nodes, [vi("x", ["N", 3]), vi("unused", [1])], [vi("y", ["N", 3])],
                   [init("w", np.eye(3, dtype=np.float32)), init("never", np.zeros(5, np.float32))])
    new, result = apply_pass(m, "cleanup")
    assert ops(new) == ["Relu"]
    assert list(new.graph.initializer) == []
    assert [i.name for i in new.graph.input] == ["x", "unused"]  # the interface never changes
    assert result.changed and result.details["nodes_removed"] == 2


def test_no_change_is_reported_as_such():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], *_io())
    new, result = apply_pass(m, "cleanup")
    assert not result.changed and ops(new) == ["Relu"]
