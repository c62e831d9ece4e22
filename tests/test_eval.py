"""Tests for prunec.eval (data, slices, corruptions, metrics, gate) and `prunec check` / `run --data`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.errors import DataError, GateFailure, OptionError
from prunec.eval.corruptions import CORRUPTIONS, blur, corrupt, pixelate
from prunec.eval.data import EvalData, load_npz
from prunec.eval.gate import Evaluator, GateThresholds, evaluate_gate, parse_slice_max_drop
from prunec.eval.metrics import (agreement, bootstrap_ci, cosine, estimate, relative_error,
                                 topk_correct)
from prunec.eval.slices import class_slices, length_slices, user_slices
from prunec.runtime.inputs import graph_inputs


# ---------------------------------------------------------------- tiny models

def gemm_classifier(weight: np.ndarray, *, batch="N") -> onnx.ModelProto:
    """logits = x @ weight: with weight = identity the predicted class is the largest feature."""
    d, c = weight.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "clf", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def image_classifier(bias: tuple[float, float] = (0.0, 0.0)) -> onnx.ModelProto:
    """(N,1,8,8) image -> 2 logits: [mean of left half, mean of right half] + bias (a Conv)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    mask = np.zeros((2, 1, 8, 8), np.float32)
    mask[0, 0, :, :4] = 1 / 32
    mask[1, 0, :, 4:] = 1 / 32
    nodes = [helper.make_node("Conv", ["image", "Wc", "Bc"], ["c"]),
             helper.make_node("Flatten", ["c"], ["logits"])]
    inits = [numpy_helper.from_array(mask, "Wc"), numpy_helper.from_array(np.array(bias, np.float32), "Bc")]
    g = helper.make_graph(nodes, "img", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


SWAP = np.eye(4)[[0, 1, 3, 2]]  # the candidate confuses classes 2 and 3 entirely


@pytest.fixture(scope="session")
def clf_files(tmp_path_factory):
    """Original (identity), a candidate wrong on classes 2 and 3, and data with 100 samples of class 0..3."""
    d = tmp_path_factory.mktemp("clf")
    onnx.save(gemm_classifier(np.eye(4)), d / "orig.onnx")
    onnx.save(gemm_classifier(SWAP), d / "bad.onnx")
    rng = np.random.default_rng(0)
    # class counts: 0 -> 150, 1 -> 150, 2 -> 40, 3 -> 60. Features: one-hot-ish so identity is 100% right.
    labels = np.repeat([0, 1, 2, 3], [150, 150, 40, 60])
    x = rng.uniform(0, 0.5, size=(400, 4)).astype(np.float32)
    x[np.arange(400), labels] += 1.0
    np.savez(d / "data.npz", x=x, labels=labels, slice_source=np.where(np.arange(400) % 2, "a", "b"))
    return d


def cli_run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


# ---------------------------------------------------------------- data

def test_npz_loads_and_casts(clf_files):
    m = gemm_classifier(np.eye(4))
    data = load_npz(clf_files / "data.npz", m)
    assert data.n == 400 and data.inputs["x"].dtype == np.float32
    assert set(data.slices) == {"source"} and data.labels.shape == (400,)


@pytest.mark.parametrize("arrays, needle", [
    ({"y": np.zeros((3, 4), np.float32)}, "neither model inputs"),
    ({"x": np.zeros((3, 5), np.float32)}, "axis 1 must be 4"),
    ({"x": np.zeros((3, 4, 1), np.float32)}, "rank 3"),
    ({"x": np.zeros((3, 4), bool)}, "dtype bool"),
    ({"x": np.zeros((3, 4), np.float32), "labels": np.zeros(2, np.int64)}, "labels has 2 entries"),
    ({"x": np.zeros((3, 4), np.float32), "labels": np.zeros(3, np.float32)}, "labels must be integers"),
])
def test_npz_mismatch_is_a_data_error(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=needle):
        load_npz(tmp_path / "d.npz", gemm_classifier(np.eye(4)))


def test_image_folder_preprocessing(tmp_path):
    from PIL import Image

    img = np.zeros((16, 16), np.uint8)
    img[:, 8:] = 255  # right half white
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(255 - img).save(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("file,label,site\na.png,1,x\nb.png,0,y\n")
    from prunec.eval.data import Preprocess, load_data

    data = load_data(tmp_path, image_classifier(), preprocess=Preprocess(mean=(0.5,), std=(0.5,)))
    x = data.inputs["image"]
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx(-1.0) and x[0, 0, 0, 7] == pytest.approx(1.0)
    assert list(data.labels) == [1, 0] and list(data.slices["site"]) == ["x", "y"]


# ---------------------------------------------------------------- slices

def test_class_and_rare_slices():
    classes = np.repeat([0, 1, 2, 3], [100, 100, 100, 5])
    sl = {s.name: s for s in class_slices(classes)}
    assert [sl[f"class={k}"].n for k in range(4)] == [100, 100, 100, 5]
    assert sl["rare"].n == 5 and set(classes[sl["rare"].indices]) == {3}
    # Balanced classes have no rare slice.
    assert not [s for s in class_slices(np.repeat([0, 1, 2], 10)) if s.kind == "rare"]
    assert not [s for s in class_slices(np.repeat([0, 1, 2, 3], [54, 55, 52, 53])) if s.kind == "rare"]


def test_user_and_length_slices():
    sl = user_slices({"site": np.array(["a", "b", "a"])})
    assert {s.name: list(s.indices) for s in sl} == {"site=a": [0, 2], "site=b": [1]}
    tokens = np.zeros((4, 6), np.int64)
    for i, n in enumerate([2, 3, 5, 6]):
        tokens[i, :n] = 7
    x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "T"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", "T"])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["tokens"], ["y"])], "g", [x], [y]))
    slices = length_slices(EvalData({"tokens": tokens}), graph_inputs(m))
    assert [list(s.indices) for s in slices] == [[0, 1], [2, 3]]
    assert all(s.kind == "length" for s in slices)


# ---------------------------------------------------------------- corruptions

@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_seeded_and_monotone(name):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.8, size=(4, 1, 16, 16)).astype(np.float32)
    a = corrupt(x, name, 3, seed=5)
    assert np.array_equal(a, corrupt(x, name, 3, seed=5)) and a.dtype == x.dtype and a.shape == x.shape
    dist = [np.abs(corrupt(x, name, s, seed=5) - x).mean() for s in range(1, 6)]
    assert all(d > 0 for d in dist)
    assert all(b >= a * 0.999 for a, b in zip(dist, dist[1:])), dist


def test_corruption_keeps_value_range():
    x = np.random.default_rng(0).uniform(-2, 3, size=(2, 3, 8, 8)).astype(np.float32)
    y = corrupt(x, "gaussian_noise", 5)
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5


def test_blur_and_pixelate_hand_cases():
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0
    b = blur(x, 1.0)
    assert b.sum() == pytest.approx(1.0) and b[0, 0, 2, 2] == b.max() and b[0, 0, 2, 1] == pytest.approx(b[0, 0, 1, 2])
    p = pixelate(np.arange(16.0).reshape(1, 1, 4, 4), 2, 2)
    assert p[0, 0].tolist() == [[2.5, 2.5, 4.5, 4.5]] * 2 + [[10.5, 10.5, 12.5, 12.5]] * 2


# ---------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    logits = np.array([[3, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2]], np.float32)
    labels = np.array([0, 2, 1, 1])
    assert topk_correct(logits, labels, 1).tolist() == [True, False, False, False]
    assert topk_correct(logits, labels, 2).tolist() == [True, True, True, False]
    other = logits[:, ::-1]
    assert agreement(logits, other).tolist() == [False, True, False, False]
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0]])
    assert cosine(a, b).tolist() == pytest.approx([0.0, 1.0])
    assert relative_error(a, b).tolist() == pytest.approx([np.sqrt(2), 1.0])
    seq = np.zeros((2, 3, 2)); seq[0, :, 1] = 1; seq[1, 0, 1] = 1
    assert topk_correct(seq, np.array([[1, 1, 1], [1, 1, 1]]), 1).tolist() == [True, False]


