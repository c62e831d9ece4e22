"""Verification you can trust (issue 12): the masked-original proof of `channels`, the mask proof
of weight-masking passes, fidelity in the verdict, normalised weights, and the regressions the
issue lists. Each test breaks something on purpose or builds the case by hand; none reads its
expected values from the code under test."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import prunec.passes.channels as channels_pass
import prunec.passes.sparsity as sparsity_pass
from models import conv_relu_model, dq_conv_pair, files_in, make_model, run, vi
from prunec.errors import ModelLoadError, VerificationError
from prunec.graph.verify import DEFAULT_RTOL, Verifier, default_rtol, model_precision
from prunec.passes import PassManager, build_passes

RNG = np.random.default_rng(12)


def _w(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def prune(model, **opts):
    opts = {k: str(v) for k, v in {"ratio": 0.5, "round": 1, **opts}.items()}
    return PassManager(build_passes(["channels"], {"channels": opts})).run(model)


def _save(tmp_path, model, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- the masked-original proof of channel pruning ------------------------------------------------

def attention_model() -> onnx.ModelProto:
    """x[N,T,8] -> q, k, v projections; softmax(q kᵀ) v -> output projection -> y. The q/k
    channels are read by no weight, only by the q·kᵀ contraction."""
    inits = {"wq": _w(8, 8), "wk": _w(8, 8), "wv": _w(8, 8), "wo": _w(8, 8)}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["a", "v"], ["o"], name="av"),
             helper.make_node("MatMul", ["o", "wo"], ["y"], name="out")]
    return make_model(nodes, [vi("x", ["N", 5, 8])], [vi("y", ["N", 5, 8])],
                      [numpy_helper.from_array(v, k) for k, v in inits.items()])


def test_proof_masks_attention_contractions():
    m = attention_model()
    out, report = prune(m)
    rec = report.passes[0]
    assert _inits(out)["wq"].shape == (8, 4) and _inits(out)["wk"].shape == (8, 4)
    assert rec.verification.proof.what == "masked original"
    assert rec.verification.proof.max_rel <= rec.verification.rtol
    # Not vacuous: the removed q/k/v channels carried signal.
    assert report.final_deviation["y"]["rel"] > 1e-2


def test_proof_without_contraction_masks_fails(monkeypatch):
    """Control: the q·kᵀ sum is where removed q/k channels meet, so a reference that does not
    mask it must disagree with the pruned model; the error names the first differing tensor."""
    import prunec.graph.proof as proof

    monkeypatch.setattr(proof, "_mask_contractions", lambda graph, masks: None)
    with pytest.raises(VerificationError) as e:
        prune(attention_model())
    msg = str(e.value)
    assert "does not match the masked original" in msg
    assert "first differing tensor: 's' (output of MatMul 'qk')" in msg


def _swap_two_kept_channels(monkeypatch):
    """A rule bug: after removal, two kept input channels of one reader trade places."""
    real = channels_pass.apply_removal

    def broken(analysis, removed, *rest):
        stats = real(analysis, removed, *rest)
        site = next(s for s in analysis.sites if s.role == "consumer" and s.tensor.shape[s.axis] >= 2)
        v = np.array(site.tensor.values)
        idx = [slice(None)] * v.ndim
        idx[site.axis] = [1, 0]
        first = [slice(None)] * v.ndim
        first[site.axis] = slice(0, 2)
        v[tuple(first)] = v[tuple(idx)]
        site.tensor.values = v
        return stats
    monkeypatch.setattr(channels_pass, "apply_removal", broken)


def test_swapped_channels_are_caught_exit_4_nothing_written(monkeypatch, prunec_cli, demo_path, tmp_path):
    _swap_two_kept_channels(monkeypatch)
    out, keep = tmp_path / "out.onnx", tmp_path / "failed"
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.3",
                     "-o", out, "--keep-failed", keep)
    assert res.exit_code == 4
    line = prunec_cli.one_line_error(res)
    assert "pass 'channels' produced a model that fails verification" in line
    assert "does not match the masked original" in line and "first differing tensor:" in line
    assert not out.exists()
    assert files_in(keep) == {"01-channels-failed.onnx", "01-channels-reference.onnx", "failure.json"}
    doc = json.loads((keep / "failure.json").read_text())
    assert doc["pass"] == "channels" and doc["details"]["check"] == "proof"
    assert doc["details"]["first_difference"] and doc["options"]["ratio"] == 0.3
    onnx.load(str(keep / "01-channels-failed.onnx"))  # a loadable model for the bug report


def test_a_wrong_softmax_rule_is_caught_by_the_proof(monkeypatch):
    """Give opset-11 Softmax the opset-13 rule (the bug fixed in 13dbdcc): removing channels
    then changes every softmax denominator, and the proof fails instead of passing it."""
    from prunec.graph.channel_core import RULES, find_rule

    from test_channels_rules import _channels_last_softmax_model

    m = _channels_last_softmax_model(11)
    monkeypatch.setitem(RULES, ("", "Softmax"), [(1, find_rule("Softmax", "", 13))])
    with pytest.raises(VerificationError, match="does not match the masked original"):
        prune(m, ratio=0.25)


# -- weight-masking passes ------------------------------------------------------------------------

def test_sparsity_mask_proof_catches_changed_values(monkeypatch):
    real = sparsity_pass.prune_smallest
    monkeypatch.setattr(sparsity_pass, "prune_smallest", lambda w, r: real(w, r) * np.float32(1.01))
    passes = build_passes(["sparsity"], {"sparsity": {"ratio": "0.5"}})
    with pytest.raises(VerificationError, match="'w' is not the original times a 0/1 mask"):
        PassManager(passes).run(conv_relu_model())


def test_sparsity_mask_proof_catches_a_change_outside_its_footprint(monkeypatch):
    real = sparsity_pass.Sparsity.run

    def also_bias(self, graph, ctx):
        result = real(self, graph, ctx)
        b = next(t for name, t in graph.tensors().items() if name == "b")
        b.values = np.asarray(b.values) * 0  # zeros, but not a weight the pass declared
        return result
    monkeypatch.setattr(sparsity_pass.Sparsity, "run", also_bias)
    passes = build_passes(["sparsity"], {"sparsity": {"ratio": "0.5"}})
    with pytest.raises(VerificationError, match="changed more than its declared weights: node 'conv' .*weights b"):
        PassManager(passes).run(conv_relu_model())


def test_sparsity_is_proven_by_its_masks():
    _, report = PassManager(build_passes(["sparsity"], {"sparsity": {"ratio": "0.5"}})).run(conv_relu_model())
    v = report.passes[0].verification
    assert v.masks_proven == 1 and v.proof is None


def shared_weight_model() -> onnx.ModelProto:
    """Two MatMuls read one weight w [8, 8]: x -> a (MatMul w) -> b (MatMul w) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="second")]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])],
                      [numpy_helper.from_array(_w(8, 8), "w")])


