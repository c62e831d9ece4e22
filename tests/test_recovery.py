"""Recovery on the graph: compensation, reconstruction, statistics correction and output-aware
selection. Oracles are ONNX Runtime runs of the models and least squares solved here in numpy,
never the pass's own numbers."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import init, make_model, run, vi
from prunec.graph.compensation import apply_bias_deltas, compensation_deltas, readers_of
from prunec.graph.channels import analyze_channels, kept_indices
from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.passes import Calibration, PassContext, PassManager, build_passes

R = np.random.default_rng(11)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws the same numbers, whatever runs before it."""
    global R
    R = np.random.default_rng(11)


def _f(*shape, scale=1.0):
    return (scale * R.standard_normal(shape)).astype(np.float32)


def _token_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A transformer MLP on [N, T, C] (MatMul + Add bias -> Relu -> MatMul without a bias) and 64
    calibration samples."""
    w1, b1, w2 = _f(6, 12), _f(12, scale=0.5), _f(12, 6)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
         helper.make_node("Add", ["h0", "b1"], ["h1"], name="up_bias"),
         helper.make_node("Relu", ["h1"], ["h"], name="act"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")],
        [vi("x", ["N", 5, 6])], [vi("y", ["N", 5, 6])], [init("w1", w1), init("b1", b1), init("w2", w2)])
    return model, {"x": _f(64, 5, 6)}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def prune(model, passes=("channels",), calib=None, **options):
    """Run passes (channels at ratio 0.5, round 1 unless given) -> (model, report, ctx)."""
    opts: dict = {"channels": {"ratio": "0.5", "round": "1"}}
    for key, value in options.items():
        p, _, k = key.partition("__")
        opts.setdefault(p, {})[k.replace("_", "-")] = str(value)
    opts = {k: v for k, v in opts.items() if k in passes}
    ctx = PassContext(calib=Calibration(calib, "test") if calib is not None else None)
    out, report = PassManager(build_passes(list(passes), opts), ctx=ctx).run(model)
    return out, report, ctx


def details(report, name):
    return next(p.result.details for p in report.passes if p.name == name)


def conv(name, x, w, b=None, y=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y or name], name=name, **attrs)


# ----------------------------------------------------------------------------------------------
# Compensation


def constant_channel_model(pads=0, bn=True):
    """c1 writes 8 channels; 4..7 have all-zero weights (bias only), then BN and Relu, so they are
    constant; c2 reads them. Small biases keep them last by l1."""
    w1 = _f(8, 3, 1, 1, scale=3.0)
    w1[4:] = 0.0
    b1 = _f(8, scale=0.05)
    b1[4:] = [0.3, -0.2, 0.25, 0.1]
    k = 2 * pads + 1
    nodes = [conv("c1", "x", "w1", "b1")]
    w2 = _f(5, 8, k, k)
    w2[:, 4:] *= 0.3
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", _f(5))]
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"], name="bn"))
        inits += [init("g", np.full(8, 1.5, np.float32)), init("be", _f(8, scale=0.1)),
                  init("m", _f(8, scale=0.1)), init("v", np.full(8, 0.7, np.float32))]
    nodes += [helper.make_node("Relu", ["bn" if bn else "c1"], ["r"], name="relu"),
              conv("c2", "r", "w2", "b2", y="y", pads=[pads] * 4)]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5, 6, 6])], inits)


def test_constant_channels_are_compensated_exactly_without_data():
    model = constant_channel_model()
    x = _f(4, 3, 6, 6)
    out, report, _ = prune(model)  # compensate=auto without calibration: the data-free fold
    assert weights(out)["w2"].shape == (5, 4, 1, 1), "the zero-weight channels must be the ones removed"
    comp = details(report, "channels")["compensation"]
    assert comp["channels"] == 4 and comp["border_residual"] is None
    np.testing.assert_allclose(run(out, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    plain, _, _ = prune(model, channels__compensate="none")
    assert np.max(np.abs(run(plain, {"x": x})["y"] - run(model, {"x": x})["y"])) > 0.1


def test_border_residual_of_a_padded_reader_is_measured_and_reported():
    model = constant_channel_model(pads=1, bn=False)
    x = _f(4, 3, 6, 6)
    out, report, _ = prune(model)
    ref, got = run(model, {"x": x})["y"], run(out, {"x": x})["y"]
    err = np.abs(ref - got)
    assert np.max(err[:, :, 1:-1, 1:-1]) < 1e-4, "interior positions see the whole kernel: exact"
    res = details(report, "channels")["compensation"]["border_residual"]
    assert res["reader"] == "c2"
    assert res["max_abs"] == pytest.approx(float(np.max(err)), rel=1e-3)


def test_mean_compensation_keeps_each_readers_mean_output_channels_last():
    # a transformer MLP on [N, T, C]: MatMul + Add bias -> Relu -> MatMul (no bias)
    model, calib = _token_mlp()
    out, report, ctx = prune(model, calib=calib)
    assert ctx.calib_users == ["channels.compensate=mean"]
    assert details(report, "channels")["compensation"]["check"]["kept"] is True
    assert weights(out)["w2"].shape == (6, 6)
    ref, got = run(model, calib)["y"], run(out, calib)["y"]
    # The down projection is linear: its mean output over the calibration data is kept exactly.
    np.testing.assert_allclose(got.reshape(-1, 6).mean(0), ref.reshape(-1, 6).mean(0), atol=1e-4)
    plain, _, _ = prune(model, calib=calib, channels__compensate="none")
    assert np.max(np.abs(run(plain, calib)["y"].reshape(-1, 6).mean(0) - ref.reshape(-1, 6).mean(0))) > 0.05


def test_mean_compensation_that_hurts_the_outputs_is_discarded():
    # hidden neuron 7 fires hugely on token 0 only (a transformer's "massive activation"); its
    # mean, added to every token before a LayerNorm, would wreck the typical tokens
    w1 = np.concatenate([_f(4, 4), np.zeros((4, 4), np.float32)], axis=1)
    w1[:3, 4:7] = _f(3, 3, scale=0.1)
    w1[3, 7] = 1.0
    w2 = np.concatenate([_f(4, 6), _f(4, 6, scale=0.2)])
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
                        helper.make_node("Relu", ["h0"], ["h"], name="act"),
                        helper.make_node("MatMul", ["h", "w2"], ["d"], name="down"),
                        helper.make_node("LayerNormalization", ["d", "g", "b"], ["y"], name="ln", axis=-1)],
                       [vi("x", ["N", 16, 4])], [vi("y", ["N", 16, 6])],
                       [init("w1", w1), init("w2", w2), init("g", np.ones(6, np.float32)),
                        init("b", np.zeros(6, np.float32))])
    x = _f(64, 16, 4)
    x[:, :, 3] = 0.0
    x[:, 0, 3] = 50.0
    calib = {"x": x}
    out, report, _ = prune(model, calib=calib)
    check = details(report, "channels")["compensation"]["check"]
    assert check["kept"] is False and check["output_error_with"] > check["output_error_without"]
    plain, _, _ = prune(model, calib=calib, channels__compensate="none")
    np.testing.assert_allclose(run(out, calib)["y"], run(plain, calib)["y"], rtol=1e-6, atol=1e-6)


def test_bias_deltas_apply_by_name_to_a_masked_copy_of_the_original():
    # The contract with the masked-reference proof: the same deltas on the unpruned graph with
    # the removed channels zeroed at their readers give the pruned model's outputs.
    model = constant_channel_model(bn=False)
    graph = from_onnx(model)
    analysis = analyze_channels(graph)
    group = next(g for g in analysis.groups if not g.frozen)
    removed = set(group.classes[4:])
    readers, _ = readers_of(analysis, removed)
    values = {r.layer.in_tensor.name: np.full(8, 0.5) for r in readers}
    comp = compensation_deltas(readers, values)
    masked = from_onnx(model)
    w2 = next(t for t in masked.tensors().values() if t.name == "w2")
    w = np.array(w2.values)
    w[:, 4:] = 0.0
    w2.values = w
    apply_bias_deltas(masked, comp.deltas)
    kept = kept_indices(analysis, removed)
    from prunec.graph.channels import apply_removal

    apply_removal(analysis, removed)
    apply_bias_deltas(graph, comp.deltas, kept)
    x = _f(3, 3, 6, 6)
    a = run(to_onnx(normalize(masked), model), {"x": x})["y"]
    b = run(to_onnx(normalize(graph), model), {"x": x})["y"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, run(model, {"x": x})["y"], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Reconstruction


def linear_combination_model():
    """c1 (3x3, no bias) writes 8 channels, 4..7 are combinations of 0..3 (smaller, so l1
    removes them); no nonlinearity before the 3x3 padded reader c2: reconstruction can be exact."""
    base = _f(4, 3, 3, 3)
    mix = _f(4, 4, scale=0.15)
    w1 = np.concatenate([base, np.einsum("ij,jkab->ikab", mix, base)]).astype(np.float32)
    return make_model([conv("c1", "x", "w1", pads=[1, 1, 1, 1]), conv("c2", "c1", "w2", "b2", y="y", pads=[1, 1, 1, 1])],
                      [vi("x", ["N", 3, 7, 7])], [vi("y", ["N", 6, 7, 7])],
                      [init("w1", w1), init("w2", _f(6, 8, 3, 3)), init("b2", _f(6))])


def test_reconstruction_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    model = linear_combination_model()
    calib, x = {"x": _f(48, 3, 7, 7)}, _f(5, 3, 7, 7)
    out, report, _ = prune(model, passes=("channels", "reconstruct"), calib=calib, reconstruct__ridge=0)
    assert weights(out)["w2"].shape == (6, 4, 3, 3)
    ref = run(model, {"x": x})["y"]
    np.testing.assert_allclose(run(out, {"x": x})["y"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    fit = details(report, "reconstruct")["fits"][0]
    assert fit["layer"] == "c2" and fit["refit"] and fit["error_after"] < 1e-6
    plain, _, _ = prune(model, calib=calib)
    assert np.max(np.abs(run(plain, {"x": x})["y"] - ref)) > 0.1
    inline, _, _ = prune(model, calib=calib, channels__reconstruct="true")  # the option, default ridge 1e-3
    np.testing.assert_allclose(run(inline, {"x": x})["y"], ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_reconstruction_of_a_matmul_down_projection_is_exact_for_linear_combinations():
    base = _f(6, 4)
    w1 = np.concatenate([base, base @ _f(4, 4, scale=0.1)], axis=1)  # hidden 4..7 combine 0..3
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
         helper.make_node("MatMul", ["h", "w2"], ["y0"], name="down"),
         helper.make_node("Add", ["y0", "b2"], ["y"], name="down_bias")],
        [vi("x", ["N", 5, 6])], [vi("y", ["N", 5, 6])], [init("w1", w1), init("w2", _f(8, 6)), init("b2", _f(6))])
    calib, x = {"x": _f(40, 5, 6)}, _f(3, 5, 6)
    out, report, _ = prune(model, passes=("channels", "reconstruct"), calib=calib, reconstruct__ridge=0)
    assert weights(out)["w2"].shape == (4, 6)
    ref = run(model, {"x": x})["y"]
    np.testing.assert_allclose(run(out, {"x": x})["y"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def chain_model():
    """x -> A -> Relu -> B -> Relu -> C (1x1 convs): A's and B's channels are both prunable."""
    return make_model(
        [conv("A", "x", "wa", "ba"), helper.make_node("Relu", ["A"], ["ra"], name="relu_a"),
         conv("B", "ra", "wb", "bb"), helper.make_node("Relu", ["B"], ["rb"], name="relu_b"),
         conv("C", "rb", "wc", "bc", y="y")],
        [vi("x", ["N", 4, 4, 4])], [vi("y", ["N", 3, 4, 4])],
        [init("wa", _f(8, 4, 1, 1)), init("ba", _f(8, scale=0.3)), init("wb", _f(8, 8, 1, 1)),
         init("bb", _f(8, scale=0.3)), init("wc", _f(3, 8, 1, 1)), init("bc", _f(3))])


def _rows(a):  # [N, C, H, W] -> [N*H*W, C]
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float64)


def _lstsq(x, y):
    xa = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.lstsq(xa, y, rcond=None)[0]


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return m


def test_reconstruction_fits_on_the_pruned_models_own_inputs():
    model = chain_model()
    calib = {"x": _f(32, 4, 4, 4)}
    common = dict(calib=calib, channels__compensate="none", reconstruct__ridge=0, reconstruct__holdout=0)
    out, _, _ = prune(model, passes=("channels", "reconstruct"), reconstruct__layers="^C$", **common)
    plain, _, _ = prune(model, **common)
    # Oracle: C's input as the pruned model computes it, C's output as the original does.
    x_pruned = _rows(run(_with_outputs(plain, ["rb"]), calib)["rb"])
    orig = run(_with_outputs(model, ["rb"]), calib)
    y_orig = _rows(orig["y"])
    expected = _lstsq(x_pruned, y_orig)
    w = weights(out)
    got = np.vstack([w["wc"][:, :, 0, 0].T, w["bc"][None]])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    # The original's own inputs (its kept channels) would give clearly different weights.
    idx = _kept(weights(model)["bb"], weights(plain)["bb"])
    assert np.max(np.abs(_lstsq(_rows(orig["rb"])[:, idx], y_orig) - expected)) > 1e-2


def _kept(full_bias, pruned_bias):
    """Which of the original's channels survive, matched by their (distinct, random) biases."""
    return [int(np.argmin(np.abs(full_bias - b))) for b in pruned_bias]