def test_bootstrap_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        v = rng.uniform(size=n) < 0.7
        e = estimate(v)
        assert e.lo <= e.value <= e.hi and e.n == n
        widths.append(e.hi - e.lo)
    assert widths[0] > widths[1] > widths[2]
    # Binomial standard error at n=2000: 95% interval ~ +-1.96*sqrt(.21/2000) = +-0.020.
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 2000), rel=0.25)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


# ---------------------------------------------------------------- gate (library)

def test_gate_hand_computed(clf_files):
    orig, bad = gemm_classifier(np.eye(4)), gemm_classifier(SWAP)
    data = load_npz(clf_files / "data.npz", orig)
    rep = evaluate_gate(orig, bad, data, GateThresholds(max_drop=1.0))
    by = {s.name: s for s in rep.slices}
    # Classes 2 and 3 (100 of 400 samples) are all wrong: 100 -> 75 overall, 100 -> 0 on them.
    assert by["all"].original.value == 100 and by["all"].candidate.value == pytest.approx(75)
    assert by["class=0"].drop.value == 0 and by["class=2"].drop.value == 100
    assert by["rare"].n == 40 and by["rare"].candidate.value == 0  # 40 < quantile(0.25) = 55
    assert by["all"].drop.lo <= 25 <= by["all"].drop.hi
    assert not rep.passed and {"all", "class=2", "class=3", "rare"} <= {s.name for s in rep.failed}
    assert by["class=0"].status == "pass" and by["source=a"].status == "fail"
    assert rep.metric == "top1" and json.dumps(rep.to_dict())
    with pytest.raises(GateFailure):
        rep.raise_if_failed()