@pytest.mark.parametrize("name", ["sparsity", "2to4"])
def test_weight_read_by_an_excluded_layer_is_left_alone(name):
    m = shared_weight_model()
    passes = build_passes([name], {name: {"exclude": "second"}})
    out, report = PassManager(passes).run(m)
    np.testing.assert_array_equal(_inits(out)["w"], _inits(m)["w"])
    rec = report.passes[0]
    assert not rec.result.changed
    assert any("also read by MatMul 'second'" in s.why for s in rec.result.skipped)
    # Both layers selected: the shared weight is masked once, for both.
    out, report = PassManager(build_passes([name], {})).run(m)
    assert np.mean(_inits(out)["w"] == 0) == pytest.approx(0.5)


# -- weights in Constant nodes, Identity, Cast ----------------------------------------------------

def constant_node_model() -> onnx.ModelProto:
    """PP-OCR style: every weight is a Constant node; one conv weight is float16 behind a Cast,
    BN parameters behind Identity. x[N,8,6,6] -> Conv -> BN -> Relu -> Conv -> y."""
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_v"))
    r = np.random.default_rng(3)
    nodes = [const("w1", r.standard_normal((8, 8, 3, 3)).astype(np.float32)),
             const("w2h", r.standard_normal((8, 8, 1, 1)).astype(np.float16)),
             helper.make_node("Cast", ["w2h"], ["w2"], to=TensorProto.FLOAT),
             *[const(f"{p}0", v) for p, v in (("s", r.uniform(0.5, 2, 8)), ("b", r.standard_normal(8)),
                                               ("m", r.standard_normal(8)), ("v", r.uniform(0.5, 2, 8)))
               for v in [v.astype(np.float32)]],
             *[helper.make_node("Identity", [f"{p}0"], [p]) for p in "sbmv"],
             helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 8, 6, 6])])