def test_errors_do_not_compound_each_layer_is_fitted_after_the_ones_before_it():
    model = chain_model()
    calib = {"x": _f(32, 4, 4, 4)}
    common = dict(calib=calib, channels__compensate="none", reconstruct__ridge=0, reconstruct__holdout=0)
    out, report, _ = prune(model, passes=("channels", "reconstruct"), **common)
    assert [f["layer"] for f in details(report, "reconstruct")["fits"]] == ["B", "C"]
    plain, _, _ = prune(model, **common)
    pw, ow = weights(plain), weights(model)
    # Oracle in numpy, layer by layer: fit B on the pruned input, apply it, then fit C.
    x = calib["x"]
    conv1x1 = lambda a, w, b: np.einsum("nchw,oc->nohw", a, w[:, :, 0, 0]) + b[None, :, None, None]  # noqa: E731
    ra = np.maximum(conv1x1(x, pw["wa"], pw["ba"]), 0)
    b_target = conv1x1(np.maximum(conv1x1(x, ow["wa"], ow["ba"]), 0), ow["wb"], ow["bb"])
    wb_full = _lstsq(_rows(ra), _rows(b_target))  # all 8 of B's outputs; fits are per column
    idx = _kept(ow["bb"], pw["bb"])
    wb = wb_full[:, idx]
    rb = np.maximum(np.einsum("nchw,co->nohw", ra, wb[:-1]) + wb[-1][None, :, None, None], 0)
    c_target = run(model, calib)["y"]
    wc = _lstsq(_rows(rb), _rows(c_target))
    w = weights(out)
    np.testing.assert_allclose(np.vstack([w["wb"][:, :, 0, 0].T, w["bb"][None]]), wb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.vstack([w["wc"][:, :, 0, 0].T, w["bc"][None]]), wc, rtol=1e-3, atol=1e-3)