def test_gate_without_labels_uses_agreement_and_flags_small_slices(clf_files):
    orig = gemm_classifier(np.eye(4))
    data = load_npz(clf_files / "data.npz", orig)
    small = EvalData({"x": data.inputs["x"][:160]})  # predicted classes 0 (150 samples) and 1 (10)
    rep = evaluate_gate(orig, orig, small, GateThresholds(min_agreement=0.97, min_samples=40))
    assert rep.metric == "agreement" and rep.passed
    by = {s.name: s for s in rep.slices}
    assert by["all"].status == "pass" and rep.too_few
    assert all(s.status == "too few" for s in rep.slices if s.n < 40)
    strict = evaluate_gate(orig, orig, small, GateThresholds(min_samples=40, fail_on_small=True))
    assert not strict.passed
    # When no slice reaches --min-samples the gate has no evidence, and fails saying so.
    none = evaluate_gate(orig, orig, small, GateThresholds(min_agreement=0.97, min_samples=200))
    assert all(s.status == "too few" for s in none.slices)
    assert not none.passed and "no slice has --min-samples 200" in none.problems[0]
    with pytest.raises(GateFailure, match="not evidence"):
        none.raise_if_failed()


def test_slice_threshold_precedence():
    th = GateThresholds(max_drop=1.0, slice_max_drop=parse_slice_max_drop(["rare=2,class=5", "class=2=0.5",
                                                                          "gaussian_noise@*=3"]))
    from prunec.eval.slices import Slice
    idx = np.arange(3)
    assert th.max_drop_for(Slice("rare", "rare", idx)) == 2.0
    assert th.max_drop_for(Slice("class=1", "class", idx)) == 5.0
    assert th.max_drop_for(Slice("class=2", "class", idx)) == 0.5
    assert th.max_drop_for(Slice("gaussian_noise@3", "corruption", idx)) == 3.0
    assert th.max_drop_for(Slice("all", "all", idx)) == 1.0


def test_corruption_slices_catch_a_fragile_model():
    """A candidate with a bias of 0.3 towards class 1 keeps every clean prediction (margins ~1) but
    flips class 0 at contrast severity 5, where the left/right margin shrinks to ~0.1."""
    orig, fragile = image_classifier(), image_classifier(bias=(0.0, 0.3))
    rng = np.random.default_rng(0)
    x = np.zeros((64, 1, 8, 8), np.float32)
    x[:32, :, :, :4] = 1.0
    x[32:, :, :, 4:] = 1.0
    labels = np.repeat([0, 1], 32)
    data = EvalData({"image": x + rng.uniform(0, 0.01, x.shape).astype(np.float32)}, labels)
    ev = Evaluator(orig, data, corruptions=["gaussian_noise", "contrast"], severities=[5])
    assert {"gaussian_noise@5", "contrast@5"} <= {s.name for s in ev.slices}
    assert ev.compare(orig, GateThresholds(max_drop=0.0)).passed
    by = {s.name: s for s in ev.compare(fragile, GateThresholds(max_drop=1.0)).slices}
    assert by["all"].status == "pass" and by["all"].candidate.value == 100
    assert by["contrast@5"].status == "fail" and by["contrast@5"].candidate.value == pytest.approx(50)