def test_weights_in_constant_nodes_are_weights_for_every_pass(tmp_path):
    m = constant_node_model()
    assert not m.graph.initializer
    out, report = PassManager(build_passes(["fold-bn"], {})).run(m)
    assert report.passes[0].result.details["folded"] == 1
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert report.normalized == {"constant_nodes": 6, "identity": 4, "cast": 1}
    out, report = PassManager(build_passes(["sparsity", "csr"], {"sparsity": {"ratio": "0.8"}})).run(m)
    assert report.passes[0].result.details["layers"] == 2 and report.passes[0].verification.masks_proven == 2
    assert len(out.graph.sparse_initializer) == 2
    out, report = PassManager(build_passes(["2to4"], {})).run(m)
    assert report.passes[0].result.details["layers"] == 2
    x = {"x": _w(2, 8, 6, 6)}
    assert np.isfinite(run(out, x)["y"]).all()


def test_nothing_eligible_is_unchanged_with_the_reason(prunec_cli, tmp_path):
    p = _save(tmp_path, conv_relu_model())
    res = prunec_cli("run", p, "--passes", "sparsity", "-O", "sparsity.min-size=1000", "-o",
                     tmp_path / "o.onnx", "--no-profile")
    assert res.exit_code == 0, res.output
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"UNCHANGED: wrote {tmp_path / 'o.onnx'} (no pass changed the model; sparsity: "
                           "nothing eligible: 1 of 1 skipped as 'weight has 54 elements < min-size 1000'")


# -- fidelity and the verdict ---------------------------------------------------------------------

def test_lossy_without_data_never_says_passed(prunec_cli, demo_path, tmp_path):
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.3",
                     "-o", tmp_path / "o.onnx", "--no-profile", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    line = res.stdout.strip().splitlines()[-1]
    assert "PASSED" not in res.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    cos = doc["final_deviation"]["logits"]["cosine"]
    rel = doc["final_deviation"]["logits"]["rel"]
    assert line.startswith(f"WROTE {tmp_path / 'o.onnx'} (lossy: fidelity cos {cos:.4g} / rel dev "
                           f"{rel:.2g} on random inputs; accuracy NOT checked: pass --data; checks: ")
    assert "masked original proof" in line
    assert doc["passes"][0]["verification"]["proof"]["max_rel"] <= doc["passes"][0]["verification"]["rtol"]
    assert "fidelity to the original" in res.stdout


def test_lossy_with_data_passes_and_measures_on_the_data(prunec_cli, demo_path, tmp_path):
    data = demo_path.parent / "demo_digits_test.npz"
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.1",
                     "-O", "channels.round=1", "-o", tmp_path / "o.onnx", "--no-profile",
                     "--data", data, "--max-drop", "100", "--corruptions", "none", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"PASSED: wrote {tmp_path / 'o.onnx'} (lossy: fidelity cos ")
    assert "on 64 calibration samples; accuracy gate passed; checks:" in line
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["fidelity_on"] == "64 calibration samples"
    assert "calibration samples" in doc["passes"][0]["verification"]["proof"]["feeds"]


