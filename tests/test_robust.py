"""Robust recovery (issue 19): corrupted calibration views, the objective over views, and the
gate and summary on corrupted slices. Oracles are ONNX Runtime runs and numpy least squares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import init, make_model, run, vi
from prunec.eval.calib_views import add_views, schedule, view_weights
from prunec.eval.data import EvalData
from prunec.eval.gate import Evaluator, GateThresholds
from prunec.passes import Calibration, PassContext, PassManager, build_passes
from prunec.report.robust import robustness_lines, worst_slice


def smooth_images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """Affine images a + b*i + c*j in [0, 1]: a Laplacian of them is exactly zero."""
    r = np.random.default_rng(seed)
    i, j = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    b, c = r.uniform(-0.3, 0.3, (2, n, 1, 1))
    a = r.uniform(0.3, 0.7, (n, 1, 1))
    return np.clip(a + b * (i - 0.5) + c * (j - 0.5), 0, 1)[:, None].astype(np.float32)


def noise_channel_model() -> onnx.ModelProto:
    """Conv A (3x3, no padding) -> Relu -> Conv B (1x1) -> GAP -> Flatten -> logits [N, 2].

    A's channel 0 is a Laplacian minus 0.05: zero on affine (clean) images, large on noisy ones;
    it alone drives logit 1. Channels 1-3 are smoothing filters; channel 3 matters least (weight
    0.1 in B). So a reader-error selection removes channel 0 when it sees only clean inputs, and
    channel 3 when it also sees noisy ones."""
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
    box = np.full((3, 3), 1 / 9, np.float32)
    center = np.zeros((3, 3), np.float32)
    center[1, 1] = 1
    wa = np.stack([lap, box, center, 0.5 * box + 0.5 * center])[:, None]  # [4, 1, 3, 3]
    ba = np.array([-0.05, 0, 0, 0], np.float32)
    wb = np.array([[0, 1, 1, 0.1], [8, 0, 0, 0]], np.float32)[:, :, None, None]
    bb = np.array([0, 0.85], np.float32)
    nodes = [helper.make_node("Conv", ["image", "wa", "ba"], ["a"], name="convA"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="convB"),
             helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    return make_model(nodes, [vi("image", ["N", 1, 8, 8])], [vi("logits", ["N", 2])],
                      [init("wa", wa), init("ba", ba), init("wb", wb), init("bb", bb)])


def prune_with(model, calib: Calibration, passes=("channels",), size=8, **opts):
    options = {"channels": {"ratio": "0.25", "round": "1", "importance": "reconstruction"}}
    for key, value in opts.items():
        p, _, k = key.partition("__")
        options.setdefault(p, {})[k.replace("_", "-")] = str(value)
    ctx = PassContext(input_shapes={"image": (1, 1, size, size)}, calib=calib)
    return PassManager(build_passes(list(passes), options), ctx=ctx).run(model)[0]


def kept_convA(pruned: onnx.ModelProto) -> np.ndarray:
    """Which of the original convA's 4 filters survive (matched by value)."""
    wa = numpy_helper.to_array(next(t for t in noise_channel_model().graph.initializer if t.name == "wa"))
    now = numpy_helper.to_array(next(t for t in pruned.graph.initializer
                                     if numpy_helper.to_array(t).shape[1:] == (1, 3, 3)))
    return np.array([k for k in range(4) if any(np.allclose(wa[k], w) for w in now)])


def test_a_channel_only_needed_under_noise_is_kept_with_corrupted_views_and_lost_without():
    model = noise_channel_model()
    clean = Calibration({"image": smooth_images(64, seed=0)}, "test")
    # Precondition: channel 0 is silent on every clean sample.
    silent = helper.make_model(model.graph, opset_imports=model.opset_import)
    silent.graph.output.append(vi("r", None))
    assert np.abs(run(silent, clean.inputs)["r"][:, 0]).max() == 0

    without = prune_with(model, clean)
    assert 0 not in kept_convA(without) and len(kept_convA(without)) == 3

    views = add_views(Calibration({"image": smooth_images(64, seed=0)}, "test"), model,
                      corruptions="gaussian_noise", fraction=0.5)
    with_views = prune_with(model, views)
    assert list(kept_convA(with_views)) == [0, 1, 2]

    # And it matters: on noisy images the model that lost channel 0 disagrees with the original.
    noisy = np.clip(smooth_images(200, seed=5) + np.random.default_rng(1).normal(0, 0.1, (200, 1, 8, 8)),
                    0, 1).astype(np.float32)
    ref = run(model, {"image": noisy})["logits"].argmax(1)
    assert (run(with_views, {"image": noisy})["logits"].argmax(1) == ref).mean() > \
        (run(without, {"image": noisy})["logits"].argmax(1) == ref).mean() + 0.2


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_views_weigh_as_stated_in_the_reconstruction_objective(fraction):
    """reconstruct (no ridge, no hold-out) must give the minimizer of
    (1 - f) * mean clean error + f * mean corrupted error, with f the stated fraction."""
    r = np.random.default_rng(3)
    wa = r.standard_normal((16, 6)).astype(np.float32)
    wb = r.standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wa"], ["h"], name="gemmA"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "wb"], ["y"], name="gemmB")]
    model = make_model(nodes, [vi("image", ["N", 1, 4, 4])], [vi("y", ["N", 3])],
                       [init("wa", wa), init("wb", wb)])
    x = r.uniform(0, 1, (30, 1, 4, 4)).astype(np.float32)
    calib = add_views(Calibration({"image": x}, "test"), model, fraction=fraction)
    corrupted = calib.views != "clean"
    assert corrupted.mean() == pytest.approx(fraction)
    assert view_weights(calib)["clean"] == pytest.approx(1 - fraction)
    assert "weight" in calib.note and f"{fraction:.2f}" in calib.note

    pruned = prune_with(model, calib, passes=("channels", "reconstruct"), size=4, channels__ratio=0.5,
                        channels__importance="l1", channels__compensate="none",
                        reconstruct__ridge=0, reconstruct__holdout=0)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    wa_p = next(v for v in w.values() if v.shape == (16, 3))
    kept = [k for k in range(6) if any(np.allclose(wa[:, k], wa_p[:, j]) for j in range(3))]
    assert len(kept) == 3

    def rows(images):
        h = np.maximum(images.reshape(len(images), -1) @ wa, 0)
        return np.hstack([h[:, kept], np.ones((len(h), 1))]), h @ wb

    xc, yc = rows(x)
    xv, yv = rows(calib.inputs["image"][corrupted])
    # Weighted normal equations with the stated weights, per row: (1-f)/n_clean, f/n_corrupted.
    wc, wv = (1 - fraction) / len(xc), fraction / len(xv)
    a = wc * xc.T @ xc + wv * xv.T @ xv
    b = wc * xc.T @ yc + wv * xv.T @ yv
    expected = np.linalg.solve(a, b)
    got = run(pruned, {"image": np.concatenate([x, calib.inputs["image"][corrupted]])})["y"]
    want = np.vstack([xc, xv]) @ expected
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # Not the clean-only fit: the corrupted views changed the answer.
    clean_only = np.linalg.lstsq(xc, yc, rcond=None)[0]
    assert np.abs(np.vstack([xc, xv]) @ clean_only - want).max() > 1e-2