def test_a_fit_worse_on_held_out_samples_is_discarded():
    # 64 unknowns, 20 samples (one row each), no ridge: the fit interpolates noise on 16 samples
    # and does worse than the pruned weights on the 4 held out.
    wa = _f(32, 64)
    model = make_model(
        [helper.make_node("Gemm", ["x", "wa"], ["h"], name="A"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "wb", "bb"], ["y"], name="B")],
        [vi("x", ["N", 32])], [vi("y", ["N", 4])], [init("wa", wa), init("wb", _f(64, 4)), init("bb", _f(4))])
    small = {"x": _f(20, 32)}
    out, report, _ = prune(model, passes=("channels", "reconstruct"), calib=small, channels__ratio=0.1,
                           channels__compensate="none", reconstruct__ridge=0)
    rec = details(report, "reconstruct")
    assert rec["kept_old"] == ["B"] and rec["layers"] == 0
    plain, _, _ = prune(model, calib=small, channels__ratio=0.1, channels__compensate="none")
    np.testing.assert_array_equal(weights(out)["wb"], weights(plain)["wb"])
    # With enough samples the same layer is re-fitted.
    _, report, _ = prune(model, passes=("channels", "reconstruct"), calib={"x": _f(400, 32)}, channels__ratio=0.1,
                         channels__compensate="none", reconstruct__ridge=0)
    assert details(report, "reconstruct")["layers"] == 1