@pytest.mark.parametrize("flag", [("--min-cosine", "0.99999"), ("--max-deviation", "1e-6")])
def test_fidelity_thresholds_exit_3_and_write_nothing(prunec_cli, demo_path, tmp_path, flag):
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.3",
                     "-o", tmp_path / "o.onnx", "--no-profile", *flag)
    assert res.exit_code == 3
    assert flag[0] in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == set()
    # --force writes it, and the run ends FORCED, never PASSED or WROTE.
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.3",
                     "-o", tmp_path / "o.onnx", "--no-profile", *flag, "--force")
    assert res.exit_code == 0
    assert res.stdout.strip().splitlines()[-1].startswith(
        f"FORCED: wrote {tmp_path / 'o.onnx'} although the fidelity gate failed (lossy: fidelity cos ")
    (tmp_path / "o.onnx").unlink()
    # A threshold the result meets writes it.
    easy = "-1" if flag[0] == "--min-cosine" else "1e9"
    res = prunec_cli("run", demo_path, "--passes", "channels", "-O", "channels.ratio=0.3",
                     "-o", tmp_path / "o.onnx", "--no-profile", flag[0], easy)
    assert res.exit_code == 0 and (tmp_path / "o.onnx").exists()


# -- channel rules: every output labeled or frozen, opset-11 Split ----------------------------------

def test_maxpool_indices_freeze_instead_of_failing():
    """MaxUnpool reads MaxPool's flat indices, which encode the channel: the channels of the
    pooled conv must stay. Before every output had to be labeled, this failed verification."""
    inits = {"w1": _w(8, 4, 3, 3), "w2": _w(8, 8, 1, 1), "w3": _w(3, 8, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("MaxPool", ["c1"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p", "w2"], ["c2"], name="c2"),
             helper.make_node("MaxUnpool", ["c2", "idx"], ["u"], kernel_shape=[2, 2], strides=[2, 2], name="unpool"),
             helper.make_node("Conv", ["u", "w3"], ["y"], name="c3")]
    m = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 3, 6, 6])],
                   [numpy_helper.from_array(v, k) for k, v in inits.items()])
    out, report = prune(m)
    assert _inits(out)["w1"].shape == (8, 4, 3, 3)
    assert any("'idx'" in s.why and "does not follow" in s.why for s in report.passes[0].result.skipped)


def test_split_before_opset_13_gets_its_sizes_as_an_attribute():
    """Split-11 takes `split` as an attribute; removing unequal counts from its two halves must
    not add a second input (which only Split-13 has)."""
    inits = {"w1": _w(8, 4, 1, 1), "wa": _w(3, 4, 1, 1), "wb": _w(3, 4, 1, 1)}
    for i in (0, 1, 2, 4):   # three channels of the first half, one of the second: lowest L1
        inits["w1"][i] = 0
        (inits["wa"] if i < 4 else inits["wb"])[:, i % 4] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1"),
             helper.make_node("Split", ["c1"], ["s0", "s1"], axis=1, name="split"),
             helper.make_node("Conv", ["s0", "wa"], ["a"], name="ca"),
             helper.make_node("Conv", ["s1", "wb"], ["b"], name="cb"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 3, 6, 6])],
                   [numpy_helper.from_array(v, k) for k, v in inits.items()], opset=11, ir_version=7)
    out, _ = prune(m)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert len(split.input) == 1
    assert list(next(a for a in split.attribute if a.name == "split").ints) == [1, 3]
    x = {"x": _w(2, 4, 6, 6)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)


# -- tolerances by dtype ------------------------------------------------------------------------------

