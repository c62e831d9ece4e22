"""int8: calibrated on the model the pass receives (not the original), QDQ output through `prunec run`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import DEMO, init, make_model, run, vi
from prunec.passes import PassContext, PassManager, build_passes
from prunec.passes.base import Calibration


def _coherent_model() -> onnx.ModelProto:
    """x[N,256] in [0,1] -> Gemm (per output: 255 weights of 0.05 and one of 1.0) -> h -> Relu ->
    Gemm -> Relu -> Gemm -> y. Magnitude pruning removes the many small weights that together make
    h large (about 6.4 + x_k), so the pruned model's h spans about [0, 1.3]: a very different range."""
    w1 = np.full((256, 8), 0.05, np.float32)
    w1[np.arange(8) * 32, np.arange(8)] = 1.0
    r = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
         helper.make_node("Gemm", ["hr", "w2"], ["g"], name="fc2"),
         helper.make_node("Relu", ["g"], ["gr"], name="relu2"),
         helper.make_node("Gemm", ["gr", "w3"], ["y"], name="fc3")],
        [vi("x", ["N", 256])], [vi("y", ["N", 4])],
        [init("w1", w1), init("w2", r.standard_normal((8, 8)).astype(np.float32)),
         init("w3", r.standard_normal((8, 4)).astype(np.float32))])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def _input_scale(qmodel: onnx.ModelProto, tensor: str) -> float:
    """Scale of the QuantizeLinear that quantizes `tensor` in the QDQ model."""
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    q = [n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    assert q, f"no QuantizeLinear on {tensor}"
    return float(inits[q[0].input[1]])


@pytest.mark.parametrize("preprocess", [True, False])
def test_activation_ranges_come_from_the_pruned_model_not_the_original(preprocess):
    original = _coherent_model()
    x = np.random.default_rng(1).uniform(0, 1, (64, 256)).astype(np.float32)
    calib = Calibration({"x": x}, "test")
    opts = {"sparsity": {"ratio": 0.99}, "int8": {"keep-first-last": False, "preprocess": preprocess}}

    def quantized(calibrate_on: str):
        o = {**opts, "int8": {**opts["int8"], "calibrate-on": calibrate_on}}
        out, report = PassManager(build_passes(["sparsity", "int8"], o), ctx=PassContext(calib=calib)).run(original)
        pruned, _ = PassManager(build_passes(["sparsity"], {"sparsity": o["sparsity"]}),
                                ctx=PassContext(calib=calib)).run(original)
        return out, pruned, report

    out, pruned, report = quantized("input")
    assert report.passes[-1].result.details["quantized_layers"] >= 2
    # Oracle: int8 activations with a zero point map [min(0, lo), max(0, hi)] onto 255 steps.
    h_pruned = run(_with_output(pruned, "hr"), {"x": x})["hr"]
    h_original = run(_with_output(original, "hr"), {"x": x})["hr"]
    assert h_original.max() > 4 * h_pruned.max()  # the premise: pruning moved the range
    expect_pruned, expect_original = h_pruned.max() / 255, h_original.max() / 255
    assert _input_scale(out, "hr") == pytest.approx(expect_pruned, rel=0.02)
    # The same pass told to use the baseline (the failure mode) lands on the original's range,
    # so the check above can tell the two apart.
    wrong, _, _ = quantized("baseline")
    assert _input_scale(wrong, "hr") == pytest.approx(expect_original, rel=0.02)


def test_int8_after_pruning_runs_through_prunec_run_with_the_closing_profile(prunec_cli, tmp_path):
    train = str(DEMO).replace("demo_cnn.onnx", "demo_digits_train.npz")
    report = tmp_path / "run.json"
    res = prunec_cli("run", DEMO, "--passes", "fold-bn,channels,int8", "-O", "channels.ratio=0.25",
                     "-o", tmp_path / "q.onnx", "--data", train, "--max-drop", "100", "--report", report)
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(report.read_text())
    int8 = doc["passes"][-1]
    assert int8["name"] == "int8" and int8["verification"] is not None
    assert int8["details"]["kept_float"] == ["/stem/stem.0/Conv", "/fc/Gemm"]
    q = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert doc["profile"]["speedups"][0]["speedup"] > 0  # input vs int8 output timed in the same run
    assert "speedup" in res.output or "SLOWER" in res.output


def test_an_opset_12_model_gets_per_channel_scales_through_a_converted_opset():
    from models import conv_relu_model

    model = conv_relu_model(opset=12)
    x = np.random.default_rng(0).standard_normal((16, 2, 4, 4)).astype(np.float32)
    out, report = PassManager(build_passes(["int8"], {"int8": {"keep-first-last": False}}),
                              ctx=PassContext(calib=Calibration({"x": x}, "t"))).run(model)  # verified: checker
    assert report.passes[-1].result.details["opset"] == "opset 12 -> 13 (onnx.version_converter)"
    assert next(i.version for i in out.opset_import if i.domain == "") >= 13
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    w_dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
            and inits[n.input[0]].ndim == 4]
    assert w_dq and inits[w_dq[0].input[1]].shape == (3,)  # one scale per output channel