def test_wide_conv_reconstruction_holds_sampled_rows_not_all_patches():
    model = make_model([conv("c1", "x", "w1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"], name="r"),
                        conv("c2", "r", "w2", "b2", y="y", pads=[1, 1, 1, 1])],
                       [vi("x", ["N", 4, 64, 64])], [vi("y", ["N", 4, 64, 64])],
                       [init("w1", _f(64, 4, 3, 3)), init("b1", _f(64)), init("w2", _f(4, 64, 3, 3, scale=0.1)),
                        init("b2", _f(4))])
    calib = {"x": _f(32, 4, 64, 64)}
    full_patches = 32 * 64 * 64 * 32 * 9 * 4  # every im2col row of c2 after pruning: 151 MB
    graph = from_onnx(model)
    ctx = PassContext(calib=Calibration(calib, "test"))
    passes = build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "1", "compensate": "none"}})
    pruned, _ = PassManager(passes, ctx=ctx, verify=False).run(model)
    from prunec.passes.reconstruct import ReconstructOptions, reconstruct_layers

    graph = from_onnx(pruned)
    ctx.baseline = model
    tracemalloc.start()
    try:
        res = reconstruct_layers(graph, ctx, ReconstructOptions(positions=16, batch=8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.details["fits"][0]["rows"] == 32 * 16
    assert peak < full_patches / 3, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# One pass over the data for what is requested together


def test_channels_collects_selection_and_compensation_statistics_in_one_pass():
    model = chain_model()
    calib = {"x": _f(16, 4, 4, 4)}
    _, report, ctx = prune(model, calib=calib, channels__importance="reconstruction")
    assert details(report, "channels")["calibration_passes"] == 1
    assert ctx.activations.passes == 1
    assert ctx.calib_users == ["channels.importance=reconstruction", "channels.compensate=mean"]


# ----------------------------------------------------------------------------------------------
# Statistics correction


def bn_chain_model():
    return make_model(
        [conv("A", "x", "wa"), helper.make_node("BatchNormalization", ["A", "ga", "ba", "ma", "va"], ["an"], name="bn_a"),
         helper.make_node("Relu", ["an"], ["ra"], name="relu_a"),
         conv("B", "ra", "wb"), helper.make_node("BatchNormalization", ["B", "gb", "bb", "mb", "vb"], ["bn"], name="bn_b"),
         helper.make_node("Relu", ["bn"], ["rb"], name="relu_b"), conv("C", "rb", "wc", y="y")],
        [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 3, 5, 5])],
        [init("wa", _f(8, 4, 1, 1)), init("wb", _f(6, 8, 1, 1)), init("wc", _f(3, 6, 1, 1))]
        + [init(f"{p}{s}", v) for s, n in (("a", 8), ("b", 6)) for p, v in
           (("g", R.uniform(0.5, 2, n).astype(np.float32)), ("b", _f(n)), ("m", _f(n)),
            ("v", R.uniform(0.5, 2, n).astype(np.float32)))])


