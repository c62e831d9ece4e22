"""The activation store (one pass over the data for requests made together, streaming reducers)
and the linear-layer view (im2col rows at sampled positions, weight and bias edits), each checked
against ONNX Runtime's own outputs and plain numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from models import init, make_model, run, vi
from prunec.graph.ir import NameGen, to_onnx
from prunec.graph.linear import PatchMoments, linear_layer
from prunec.runtime.activations import ActivationStore, ChannelMoments, Request, SampledRows, sample_positions

R = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws the same numbers, whatever runs before it."""
    global R
    R = np.random.default_rng(7)


def _f(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return m


def conv_mlp_model() -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv -> Relu -> (c) ; t[N,5,4] -> MatMul -> Relu -> (h, channels last)."""
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu"),
         helper.make_node("MatMul", ["t", "m"], ["h0"], name="mm"),
         helper.make_node("Relu", ["h0"], ["h"], name="relu2")],
        [vi("x", ["N", 3, 6, 6]), vi("t", ["N", 5, 4])], [vi("y", ["N", 8, 6, 6]), vi("h", ["N", 5, 7])],
        [init("w", _f(8, 3, 3, 3)), init("b", _f(8)), init("m", _f(4, 7))])


def test_moments_match_numpy_for_channels_first_and_channels_last_tensors():
    model = conv_mlp_model()
    feeds = {"x": _f(37, 3, 6, 6), "t": _f(37, 5, 4)}
    ref = run(_with_outputs(model, ["c"]), feeds)
    store = ActivationStore(feeds, batch_bytes=4096)  # many small batches: the merge must be exact
    res = store.collect(model, [Request("c", ChannelMoments(1)), Request("h", ChannelMoments(-1))])
    c = res[Request("c", ChannelMoments(1))]
    flat = ref["c"].transpose(1, 0, 2, 3).reshape(8, -1).astype(np.float64)
    np.testing.assert_allclose(c.mean, flat.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c.var, flat.var(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(c.abs_mean, np.abs(flat).mean(1), rtol=1e-5, atol=1e-6)
    h = res[Request("h", ChannelMoments(-1))]
    assert h.mean.shape == (7,)
    np.testing.assert_allclose(h.mean, ref["h"].reshape(-1, 7).mean(0), rtol=1e-5, atol=1e-6)


def test_requests_made_together_take_one_pass_and_are_memoized():
    model = conv_mlp_model()
    feeds = {"x": _f(10, 3, 6, 6), "t": _f(10, 5, 4)}
    store = ActivationStore(feeds)
    reqs = [Request("c", ChannelMoments(1)), Request("y", ChannelMoments(1)), Request("h", ChannelMoments(-1)),
            Request("c", SampledRows(1, 5, 0))]
    first = store.collect(model, reqs)
    assert store.passes == 1
    again = store.collect(model, reqs[:2])
    assert store.passes == 1, "memoized results need no second pass"
    assert again[reqs[0]] is first[reqs[0]]
    store.collect(model, reqs[:1], samples=4)
    assert store.passes == 2, "another sample count is another measurement"
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]) * 2
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    store.collect(other, reqs[:1])
    assert store.passes == 3, "another model is another measurement"


def test_sampled_rows_line_up_across_models_and_batches():
    model = conv_mlp_model()
    feeds = {"x": _f(9, 3, 6, 6), "t": _f(9, 5, 4)}
    rows = ActivationStore(feeds, batch_bytes=1).collect(model, [Request("y", SampledRows(1, 5, 3))])
    got = rows[Request("y", SampledRows(1, 5, 3))]
    y = run(model, feeds)["y"]
    assert list(got.counts) == [5] * 9 and got.values.shape == (45, 8)
    for i in (0, 4, 8):
        pos = sample_positions(36, 5, 3, i)
        np.testing.assert_allclose(got.of_samples(i, 1), y[i].reshape(8, 36)[:, pos].T, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(sample_positions(36, 5, 3, 0), sample_positions(36, 5, 3, 1))


GEOMETRIES = [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0], strides=[2, 1], dilations=[1, 2]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2], group=2),
    dict(auto_pad="SAME_LOWER", strides=[2, 3], group=3),
]


@pytest.mark.parametrize("attrs", GEOMETRIES)
def test_conv_patches_times_matrix_give_the_conv_output_at_the_sampled_positions(attrs):
    g = attrs.get("group", 1)
    w, b = _f(6, 6 // g, 3, 3), _f(6)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", **attrs)],
                       [vi("x", ["N", 6, 7, 9])], [vi("y", ["N", None, None, None])], [init("w", w), init("b", b)])
    x = _f(3, 6, 7, 9)
    y = run(model, {"x": x})["y"]
    graph = gs.import_onnx(model)
    layer = linear_layer(graph.nodes[0], graph)
    p, mats, bias = layer.patches(x, 11, 7, 5), layer.matrices(), layer.bias()
    d = mats.shape[1]
    got = np.concatenate([p[:, k * d:(k + 1) * d] @ mats[k] for k in range(g)], axis=1) + bias
    np.testing.assert_allclose(got, layer.out_rows(y, 11, 7, 5), rtol=1e-4, atol=1e-4)
    assert layer.out_positions(x.shape[1:]) == y.shape[2] * y.shape[3]


def test_gemm_and_matmul_views_and_bias_edits_round_trip():
    wg, cg, wm = _f(5, 4), _f(1, 5), _f(4, 6)
    model = make_model(
        [helper.make_node("Gemm", ["a", "wg", "cg"], ["ga"], name="gemm", transB=0, alpha=0.5, beta=2.0),
         helper.make_node("MatMul", ["t", "wm"], ["y2"], name="mm")],
        [vi("a", ["N", 4]), vi("t", ["N", 3, 4])], [vi("ga", ["N", 5]), vi("y2", ["N", 3, 6])],
        [init("wg", wg.T.copy()), init("cg", cg), init("wm", wm)])
    feeds = {"a": _f(4, 4), "t": _f(4, 3, 4)}
    ref = run(model, feeds)
    graph = gs.import_onnx(model)
    gemm, mm = (linear_layer(n, graph) for n in graph.nodes)
    np.testing.assert_allclose(gemm.patches(feeds["a"], 0, 9, 0) @ gemm.matrices()[0] + gemm.bias(),
                               ref["ga"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm.patches(feeds["t"], 0, 9, 0) @ mm.matrices()[0] + mm.bias(),
                               ref["y2"].reshape(-1, 6), rtol=1e-5, atol=1e-5)
    names = NameGen(graph)
    delta_g, delta_m = _f(5), _f(6)
    gemm.set_matrices(gemm.matrices(), names)
    gemm.add_to_bias(delta_g, names)
    mm.add_to_bias(delta_m, names)  # a bias-less MatMul gets an Add writing its old output
    assert mm.bias_node is not None and mm.out_tensor.name == "y2"
    graph.cleanup().toposort()
    out = run(to_onnx(graph, model), feeds)
    np.testing.assert_allclose(out["ga"], ref["ga"] + delta_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["y2"], ref["y2"] + delta_m, rtol=1e-5, atol=1e-5)


def test_patch_moments_equal_the_second_moment_of_explicit_patches():
    w = _f(4, 3, 3, 3)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", ["N", 4, 5, 5])], [init("w", w)])
    graph = gs.import_onnx(model)
    layer = linear_layer(graph.nodes[0], graph)
    x = _f(6, 3, 5, 5)
    spec = PatchMoments.of(layer, 4, 1)
    stats = ActivationStore({"x": x}, batch_bytes=1).collect(model, [Request("x", spec)])[Request("x", spec)]
    p = layer.patches(x, 0, 4, 1).astype(np.float64)
    assert stats.n == len(p) == 24
    np.testing.assert_allclose(stats.outer[0], p.T @ p, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.second_moment(True)[0], np.cov(p.T, bias=True), rtol=1e-3, atol=1e-4)


def test_a_calibration_mask_keeps_padding_out_of_statistics_and_rows():
    # [N, L, C] hidden states of padded sequences; padding positions hold loud garbage
    model = make_model([helper.make_node("MatMul", ["t", "m"], ["h"], name="mm")],
                       [vi("t", ["N", 6, 4])], [vi("h", ["N", 6, 3])], [init("m", _f(4, 3))])
    t = _f(5, 6, 4)
    lengths = np.array([6, 2, 4, 1, 3])
    mask = np.arange(6)[None] < lengths[:, None]
    t[~mask] = 100.0
    h = run(model, {"t": t})["h"]
    store = ActivationStore({"t": t}, mask=mask)
    reqs = [Request("h", ChannelMoments(-1)), Request("h", SampledRows(-1, 3, 0))]
    res = store.collect(model, reqs)
    real = h[mask]
    np.testing.assert_allclose(res[reqs[0]].mean, real.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res[reqs[0]].var, real.var(0), rtol=1e-4, atol=1e-5)
    rows = res[reqs[1]]
    assert list(rows.counts) == [3, 2, 3, 1, 3]
    assert np.abs(rows.values).max() < 50, "no padding position may be sampled"
    assert all(any(np.allclose(r, x, atol=1e-5) for x in h[i][:lengths[i]])
               for i in range(5) for r in rows.of_samples(i, 1))
