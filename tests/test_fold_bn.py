"""fold-bn: folded models compute what the originals compute (ONNX Runtime on both is the oracle),
and every illegal case is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from models import apply_pass, bn_node, bn_params, init, make_model, ops, rel_err, rng, run, vi

TOL = 1e-5


def _check_folded(model, feeds, *, folded: int = 1):
    new, result = apply_pass(model, "fold-bn")
    assert "BatchNormalization" not in ops(new)
    assert result.changed and result.details["folded"] == folded
    assert result.skipped == []
    want, got = run(model, feeds), run(new, feeds)
    assert list(got) == list(want)  # same output names
    for k in want:
        assert got[k].shape == want[k].shape
        assert rel_err(want[k], got[k]) < TOL, (k, rel_err(want[k], got[k]))
    return new


def _x(*shape, seed=5):
    return rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv(bias, group):
    r = rng(0)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", r.standard_normal((4, 4 // group, 3, 3)).astype(np.float32))] + \
        ([init("b", r.standard_normal(4).astype(np.float32))] if bias else []) + bn_params("bn", 4)
    m = make_model([helper.make_node("Conv", inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
                    bn_node("c", "y")],
                   [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 4, 5, 5])], inits)
    new = _check_folded(m, {"x": _x(2, 4, 5, 5)})
    assert ops(new) == ["Conv"]
    assert new.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_conv1d():
    inits = [init("w", rng(1).standard_normal((3, 2, 3)).astype(np.float32))] + bn_params("bn", 3)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")],
                   [vi("x", ["N", 2, 7])], [vi("y", ["N", 3, 5])], inits)
    _check_folded(m, {"x": _x(2, 2, 7)})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_conv_transpose(bias, group):
    cin, cout_g = 6, 2
    cout = cout_g * group
    r = rng(2)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", r.standard_normal((cin, cout_g, 3, 3)).astype(np.float32))] + \
        ([init("b", r.standard_normal(cout).astype(np.float32))] if bias else []) + bn_params("bn", cout)
    m = make_model([helper.make_node("ConvTranspose", inputs, ["c"], group=group, strides=[2, 2]),
                    bn_node("c", "y")],
                   [vi("x", ["N", cin, 4, 4])], [vi("y", ["N", cout, 9, 9])], inits)
    _check_folded(m, {"x": _x(2, cin, 4, 4)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "row", "scalar"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm(trans_b, bias, alpha, beta):
    k, n = 6, 5
    r = rng(3)
    w = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = {"none": None, "vector": r.standard_normal(n), "row": r.standard_normal((1, n)),
         "scalar": r.standard_normal(1)}[bias]
    inputs = ["x", "w"] + (["c"] if c is not None else [])
    inits = [init("w", w)] + ([init("c", c.astype(np.float32))] if c is not None else []) + bn_params("bn", n)
    m = make_model([helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=alpha, beta=beta),
                    bn_node("g", "y")],
                   [vi("x", ["N", k])], [vi("y", ["N", n])], inits)
    _check_folded(m, {"x": _x(3, k)})


def test_gemm_trans_a():
    k, n = 4, 3
    inits = [init("w", rng(4).standard_normal((k, n)).astype(np.float32)),
             init("c", rng(5).standard_normal(n).astype(np.float32))] + bn_params("bn", n)
    m = make_model([helper.make_node("Gemm", ["x", "w", "c"], ["g"], transA=1), bn_node("g", "y")],
                   [vi("x", [k, 2])], [vi("y", [2, n])], inits)
    _check_folded(m, {"x": _x(k, 2)})


def test_parameters_behind_identity_are_constants():
    # The torch exporter writes Identity nodes for deduplicated initializers (equal BN biases).
    inits = [init("w", rng(6).standard_normal((3, 2, 1, 1)).astype(np.float32))] + bn_params("bn", 3)
    nodes = [helper.make_node("Identity", ["bn_bias"], ["bn_bias_dup"]),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization",
                              ["c", "bn_scale", "bn_bias_dup", "bn_mean", "bn_var"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 3, 3, 3])], inits)
    _check_folded(m, {"x": _x(1, 2, 3, 3)})


def test_demo_model_folds_every_bn(demo_model, demo_data):
    n_bn = ops(demo_model).count("BatchNormalization")
    assert n_bn == 11
    _check_folded(demo_model, {"image": demo_data["image"][:32]}, folded=n_bn)


# --- refusals ----------------------------------------------------------------------------------


def _conv_bn(extra_nodes=(), extra_outputs=(), bn_attrs=None, opset=17, bn_outputs=("y",),
             bn_inputs=None, graph_inputs=()):
    inits = [init("w", rng(7).standard_normal((3, 2, 3, 3)).astype(np.float32))] + bn_params("bn", 3)
    bn = helper.make_node("BatchNormalization",
                          bn_inputs or ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                          list(bn_outputs), name="bn_node", **(bn_attrs or {}))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn, *extra_nodes]
    outs = [vi("y", ["N", 3, 4, 4])] + list(extra_outputs)
    if graph_inputs:
        inits = [t for t in inits if t.name not in graph_inputs]
    ins = [vi("x", ["N", 2, 4, 4])] + [vi(g, [3]) for g in graph_inputs]
    return make_model(nodes, ins, outs, inits, opset=opset)


def _refused(model, why: str):
    new, result = apply_pass(model, "fold-bn")
    assert not result.changed and result.details["folded"] == 0
    assert [(s.what, s.why) for s in result.skipped] == [("bn_node", result.skipped[0].why)]
    assert why in result.skipped[0].why, result.skipped[0].why
    assert ops(new).count("BatchNormalization") == 1
    return new


def test_refuses_producer_with_two_readers():
    m = _conv_bn(extra_nodes=[helper.make_node("Relu", ["c"], ["z"])],
                 extra_outputs=[vi("z", ["N", 3, 4, 4])])
    new = _refused(m, "other readers")
    feeds = {"x": _x(2, 2, 4, 4)}
    want, got = run(m, feeds), run(new, feeds)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_refuses_producer_output_that_is_a_graph_output():
    m = _conv_bn(extra_outputs=[vi("c", ["N", 3, 4, 4])])
    _refused(m, "other readers")


def test_refuses_training_mode():
    _refused(_conv_bn(bn_attrs={"training_mode": 1}), "training_mode=1")


def test_refuses_training_form_with_running_stat_outputs():
    # Opset 9-13 BatchNormalization: Y, running mean/var, saved mean/var.
    stats = ("rm", "rv", "sm", "sv")
    m = _conv_bn(opset=13, bn_outputs=("y",) + stats, extra_outputs=[vi(s, [3]) for s in stats])
    _refused(m, "training")


def test_refuses_non_constant_parameters():
    _refused(_conv_bn(graph_inputs=("bn_scale",)), "not constant")


def test_refuses_non_foldable_producer():
    inits = bn_params("bn", 3)
    m = make_model([helper.make_node("Relu", ["x"], ["c"]), bn_node("c", "y")],
                   [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])], inits)
    _refused(m, "preceded by Relu")


def test_refuses_bn_on_graph_input():
    m = make_model([bn_node("x", "y")], [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])],
                   bn_params("bn", 3))
    _refused(m, "not produced by a node")


def test_shared_weight_is_not_changed_for_the_other_reader():
    # Two Convs read the same weight; folding into one must not scale the other's.
    inits = [init("w", rng(8).standard_normal((3, 3, 3, 3)).astype(np.float32))] + bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "a"),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])], inits)
    _check_folded(m, {"x": _x(2, 3, 4, 4)})