@pytest.mark.parametrize("fold", [False, True])
def test_recalibrate_matches_the_originals_pre_activation_statistics(fold):
    model = bn_chain_model()
    calib = {"x": _f(64, 4, 5, 5)}
    passes = ("fold-bn", "channels", "recalibrate") if fold else ("channels", "recalibrate")
    opts = {"channels__compensate": "none", "channels__protect": "^B$"}
    out, report, _ = prune(model, passes=passes, calib=calib, **opts)
    rec = details(report, "recalibrate")
    assert rec["layers"] >= 1 and rec["batchnorms"] == (0 if fold else 1)
    # B lost input channels: its pre-activation (BN output) must match the original's per channel.
    ref = run(_with_outputs(model, ["bn"]), calib)["bn"]
    got = run(_with_outputs(out, ["bn"]), calib)["bn"]
    np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), ref.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(got.std(axis=(0, 2, 3)), ref.std(axis=(0, 2, 3)), rtol=1e-3)
    plain, _, _ = prune(model, passes=passes[:-1], calib=calib, **opts)
    drift = run(_with_outputs(plain, ["bn"]), calib)["bn"].mean(axis=(0, 2, 3)) - ref.mean(axis=(0, 2, 3))
    assert np.max(np.abs(drift)) > 0.05