def conv_bn_model(dtype) -> onnx.ModelProto:
    """x -> Conv(16 ch, 3x3) -> BN, everything in `dtype` (Gemm for float64: no double Conv on CPU)."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    r = np.random.default_rng(5)
    bn = [numpy_helper.from_array(v.astype(dtype), n) for n, v in
          (("s", r.uniform(0.5, 2, 16)), ("b", r.standard_normal(16)), ("m", r.standard_normal(16)),
           ("v", r.uniform(0.1, 2, 16)))]
    if dtype == np.float64:
        w = numpy_helper.from_array(r.standard_normal((32, 16)).astype(dtype), "w")
        nodes = [helper.make_node("Gemm", ["x", "w"], ["c"], name="gemm"),
                 helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
        shape_x, shape_y = ["N", 32], ["N", 16]
    else:
        w = numpy_helper.from_array(r.standard_normal((16, 16, 3, 3)).astype(dtype), "w")
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                 helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
        shape_x, shape_y = ["N", 16, 8, 8], ["N", 16, 8, 8]
    return make_model(nodes, [vi("x", shape_x, et)], [vi("y", shape_y, et)], [w, *bn])


def test_fold_bn_on_float16_passes_at_the_float16_tolerance():
    m = conv_bn_model(np.float16)
    assert default_rtol(m) == DEFAULT_RTOL[TensorProto.FLOAT16]
    _, report = PassManager(build_passes(["fold-bn"], {})).run(m)
    v = report.passes[0].verification
    assert report.passes[0].result.changed and v.rtol == 1e-2 and v.max_rel <= v.rtol
    # Control: above float32's 1e-4, which is what used to fail this correct rewrite.
    assert v.max_rel > 1e-4


def test_float64_gets_a_tighter_tolerance():
    m = conv_bn_model(np.float64)
    assert model_precision(m) == TensorProto.DOUBLE and default_rtol(m) < 1e-6
    _, report = PassManager(build_passes(["fold-bn"], {})).run(m)
    assert report.passes[0].result.changed and report.passes[0].verification.max_rel <= 1e-9
    # A 1e-6 relative error, within float32's tolerance, is not exact for a float64 model.
    v = Verifier(m)
    worse = onnx.ModelProto()
    worse.CopyFrom(m)
    w = next(t for t in worse.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * (1 + 1e-6), "w"))
    with pytest.raises(VerificationError, match="tolerance 1e-09"):
        v.verify(worse, exact=True)


def test_precision_is_the_least_precise_type_computed_in():
    m = shared_weight_model()
    assert model_precision(m) == TensorProto.FLOAT
    bf = onnx.ModelProto()
    bf.CopyFrom(m)
    bf.graph.node.append(helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.BFLOAT16))
    assert model_precision(bf) == TensorProto.BFLOAT16 and default_rtol(bf) == 5e-2
    # Weights stored in float16 but cast to float before use do not make a float16 model.
    assert model_precision(constant_node_model()) == TensorProto.FLOAT


# -- input problems are exit 2; prunec bugs are tracebacks ------------------------------------------

def unloadable_model() -> onnx.ModelProto:
    """Valid ONNX that ONNX Runtime's CPU build has no kernel for (bfloat16 Add)."""
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16),
             helper.make_node("Add", ["h", "h"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])])


