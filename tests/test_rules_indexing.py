"""Channel rules of the indexing and recurrent families (rules/indexing.py, rules/recurrent.py),
each on its own small model: channels are zeroed by hand (never by the analysis under test), the
model is pruned at ratio 0.5, and the outputs and exact weight shapes are checked."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper
from test_channels_rules import _w, assert_same, conv, inits_of, make_model, prune, zero

X = np.random.default_rng(5).standard_normal((2, 4, 6, 6)).astype(np.float32)
ODD = [1, 3, 5, 7]


def _c1_c2(middle, w2_cols: int, mid_shape=None, w2_zero=None, x_shape=("N", 4, 6, 6), y_shape=None):
    """x -> c1 (8 ch, odd ones zeroed) -> middle nodes ("c1" -> "m") -> c2 (3 x w2_cols) -> y."""
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(3, w2_cols, 1, 1)}
    zero(inits, "w1", 0, ODD)
    zero(inits, "w2", 1, w2_zero if w2_zero is not None else ODD)
    nodes = [conv("c1", "x", "w1"), *middle, conv("c2", "m", "w2", y="y")]
    return make_model(nodes, inits, list(x_shape), y_shape or ["N", 3, 6, 6]), inits


def _shapes(model):
    return {k: v.shape for k, v in inits_of(model).items()}


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def test_gather_on_a_spatial_axis_passes_channels():
    m, _ = _c1_c2([_const("i", np.array([0, 2, 4], np.int64)),
                   helper.make_node("Gather", ["c1", "i"], ["m"], axis=2)], 8, y_shape=["N", 3, 3, 6])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["w2"] == (3, 4, 1, 1)
    assert_same(m, out, X)


def test_gather_on_the_channel_axis_freezes():
    m, _ = _c1_c2([_const("i", np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int64)),
                   helper.make_node("Gather", ["c1", "i"], ["m"], axis=1)], 8)
    out, res = prune(m)
    assert _shapes(out)["w1"][0] == 8
    assert any("picks channels by index" in s.why for s in res.skipped)


def test_gather_elements_slices_its_constant_indices_with_the_channels():
    idx = np.random.default_rng(1).integers(0, 6, (2, 8, 6, 6)).astype(np.int64)
    m, _ = _c1_c2([_const("i", idx), helper.make_node("GatherElements", ["c1", "i"], ["m"], axis=3)], 8,
                  x_shape=(2, 4, 6, 6), y_shape=[2, 3, 6, 6])
    # Constant nodes are folded into initializers by the pass; the indices are sliced as a site.
    out, _ = prune(m)
    s = _shapes(out)
    assert s["w1"][0] == 4 and s["w2"] == (3, 4, 1, 1)
    assert [v for k, v in s.items() if v[:1] == (2,)] == [(2, 4, 6, 6)]
    assert_same(m, out, X)


def test_expand_of_a_pooled_gate_rewrites_its_target_shape():
    m, _ = _c1_c2([helper.make_node("GlobalAveragePool", ["c1"], ["p"]),
                   _const("s", np.array([1, 8, 6, 6], np.int64)),
                   helper.make_node("Expand", ["p", "s"], ["m"])], 8)
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["w2"] == (3, 4, 1, 1)
    assert_same(m, out, X)


def test_tile_on_the_channel_axis_repeats_channels():
    m, _ = _c1_c2([_const("r", np.array([1, 2, 1, 1], np.int64)),
                   helper.make_node("Tile", ["c1", "r"], ["m"])], 16, w2_zero=ODD + [8 + i for i in ODD])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["w2"] == (3, 8, 1, 1)
    assert_same(m, out, X)


@pytest.mark.parametrize("mode,zeroed", [("DCR", [1, 3, 5, 7]), ("CRD", [4, 5, 6, 7])])
def test_depth_to_space_removes_a_block_of_input_channels_per_output_channel(mode, zeroed):
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(3, 2, 1, 1)}
    zero(inits, "w1", 0, zeroed)
    zero(inits, "w2", 1, [1])   # output channel 1 of the 2 after DepthToSpace(2)
    nodes = [conv("c1", "x", "w1"), helper.make_node("DepthToSpace", ["c1"], ["m"], blocksize=2, mode=mode),
             conv("c2", "m", "w2", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 12, 12])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["w2"] == (3, 1, 1, 1)
    assert_same(m, out, X)


def test_space_to_depth_repeats_each_channel_once_per_block_position():
    inits = {"w1": _w(4, 4, 1, 1), "w2": _w(3, 16, 1, 1)}
    zero(inits, "w1", 0, [1, 3])
    zero(inits, "w2", 1, [k * 4 + c for k in range(4) for c in (1, 3)])
    nodes = [conv("c1", "x", "w1"), helper.make_node("SpaceToDepth", ["c1"], ["m"], blocksize=2),
             conv("c2", "m", "w2", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 3, 3])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 2 and _shapes(out)["w2"] == (3, 8, 1, 1)
    assert_same(m, out, X)


@pytest.mark.parametrize("axis,prunes", [(2, True), (1, False)])
def test_cumsum_prunes_along_other_axes_and_freezes_across_channels(axis, prunes):
    m, _ = _c1_c2([_const("a", np.array(axis, np.int64)), helper.make_node("CumSum", ["c1", "a"], ["m"])], 8)
    out, res = prune(m)
    assert _shapes(out)["w1"][0] == (4 if prunes else 8)
    if not prunes:
        assert any("CumSum" in s.why and "accumulates" in s.why for s in res.skipped)
    assert_same(m, out, X)


def test_topk_and_argmax_on_spatial_axes_pass_channels():
    m, _ = _c1_c2([_const("k", np.array([2], np.int64)),
                   helper.make_node("TopK", ["c1", "k"], ["v", "i"], axis=3),
                   helper.make_node("ArgMax", ["c1"], ["am"], axis=3, keepdims=1),
                   helper.make_node("Cast", ["am"], ["amf"], to=1),
                   helper.make_node("Mul", ["v", "amf"], ["m"])], 8, y_shape=["N", 3, 6, 2])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["w2"] == (3, 4, 1, 1)
    assert_same(m, out, X)


def test_topk_across_channels_freezes():
    m, _ = _c1_c2([_const("k", np.array([8], np.int64)),
                   helper.make_node("TopK", ["c1", "k"], ["m", "i"], axis=1)], 8)
    out, res = prune(m)
    assert _shapes(out)["w1"][0] == 8 and any("TopK" in s.why for s in res.skipped)


def test_einsum_contracting_the_channel_axis_reads_it_through_its_constant_operand():
    inits = {"w1": _w(8, 4, 1, 1), "we": _w(3, 8)}
    zero(inits, "w1", 0, ODD)
    zero(inits, "we", 1, ODD)
    nodes = [conv("c1", "x", "w1"), helper.make_node("Einsum", ["c1", "we"], ["y"], equation="nchw,dc->ndhw")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["we"] == (3, 4)
    assert_same(m, out, X)


def test_einsum_moving_the_channel_axis_passes_channels():
    inits = {"w1": _w(8, 4, 1, 1), "wm": _w(8, 3)}
    zero(inits, "w1", 0, ODD)
    zero(inits, "wm", 0, ODD)
    nodes = [conv("c1", "x", "w1"), helper.make_node("Einsum", ["c1"], ["t"], equation="nchw->nhwc"),
             helper.make_node("MatMul", ["t", "wm"], ["y"])]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 6, 6, 3])
    out, _ = prune(m)
    assert _shapes(out)["w1"][0] == 4 and _shapes(out)["wm"] == (4, 3)
    assert_same(m, out, X)


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_layers_read_input_channels_and_keep_their_hidden_units(op, gates):
    h = 5
    inits = {"w1": _w(8, 4, 1, 1), "W": _w(1, gates * h, 8), "R": _w(1, gates * h, h),
             "sq": np.array([2], np.int64), "perm_shape": np.array([0, 8, 36], np.int64)}
    zero(inits, "w1", 0, ODD)
    zero(inits, "W", 2, ODD)
    nodes = [conv("c1", "x", "w1"), helper.make_node("Reshape", ["c1", "perm_shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),      # [T=36, N, 8]
             helper.make_node(op, ["t", "W", "R"], ["seq", "y"], hidden_size=h)]
    m = make_model(nodes, inits, [2, 4, 6, 6], [1, 2, h])
    out, _ = prune(m)
    s = _shapes(out)
    assert s["w1"][0] == 4 and s["W"] == (1, gates * h, 4) and s["R"] == (1, gates * h, h)
    assert_same(m, out, X)