# ----------------------------------------------------------------------------------------------
# Output-aware selection


def test_reconstruction_importance_removes_the_channels_the_reader_ignores():
    # channels 0..3: big producer weights, but the reader barely reads them; 4..7: the opposite
    # (no activation in between, so no channel is silent by chance).
    r = np.random.default_rng(5)
    f = lambda *shape, scale=1.0: (scale * r.standard_normal(shape)).astype(np.float32)  # noqa: E731
    w1 = np.concatenate([f(4, 4, 1, 1, scale=5.0), f(4, 4, 1, 1, scale=0.5)])
    w2 = np.concatenate([f(3, 4, 1, 1, scale=0.01), f(3, 4, 1, 1)], axis=1)
    model = make_model([conv("c1", "x", "w1", "b1"), conv("c2", "c1", "w2", "b2", y="y")],
                       [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 3, 5, 5])],
                       [init("w1", w1), init("b1", f(8, scale=0.1)), init("w2", w2), init("b2", f(3))])
    calib, x = {"x": f(32, 4, 5, 5)}, f(8, 4, 5, 5)
    by_output, _, _ = prune(model, calib=calib, channels__importance="reconstruction")
    by_l1, _, _ = prune(model, calib=calib, channels__importance="l1")
    np.testing.assert_allclose(weights(by_output)["w1"], w1[4:])
    np.testing.assert_allclose(weights(by_l1)["w1"], w1[:4])
    ref = run(model, {"x": x})["y"]
    err = lambda m: float(np.abs(run(m, {"x": x})["y"] - ref).max())  # noqa: E731
    assert err(by_output) < 0.5 * err(by_l1)


def test_activation_importance_works_on_channels_last_matmul_outputs():
    w1 = _f(6, 8)
    w1[:, 4:] *= 0.01  # hidden 4..7 are near-silent on the data...
    w2 = np.concatenate([_f(4, 6), _f(4, 6, scale=30.0)])  # ...and large readers make l1 keep them
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
                        helper.make_node("Relu", ["h"], ["r"], name="act"),
                        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")],
                       [vi("x", ["N", 5, 6])], [vi("y", ["N", 5, 6])], [init("w1", w1), init("w2", w2)])
    out, _, _ = prune(model, calib={"x": _f(16, 5, 6)}, channels__importance="activation")
    np.testing.assert_allclose(weights(out)["w1"], w1[:, :4])
    l1, _, _ = prune(model, channels__importance="l1")
    np.testing.assert_allclose(weights(l1)["w1"], w1[:, 4:])


# ----------------------------------------------------------------------------------------------
# The command line


def test_run_with_calib_reports_an_independent_gate_and_data_alone_says_it_is_not(prunec_cli, tmp_path, demo_path):
    from models import REPO

    train, test = REPO / "models" / "demo_digits_train.npz", REPO / "models" / "demo_digits_test.npz"
    common = ["run", demo_path, "--passes", "fold-bn,cleanup,channels,reconstruct", "-O", "channels.ratio=0.3",
              "-O", "reconstruct.samples=64", "--no-profile", "--max-drop", "100"]
    r = prunec_cli(*common, "--calib", train, "--calib-samples", "200", "--data", test, "-o", tmp_path / "a.onnx",
                   "--report", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "a.json").read_text())["calibration"]
    views = cal.pop("views")  # 200 clean + 200 corrupted views (issue 19's default for images)
    assert cal == {"source": str(train), "samples": 400, "independent": True,
                   "used_by": ["channels.compensate=mean", "reconstruct"]}
    assert views.startswith("calibration views: 200 clean (weight 0.50) + 200 corrupted")
    assert "not independent" not in r.output
    assert "calibration: 400 samples of" in " ".join(r.output.split())
    r = prunec_cli(*common, "--data", test, "-o", tmp_path / "b.onnx", "--report", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "b.json").read_text())["calibration"]
    assert cal["independent"] is False and cal["used_by"] == ["reconstruct"]
    assert "not independent" in " ".join(r.output.split())