def test_input_model_onnx_runtime_cannot_load_is_exit_2(prunec_cli, tmp_path):
    p = _save(tmp_path, unloadable_model())
    res = prunec_cli("run", p, "--passes", "cleanup", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2
    assert "ONNX Runtime cannot load the input model" in prunec_cli.one_line_error(res)
    with pytest.raises(ModelLoadError):
        Verifier(unloadable_model())


def test_debug_shows_the_traceback_of_an_error(prunec_cli, tmp_path):
    p = _save(tmp_path, unloadable_model())
    res = prunec_cli("--debug", "run", p, "--passes", "cleanup", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2
    assert "Traceback" in res.stderr and "prunec: error: ONNX Runtime cannot load" in res.stderr


def test_a_bug_while_making_a_session_is_not_a_verification_error(monkeypatch):
    import prunec.graph.verify as verify

    def buggy(*a, **k):
        raise TypeError("a bug in prunec")
    monkeypatch.setattr(verify, "make_session", buggy)
    with pytest.raises(TypeError, match="a bug in prunec"):
        Verifier(conv_relu_model())


# -- sequence and map outputs ---------------------------------------------------------------------

def classifier_model() -> onnx.ModelProto:
    """What skl2onnx writes for a classifier: a label tensor and a sequence of {class: prob} maps."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1, name="sm"),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0, name="am"),
             helper.make_node("ZipMap", ["p"], ["probabilities"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2], name="zm")]
    probs = onnx.ValueInfoProto()
    probs.name = "probabilities"
    probs.type.sequence_type.elem_type.map_type.key_type = TensorProto.INT64
    probs.type.sequence_type.elem_type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
    g = helper.make_graph(nodes, "clf", [vi("x", ["N", 4])], [vi("label", ["N"], TensorProto.INT64), probs],
                          [numpy_helper.from_array(_w(4, 3), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
                          ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_sequence_and_map_outputs_in_every_command(prunec_cli, tmp_path):
    p = _save(tmp_path, classifier_model(), "clf.onnx")
    res = prunec_cli("inspect", p, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["outputs"][1] == {"name": "probabilities",
                                                    "dtype": "seq(map(int64, float32))", "shape": None}
    assert prunec_cli("inspect", p).exit_code == 0
    out = tmp_path / "o.onnx"
    res = prunec_cli("run", p, "--passes", "cleanup,sparsity", "-o", out, "--no-profile")
    assert res.exit_code == 0, res.output + res.stderr
    got = onnx.load(str(out)).graph.output[1]
    assert got.type.HasField("sequence_type")
    x = {"x": _w(5, 4)}
    assert [sorted(d) for d in run(onnx.load(str(out)), x)["probabilities"]] == [[0, 1, 2]] * 5
    for args in (("profile", p, "--seconds", "0.1", "--no-memory", "--no-ops"), ("diff", p, out)):
        res = prunec_cli(*args)
        assert res.exit_code == 0, res.output + res.stderr
        assert "Traceback" not in res.output


def test_equal_tolerates_rounding_but_not_a_wrong_value():
    from prunec.graph.verify import deviation

    v = Verifier(conv_relu_model())
    r = np.random.default_rng(0)
    ref = r.uniform(0, 6, 1000)
    # A saturated output: everything ~1e-7, so any relative test fails on noise.
    assert v._equal(deviation(np.full(100, 1e-7), np.zeros(100)), 1e-4)
    # Rounding amplified by a range that shrank (1.5e-4 relative, same direction).
    noisy = ref + np.where(np.arange(1000) < 10, 1.5e-3, 0.0)
    assert 1e-4 < deviation(ref, noisy).rel < 1e-3 and v._equal(deviation(ref, noisy), 1e-4)
    # A wrong scale, and two values trading places, are not rounding.
    assert not v._equal(deviation(ref, ref * 1.01), 1e-4)
    swapped = ref.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not v._equal(deviation(ref, swapped), 1e-4)


def test_a_saturated_output_does_not_hide_a_wrong_rewrite(monkeypatch):
    """The output is sigmoid(z - 16) with small z: ~1e-7 everywhere, so swapped channels change
    it by far less than the absolute rounding floor (1e-6). Agreeing only by that allowance, the
    proof compares every inner tensor, and finds the swapped channels in z."""
    inits = {"w1": _w(8, 4, 3, 3), "w2": 0.05 * _w(3, 8, 1, 1), "shift": np.array(-16.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["z"], name="c2"),
             helper.make_node("Add", ["z", "shift"], ["s"], name="shift"),
             helper.make_node("Sigmoid", ["s"], ["y"], name="sigmoid")]
    m = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 3, 6, 6])],
                   [numpy_helper.from_array(v, k) for k, v in inits.items()])
    prune(m)
    _swap_two_kept_channels(monkeypatch)
    with pytest.raises(VerificationError, match="first differing tensor: 'z' \\(output of Conv 'c2'\\)"):
        prune(m)


def test_proof_zeroes_a_quantized_weight_at_its_zero_point():
    """uint8 weights behind DequantizeLinear with zero point 100: a removed input channel's
    'zero' in the masked original is 100, not 0 (which dequantizes to -100 * scale)."""
    m = dq_conv_pair(np.random.default_rng(7))
    out, report = prune(m)
    assert _inits(out)["w2q"].shape == (3, 4, 1, 1)
    v = report.passes[0].verification
    assert v.proof.max_rel <= v.rtol and report.final_deviation["y"]["rel"] > 1e-2