# ---------------------------------------------------------------- CLI

def test_check_exit_codes(clf_files, tmp_path):
    d = clf_files
    ok = cli_run(["check", str(d / "orig.onnx"), str(d / "orig.onnx"), "--data", str(d / "data.npz"),
                  "--max-drop", "1.0", "--slice-max-drop", "rare=2.0", "--min-agreement", "0.97"])
    assert ok.exit_code == 0, ok.output
    assert "PASSED" in ok.output
    out = tmp_path / "gate.json"
    bad = cli_run(["check", str(d / "orig.onnx"), str(d / "bad.onnx"), "--data", str(d / "data.npz"),
                   "--max-drop", "1.0", "--json", str(out)])
    assert bad.exit_code == 3, bad.output
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and "class=2" in doc["failed"]
    # Relaxing every slice it fails on lets it pass: proof the thresholds are what fail it.
    relaxed = cli_run(["check", str(d / "orig.onnx"), str(d / "bad.onnx"), "--data", str(d / "data.npz"),
                       "--max-drop", "100"])
    assert relaxed.exit_code == 0, relaxed.output


def test_check_bad_data_is_one_line(clf_files, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 5), np.float32))
    r = CliRunner().invoke(cli, ["check", str(clf_files / "orig.onnx"), str(clf_files / "orig.onnx"),
                                 "--data", str(tmp_path / "wrong.npz"), "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 2 and "axis 1 must be 4" in r.output
    assert not (tmp_path / "g.json").exists()


def test_run_refuses_to_write_on_failed_gate(clf_files, tmp_path):
    """`cleanup` is exact (drop 0), so a max drop of -1 points is a gate that cannot pass."""
    d = clf_files
    out = tmp_path / "out.onnx"
    args = ["run", str(d / "orig.onnx"), "--passes", "cleanup", "-o", str(out), "--data", str(d / "data.npz"),
            "--max-drop", "-1"]
    r = cli_run(args)
    assert r.exit_code == 3, r.output
    assert not out.exists()
    r = cli_run(args + ["--force"])
    assert r.exit_code == 0, r.output
    assert out.exists()
    out.unlink()
    r = cli_run(args[:-1] + ["1.0"])
    assert r.exit_code == 0 and out.exists(), r.output


def test_corruption_nhwc_matches_nchw():
    x = np.random.default_rng(2).uniform(0, 1, size=(2, 3, 6, 6)).astype(np.float32)
    for name in ("gaussian_blur", "gaussian_noise", "pixelate"):
        a = corrupt(x, name, 2, seed=1)
        b = corrupt(x.transpose(0, 2, 3, 1).copy(), name, 2, seed=1, layout="nhwc")
        np.testing.assert_allclose(a, b.transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)


def test_image_csv_missing_file(tmp_path):
    from prunec.eval.data import load_data

    (tmp_path / "d.csv").write_text("file,label\nnope.png,1\n")
    with pytest.raises(DataError, match="nope.png: no such file"):
        load_data(tmp_path / "d.csv", image_classifier())


def test_fixed_batch_model_is_padded(clf_files):
    """A model whose batch dim is fixed to 8 still evaluates 400 samples (the last batch padded)."""
    from prunec.eval.gate import predict

    m = gemm_classifier(np.eye(4), batch=8)
    x = load_npz(clf_files / "data.npz", gemm_classifier(np.eye(4))).inputs["x"][:13]
    np.testing.assert_allclose(predict(m, {"x": x}), x, rtol=1e-6)


def test_non_classifier_uses_cosine_and_relative_error():
    """An image-to-image model (Conv, output N x 2 x 8 x 8): the metric is output cosine similarity."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2, 8, 8])

    def model(scale):
        w = np.ones((2, 1, 1, 1), np.float32) * scale
        w[1] = 1.0
        g = helper.make_graph([helper.make_node("Conv", ["image", "W"], ["out"])], "g", [x], [y],
                              [numpy_helper.from_array(w, "W")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        return m

    data = EvalData({"image": np.random.default_rng(0).uniform(0.5, 1, (40, 1, 8, 8)).astype(np.float32)})
    # Channel 0 scaled by 0 vs 1: per sample the outputs are [a, a] and [0, a], cosine = 1/sqrt(2).
    rep = evaluate_gate(model(1.0), model(0.0), data, GateThresholds(max_drop=None, min_agreement=0.9))
    s = rep.slices[0]
    assert rep.metric == "cosine" and s.candidate.value == pytest.approx(100 / np.sqrt(2), rel=1e-5)
    assert s.rel_error.value == pytest.approx(1 / np.sqrt(2), rel=1e-5)
    assert not rep.passed and "cosine" in s.reasons[0]


def test_rotation_is_opt_in_and_turns_a_horizontal_bar():
    """`rotation` is asked for by name (never part of `all`, so default slices and calibration views
    keep their meaning) and really rotates: a one-pixel horizontal bar spreads over other rows."""
    from prunec.eval.corruptions import parse_corruptions

    assert "rotation" not in parse_corruptions("all")
    assert parse_corruptions("all,rotation") == [*CORRUPTIONS, "rotation"]
    assert parse_corruptions("rotation,all,rotation")[0] == "rotation"
    with pytest.raises(OptionError, match="rotation"):
        parse_corruptions("rotate")
    x = np.zeros((8, 1, 33, 65), np.float32)
    x[:, :, 16, 8:57] = 1.0
    y = corrupt(x, "rotation", 5, seed=2)
    assert y.shape == x.shape and y.dtype == x.dtype and np.array_equal(y, corrupt(x, "rotation", 5, seed=2))
    on_row = y[:, 0, 16, 8:57].mean(axis=1)
    off_rows = np.delete(y[:, 0], 16, axis=1).sum(axis=(1, 2))
    assert (on_row < 0.9).mean() >= 0.75 and (off_rows > 1.0).mean() >= 0.75  # most of 8 samples tilted
    assert np.all(y >= 0) and np.all(y <= 1)


def test_mixed_combines_several_corruptions_per_sample():
    """`mixed` is opt-in and applies several degradations to one sample at once: on a flat grey
    image, no single corruption both adds pixel noise (variance) and moves the mean the way
    contrast/brightness do, while most mixed samples show more than one kind of change."""
    from prunec.eval.corruptions import parse_corruptions

    assert "mixed" not in parse_corruptions("all") and parse_corruptions("all,mixed")[-1] == "mixed"
    x = np.full((40, 1, 16, 16), 0.5, np.float32)
    x[:, :, :, :8] = 0.25  # two flat halves: blur and pixelate change the edge, contrast the gap
    y = corrupt(x, "mixed", 3, seed=1, value_range=(0.0, 1.0))
    assert y.shape == x.shape and y.dtype == x.dtype and np.array_equal(y, corrupt(x, "mixed", 3, seed=1,
                                                                                    value_range=(0.0, 1.0)))
    kinds = []
    for i in range(len(x)):
        d = y[i, 0].astype(np.float64) - x[i, 0]
        noisy = np.std(y[i, 0, 2:14, 2:6]) > 0.01  # texture inside a flat half: a noise
        shifted = abs(float(np.mean(d))) > 0.02  # mean moved: brightness (or contrast of the halves)
        gap = abs(float(np.mean(y[i, 0, :, 10:]) - np.mean(y[i, 0, :, :6])))
        squeezed = gap < 0.2  # the halves' contrast shrank
        kinds.append(int(noisy) + int(shifted) + int(squeezed))
    assert np.mean(np.array(kinds) >= 2) > 0.5
    single = [corrupt(x, c, 3, seed=1, value_range=(0.0, 1.0)) for c in CORRUPTIONS]
    assert all(not np.allclose(y, s) for s in single)