def test_bad_calibration_input_is_a_one_line_error(prunec_cli, tmp_path, demo_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros((3, 1, 8, 8), np.float32))
    r = prunec_cli("run", demo_path, "--passes", "channels", "--calib", bad, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2
    assert "--calib" in prunec_cli.one_line_error(r)
    r = prunec_cli("run", demo_path, "--passes", "channels,reconstruct", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2
    assert "reconstruct needs calibration data" in prunec_cli.one_line_error(r)


def test_calibration_images_need_no_labels_csv(tmp_path):
    from PIL import Image

    from prunec.eval.data import Preprocess, load_calibration

    for i in range(3):
        Image.fromarray((R.random((10, 12)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", 1, 8, 8])], [vi("y", ["N", 1, 8, 8])])
    data = load_calibration(tmp_path, model, preprocess=Preprocess(grayscale=True))
    assert data.inputs["x"].shape == (3, 1, 8, 8) and data.labels is None


def test_targets_can_come_from_other_inputs_than_the_pruned_models():
    # e.g. corrupted calibration inputs for the pruned model, clean ones for the original's targets
    model = chain_model()
    clean = _f(32, 4, 4, 4)
    noisy = clean + _f(32, 4, 4, 4, scale=0.3)
    ctx = PassContext(calib=Calibration({"x": noisy}, "test", targets={"x": clean}))
    opts = {"channels": {"ratio": "0.5", "round": "1", "compensate": "none"},
            "reconstruct": {"layers": "^C$", "ridge": "0", "holdout": "0"}}
    out, _ = PassManager(build_passes(["channels", "reconstruct"], opts), ctx=ctx).run(model)
    plain, _, _ = prune(model, channels__compensate="none")
    x_noisy = _rows(run(_with_outputs(plain, ["rb"]), {"x": noisy})["rb"])
    y_clean = _rows(run(model, {"x": clean})["y"])
    w = weights(out)
    np.testing.assert_allclose(np.vstack([w["wc"][:, :, 0, 0].T, w["bc"][None]]), _lstsq(x_noisy, y_clean),
                               rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# What the masked-original proof covers


def test_compensated_pruning_is_proven_against_the_masked_original_with_the_same_deltas():
    # The MatMul reader has no bias: compensation adds one (an Add node) in the pruned model and
    # in the proof's reference alike, so the proof holds exactly and says what it compared to.
    model, calib = _token_mlp()
    _, report, _ = prune(model, calib=calib)
    rec = next(p for p in report.passes if p.name == "channels")
    assert rec.result.details["compensation"]["check"]["kept"] is True
    assert rec.verification.proof is not None
    assert rec.verification.proof.what == "masked original + compensation"
    assert rec.verification.proof.max_rel < 1e-4
    # Without compensation the reference is the plain masked original.
    _, report, _ = prune(model, calib=calib, channels__compensate="none")
    assert next(p for p in report.passes if p.name == "channels").verification.proof.what == "masked original"


def test_inline_reconstruction_is_reported_as_measured_not_proven():
    model = linear_combination_model()
    _, report, _ = prune(model, calib={"x": _f(48, 3, 7, 7)}, channels__reconstruct="true")
    rec = next(p for p in report.passes if p.name == "channels")
    assert rec.verification.proof is None
    assert rec.result.details["proof"].startswith("none: reconstruction refits kept weights")
    assert rec.result.details["reconstruct"]["layers"] >= 1