def test_views_are_interleaved_so_any_prefix_has_the_stated_mix():
    where = schedule(100, 0.5)
    assert where.sum() == 100 and len(where) == 200
    assert 0.45 <= where[:40].mean() <= 0.55
    assert schedule(10, 0.0).sum() == 0


def test_non_image_inputs_get_a_note_and_no_views():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="g")]
    model = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 2])], [init("w", np.ones((4, 2), np.float32))])
    calib = add_views(Calibration({"x": np.ones((8, 4), np.float32)}, "t"), model)
    assert calib.n == 8 and calib.views is None
    assert "no 4-D image input" in calib.note


def test_gate_fails_on_a_corrupted_slice_drop_and_the_summary_names_it():
    model = noise_channel_model()
    pruned = prune_with(model, Calibration({"image": smooth_images(64, seed=0)}, "test"))
    data = EvalData({"image": smooth_images(200, seed=7)}, None)
    ev = Evaluator(model, data, corruptions=["gaussian_noise", "contrast"], severities=[3])
    report = ev.compare(pruned, GateThresholds(max_drop=1.0))
    by_name = {s.name: s for s in report.slices}
    assert by_name["all"].status == "pass" and by_name["all"].drop.value == 0
    assert by_name["gaussian_noise@3"].status == "fail"
    assert "gaussian_noise@3" in [s.name for s in report.failed]
    assert worst_slice(report).name == "gaussian_noise@3"
    lines = robustness_lines(report)
    assert lines[-1].startswith("worst slice: gaussian_noise@3")
    assert any(line.strip().startswith("clean") for line in lines)
    assert any(line.strip().startswith("contrast@3") for line in lines)


def test_sensitivity_drop_is_the_worst_gated_slice_not_only_the_clean_one():
    from prunec.eval.sensitivity import sensitivity

    model = noise_channel_model()
    data = EvalData({"image": smooth_images(120, seed=7)}, None)
    ev = Evaluator(model, data, corruptions=["gaussian_noise"], severities=[3])
    ctx = PassContext(input_shapes={"image": (1, 1, 8, 8)},
                      calib=Calibration({"image": smooth_images(64, seed=0)}, "test"))
    rep = sensitivity(model, ev, [0.25], ctx=ctx, options={"importance": "reconstruction", "round": 1})
    (trial,) = [t for g in rep.groups for t in g.trials]
    assert trial.metric == 100.0 and trial.drops["clean"] == 0  # clean: the noise channel is silent
    assert trial.worst == "gaussian_noise@3" and trial.drop == trial.drops["gaussian_noise@3"] > 5


def test_run_states_robustness_and_fails_naming_the_corrupted_slice(prunec_cli, tmp_path):
    model_path, calib, data = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "data.npz"
    onnx.save(noise_channel_model(), model_path)
    np.savez(calib, image=smooth_images(64, seed=0))
    np.savez(data, image=smooth_images(120, seed=7))
    common = ["run", model_path, "--passes", "channels", "-O", "channels.ratio=0.25", "-O", "channels.round=1",
              "-O", "channels.importance=reconstruction", "--calib", calib, "--data", data,
              "--corruptions", "gaussian_noise", "--max-drop", "5", "--no-profile", "-o", tmp_path / "p.onnx"]
    r = prunec_cli(*common, "--calib-corruptions", "none")
    assert r.exit_code == 3
    text = " ".join(r.output.split())
    assert "worst slice: gaussian_noise@3" in text and "gaussian_noise@3" in r.output.splitlines()[-1]
    assert "calibration views: clean only" not in text  # nothing written: no run summary
    r = prunec_cli(*common, "--calib-corruptions", "gaussian_noise")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "robustness (agreement %, original → pruned):" in text and "worst slice:" in text
    assert "calibration views: 64 clean (weight 0.50) + 64 corrupted" in text
