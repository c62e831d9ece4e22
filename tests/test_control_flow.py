"""Control flow (If, Loop): passes keep subgraphs valid, costs count inside them, a run that
changes nothing says so. Models are built by hand with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import apply_pass, run
from prunec.graph.costs import analyze_costs
from prunec.graph.subgraphs import flatten_constant_ifs
from prunec.passes import PassManager, build_passes

R = np.random.default_rng(0)


def _w(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "cf", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def two_output_if_model() -> onnx.ModelProto:
    """x -> Conv -> c; If(constant true) whose taken branch returns both outputs of one Split of
    c, and Identity(c) third. Readers use all three outputs."""
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Split", ["c"], ["t0", "t1"], axis=1, num_outputs=2),
                              helper.make_node("Identity", ["c"], ["t2"])],
                             "then", [], [vi("t0"), vi("t1"), vi("t2")])
    other = helper.make_graph([helper.make_node("Relu", ["c"], ["e0"]),
                               helper.make_node("Neg", ["c"], ["e1"]),
                               helper.make_node("Sigmoid", ["c"], ["e2"])],
                              "else", [], [vi("e0"), vi("e1"), vi("e2")])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("If", ["cond"], ["o0", "o1", "o2"], name="if", then_branch=then,
                              else_branch=other),
             helper.make_node("Concat", ["o1", "o0"], ["cat"], axis=1),
             helper.make_node("Add", ["cat", "o2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])
    return _model(nodes, [x], [y], {"w": _w(4, 2, 1, 1), "cond": np.array(True)}, opset=18)


def test_cleanup_inlines_a_constant_if_with_several_outputs():
    m = two_output_if_model()
    out, _ = apply_pass(m, "cleanup")
    onnx.checker.check_model(out, full_check=True)
    assert "If" not in [n.op_type for n in out.graph.node]
    x = R.standard_normal((2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], run(m, {"x": x})["y"], rtol=1e-6)
    # And through the manager, which verifies (the exit 4 came from here).
    PassManager(build_passes(["cleanup"], {})).run(m)


def test_graphsurgeon_own_if_flattening_loses_outputs():
    """The control: graphsurgeon's built-in flattening breaks this model; ours does not."""
    g = gs.import_onnx(two_output_if_model())
    g.fold_constants(flatten_subgraphs=True)
    g.cleanup().toposort()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(gs.export_onnx(g), full_check=True)
    g = gs.import_onnx(two_output_if_model())
    assert flatten_constant_ifs(g) == 1
    g.cleanup().toposort()
    onnx.checker.check_model(gs.export_onnx(g), full_check=True)


def _if_costs_model():
    """If(cond input) with a 3x3 Conv (8->8) in one branch and a 1x1 Conv in the other."""
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    big = helper.make_graph([helper.make_node("Conv", ["x", "wb"], ["tb"], pads=[1, 1, 1, 1])],
                            "big", [], [vi("tb")], [numpy_helper.from_array(_w(8, 8, 3, 3), "wb")])
    small = helper.make_graph([helper.make_node("Conv", ["x", "ws"], ["ts"])],
                              "small", [], [vi("ts")], [numpy_helper.from_array(_w(8, 8, 1, 1), "ws")])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=big, else_branch=small)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])
    c = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    return _model(nodes, [x, c], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], {})


def test_if_costs_are_a_range_over_both_branches():
    c = analyze_costs(_if_costs_model())
    assert (c.macs_min, c.macs) == (8 * 16 * 8, 8 * 16 * 8 * 9)
    assert c.params == 8 * 8 * 9 + 8 * 8


def _loop_model(with_cond: bool):
    """Loop(M=3) whose body multiplies the carried [1, 4] state by a 4x4 weight."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h", "wl"], ["h_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(_w(4, 4), "wl")])
    nodes = [helper.make_node("Loop", ["M", "c" if with_cond else "", "x"], ["y"], body=body)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    inits = {"M": np.array(3, np.int64)}
    if with_cond:
        inits["c"] = np.array(True)
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)


@pytest.mark.parametrize("with_cond", [False, True])
def test_loop_body_costs_once_per_iteration(with_cond):
    c = analyze_costs(_loop_model(with_cond))
    assert c.macs == 3 * 16
    assert c.macs_min == (0 if with_cond else 3 * 16)   # a condition may end the loop early


def test_channels_says_it_left_layers_inside_subgraphs_alone():
    m = _if_costs_model()
    _, report = PassManager(build_passes(["channels"], {})).run(m)
    rec = report.passes[0]
    assert not rec.result.changed and rec.before == rec.after
    assert any("inside If/Loop/Scan" in s.what for s in rec.result.skipped)
