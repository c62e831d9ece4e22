"""Runtimes behind one interface (ORT, OpenVINO, TensorRT), targets, and channel rounding per target.

Every available runtime must open the same model with the same interface and outputs that match
ONNX Runtime CPU; what needs a GPU (TensorRT) skips with the reason printed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.errors import OptionError, RuntimeUnavailableError
from prunec.eval.profile import compare_models, profile_model
from prunec.passes import PassContext, PassManager, build_passes
from prunec.runtime import cuda
from prunec.runtime.blocks import KNOWN_TARGETS, channel_multiple, parse_target_key
from prunec.runtime.runtimes import available_runtimes, get_runtime
from prunec.runtime.target import Target

AVAILABLE = available_runtimes()
TARGETS = [Target("ort"), Target("openvino"), Target("tensorrt", precision="fp32")]


def _runtime_or_skip(target: Target):
    why = AVAILABLE[target.runtime]
    if why is not None:
        kind = (f"no CUDA device or tensorrt package (cuda: {cuda.why_no_device() or 'ok'})"
                if target.runtime == "tensorrt" else f"{target.runtime} not installed")
        print(f"skipping {target.key}: {kind}: {why}")
        pytest.skip(f"{kind}: {why}")
    return get_runtime(target.runtime)


def small_cnn(width: int = 24, seed: int = 0) -> onnx.ModelProto:
    """Conv(3->w, 3x3) + Relu -> Conv(w->w, 1x1) + Add (residual) -> GlobalAveragePool -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = [w("w1", width, 3, 3, 3), numpy_helper.from_array(np.zeros(width, np.float32) + 0.1, "b1"),
             w("w2", width, width, 1, 1), w("wf", 10, width), numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def cnn():
    return small_cnn()


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)}


def _numpy_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The small CNN computed with numpy alone: an oracle independent of every runtime."""
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + 16, j:j + 16] for i in range(3) for j in range(3)], axis=2)  # N,C,9,H,W
    w1 = p["w1"].reshape(p["w1"].shape[0], 3, 9)
    c1 = np.einsum("nckhw,ock->nohw", cols, w1) + p["b1"][None, :, None, None]
    r1 = np.maximum(c1, 0)
    c2 = np.einsum("nchw,oc->nohw", r1, p["w2"][:, :, 0, 0])
    r2 = np.maximum(c2 + r1, 0)
    return r2.mean(axis=(2, 3)) @ p["wf"].T + p["bf"]


# --- one interface, matching outputs -------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.key)
def test_each_runtime_same_interface_and_outputs(target, cnn, feeds):
    rt = _runtime_or_skip(target)
    rt.check(target)
    sess = rt.open(cnn, target, shapes={"x": feeds["x"].shape})
    assert sess.input_names == ["x"] and sess.output_names == ["y"]
    out = sess.run(feeds)
    assert set(out) == {"y"} and out["y"].shape == (2, 10) and out["y"].dtype == np.float32
    ref = _numpy_reference(cnn, feeds["x"].astype(np.float64))
    np.testing.assert_allclose(out["y"], ref, rtol=1e-4, atol=1e-4)
    sess.close()


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.key)
def test_each_runtime_op_profile_maps_nodes_to_onnx(target, cnn, feeds):
    rt = _runtime_or_skip(target)
    prof = rt.op_profile(cnn, feeds, target, runs=3, warmup=1, batch=2, top=20)
    assert prof.runs == 3 and prof.batch == 2 and prof.total_ms > 0
    assert sum(prof.by_op_ms.values()) == pytest.approx(prof.total_ms)
    onnx_names = {n.name for n in cnn.graph.node}
    mapped = {m for n in prof.top_nodes for m in n.onnx_nodes}
    # Every runtime fuses differently, but the classifier Gemm and at least one conv-side node
    # keep a name the ONNX graph has.
    assert mapped <= onnx_names and "fc" in mapped, [(n.name, n.onnx_nodes) for n in prof.top_nodes]
    assert mapped & {"conv1", "relu1", "conv2", "add", "relu2"}
    if target.runtime == "tensorrt":
        assert isinstance(prof.sparse_layers, list)
    else:
        assert prof.sparse_layers is None


def test_profile_json_has_the_same_shape_on_every_available_runtime(cnn):
    docs = {}
    for target in TARGETS[:2]:
        if AVAILABLE[target.runtime] is None:
            docs[target.key] = profile_model(cnn, target=target, batches=(1, 2), runs=5, warmup=1,
                                             memory=target.runtime == "openvino", ops=True).to_dict()
    if len(docs) < 2:
        pytest.skip(f"openvino not installed: {AVAILABLE['openvino']}")
    a, b = docs["ort-cpu"], docs["openvino-cpu"]
    assert set(a) == set(b) and set(a["ops"]) == set(b["ops"]) and set(a["latency"][0]) == set(b["latency"][0])
    assert a["runtime"] == "ort" and b["runtime"] == "openvino"
    assert b["provider"] == "OpenVINO CPU (fp32)" and b["target"]["key"] == "openvino-cpu"
    assert b["ops"]["source"] == "OpenVINO performance counters" and b["machine"]["openvino"]
    assert [s["batch"] for s in b["latency"]] == [1, 2] and b["costs"] == a["costs"]
    assert b["memory"]["peak_rss_bytes"] >= b["memory"]["baseline_rss_bytes"] > 0


def test_openvino_compare_is_interleaved_and_counts_macs(cnn):
    if AVAILABLE["openvino"] is not None:
        pytest.skip(f"openvino not installed: {AVAILABLE['openvino']}")
    narrow = small_cnn(width=8, seed=1)
    rep = compare_models(cnn, narrow, target=Target("openvino"), batches=(1,), runs=8, warmup=1,
                         ops=False, memory=False)
    sp = rep.speedups[0]
    assert sp.pairs == 8 and rep.before.settings["order"] == "ABBA"
    assert rep.before.provider.startswith("OpenVINO CPU")
    # MACs by hand: 16x16 positions x (3*9*w + w*w) + w*10.
    macs = lambda w: 256 * (27 * w + w * w) + 10 * w  # noqa: E731
    assert sp.theoretical == pytest.approx(macs(24) / macs(8))


def test_gate_runs_through_the_target_runtime(demo_model, demo_data):
    if AVAILABLE["openvino"] is not None:
        pytest.skip(f"openvino not installed: {AVAILABLE['openvino']}")
    from prunec.eval.data import EvalData
    from prunec.eval.gate import Evaluator

    data = EvalData(inputs={"image": demo_data["image"][:96]}, labels=demo_data["labels"][:96])
    on_ort = Evaluator(demo_model, data)
    on_ov = Evaluator(demo_model, data, target=Target("openvino"))
    out = on_ort.output
    np.testing.assert_allclose(on_ov.reference["clean"][out], on_ort.reference["clean"][out], rtol=1e-4, atol=1e-4)
    assert on_ov.reference_value() == on_ort.reference_value()


# --- errors: one line, listing what is here -------------------------------------------------

def test_unavailable_runtime_and_device_are_one_line_errors(tmp_path):
    m = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(m))
    usable = [k for k, v in AVAILABLE.items() if v is None]
    cases = [(["profile", str(m), "--runtime", "openvino", "--device", "NPU7"], "available devices: "),
             (["profile", str(m), "--runtime", "openvino", "--provider", "cuda"], "--device"),
             (["profile", str(m), "--precision", "int8"], "available here: fp32"),
             (["run", str(m), "--passes", "cleanup", "-o", str(tmp_path / "o.onnx"), "--runtime", "openvino",
               "--device", "NPU7"], "available devices: ")]
    if AVAILABLE["tensorrt"] is not None:
        cases.append((["profile", str(m), "--runtime", "tensorrt"], "available runtimes: " + ", ".join(usable)))
    if AVAILABLE["openvino"] is not None:
        cases = [c for c in cases if "--device" not in c[0]]
    for argv, needle in cases:
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 2, (argv, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prunec: error: ") and needle in lines[0], (argv, lines)
    assert not (tmp_path / "o.onnx").exists()


def test_cuda_reports_why_there_is_no_device():
    why = cuda.why_no_device()
    if why is None:
        assert cuda.devices() and all(d.startswith("cuda:") for d in cuda.devices())
    else:
        assert cuda.devices() == [] and ("libcuda" in why or "no device" in why)
        with pytest.raises(RuntimeUnavailableError, match="available runtimes: ort"):
            get_runtime("tensorrt")


# --- TensorRT: parsing runs anywhere, engines need a GPU ---------------------------------------

def test_tensorrt_sparse_reports_are_parsed():
    from prunec.runtime.tensorrt_runtime import parse_sparse_log, sparse_tactic_layers

    log = ["[I] (Sparsity) Layers eligible for sparse math: conv1, conv2 + relu2, fc",
           "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2 + relu2, fc",
           "[V] something else"]
    assert parse_sparse_log(log) == ["conv2 + relu2", "fc"]
    doc = {"Layers": [{"Name": "conv1", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16"},
                      {"Name": "conv2 + relu2", "TacticName": "sm80_xmma_fprop_sparse_conv_f16f16_128x128"},
                      "a layer without details"]}
    assert sparse_tactic_layers(doc) == ["conv2 + relu2"]


def _two_four(model: onnx.ModelProto) -> onnx.ModelProto:
    from prunec.passes import PassManager, build_passes

    out, _ = PassManager(build_passes(["2to4"], {"2to4": {"min-size": "1"}})).run(model)
    return out


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engines_report_sparse_layers(precision, feeds):
    target = Target("tensorrt", precision=precision)
    rt = _runtime_or_skip(target)
    model = _two_four(small_cnn(width=64))
    prof = rt.op_profile(model, feeds, target, runs=3, batch=2)
    assert isinstance(prof.sparse_layers, list) and prof.source == "TensorRT IProfiler"
    names = {n.name for n in model.graph.node}
    for layer in prof.sparse_layers:  # TensorRT names fused layers "a + b" after the ONNX nodes
        assert {p.strip() for p in layer.split("+")} & names, layer


# --- round=auto per target ---------------------------------------------------------------------

def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_round_auto_documented_multiple_per_target():
    cpu_block = 16 if "avx512f" in _flags() else 8  # MLAS NCHWc / OpenVINO brgconv: one vector of fp32
    expected = {"ort-cpu": cpu_block, "openvino-cpu": cpu_block, "openvino-cpu-bf16": 32,
                "openvino-cpu-fp16": 32, "openvino-gpu": 16, "openvino-npu": 1, "ort-cuda": 8,
                "tensorrt-fp32": 4, "tensorrt-fp16": 8, "tensorrt-int8": 32, "ort-tensorrt-fp32": 4,
                "ort-tensorrt-fp16": 8, "ort-tensorrt-int8": 32}
    assert set(expected) == set(KNOWN_TARGETS)
    for key, multiple in expected.items():
        assert channel_multiple(key)[0] == multiple, key
        assert parse_target_key(key).key == key  # keys round-trip through Target
    with pytest.raises(OptionError, match="tensorrt-fp16"):
        parse_target_key("tensorrt-fp8")


def _kept(model, ctx=None, **opts):
    passes = build_passes(["channels"], {"channels": {k.replace("_", "-"): str(v) for k, v in opts.items()}})
    _, rep = PassManager(passes, ctx=ctx or PassContext()).run(model)
    d = rep.passes[0].result.details
    return d, {g["id"]: (g["size"], g["kept"]) for g in d["group_table"] if not g["frozen"]}


@pytest.mark.parametrize("key,multiple", [("tensorrt-fp16", 8), ("tensorrt-int8", 32), ("tensorrt-fp32", 4)])
def test_round_auto_keeps_the_target_multiple(key, multiple):
    model = small_cnn(width=100)
    d, kept = _kept(model, ratio=0.3, target=key)
    assert d["target"] == key and d["round"] == multiple
    assert kept and all(k % multiple == 0 for _, k in kept.values()), kept
    # floor(100 * 0.3) = 30 removed -> 70 kept, moved to the nearest multiple (ties keep more).
    assert list(kept.values())[0][1] == {8: 72, 32: 64, 4: 72}[multiple]


def test_round_auto_follows_the_run_target_and_explicit_target_wins():
    model = small_cnn(width=100)
    d, _ = _kept(model, ctx=PassContext(target=Target("tensorrt", precision="int8")), ratio=0.3)
    assert d["target"] == "tensorrt-int8" and d["round"] == 32
    d, _ = _kept(model, ctx=PassContext(target=Target("tensorrt", precision="int8")), ratio=0.3,
                 target="tensorrt-fp16")
    assert d["target"] == "tensorrt-fp16" and d["round"] == 8
    d, _ = _kept(model, ratio=0.3)
    assert d["target"] == "ort-cpu"


def test_cli_runtime_sets_the_channels_target(tmp_path):
    m, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(small_cnn(width=100), str(m))
    res = CliRunner().invoke(cli, ["run", str(m), "--passes", "channels", "-O", "channels.ratio=0.3", "-o", str(out),
                                   "--report", str(rep), "--no-profile", "--runtime", "tensorrt", "--precision", "int8"])
    assert res.exit_code == 0, res.output
    details = json.loads(rep.read_text())["passes"][0]["details"]
    assert details["target"] == "tensorrt-int8" and details["round"] == 32
    res = CliRunner().invoke(cli, ["run", str(m), "--passes", "channels", "-O", "channels.target=nope",
                                   "-o", str(out), "--no-profile"])
    assert res.exit_code == 2 and "channels.target 'nope'" in res.stderr


# --- round=measure -------------------------------------------------------------------------------

def test_measure_candidates_and_choice():
    from prunec.passes.channel_widths import candidate_widths, choose_width

    # k = 45 of 64: multiples of 4/8/16/32 around it within 25% (34..56): 40, 44, 48, 32 is too far.
    assert candidate_widths(45, 64) == [40, 44, 45, 48]
    assert candidate_widths(45, 46) == [40, 44, 45]  # never more than the group has
    assert candidate_widths(3, 64, minimum=2) == [3, 4]
    with pytest.raises(OptionError, match="global"):
        build_passes(["channels"], {"channels": {"round": "measure", "global": "true"}})
    # 48 channels in the time of 45: more channels per ms (36.9 vs 33.3, 33.8, 32.1) wins.
    assert choose_width(45, {40: 1.2, 44: 1.3, 45: 1.4, 48: 1.3}) == 48
    # All equally efficient (time proportional to width): keep the width asked for.
    assert choose_width(45, {40: 40.0, 44: 44.0, 45: 45.0, 48: 48.0}) == 45


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_round_measure_times_candidates_on_the_target(runtime):
    target = Target(runtime)
    _runtime_or_skip(target)
    model = small_cnn(width=100)
    d, kept = _kept(model, ctx=PassContext(target=target), ratio=0.3, round="measure")
    widths = d["measured_widths"]
    assert d["target"] == target.key and widths
    for gid, w in widths.items():
        assert w["nominal"] == 70 and str(w["chosen"]) in w["ms"] and kept[gid][1] == w["chosen"]
        assert set(w["ms"]) == {"64", "68", "70", "72", "80"}
        assert all(t > 0 for t in w["ms"].values())
    # One group (conv1 and conv2 are joined by the residual Add); its costliest producer and
    # consumer are both conv2 (256 * w * w MACs against conv1's 256 * 27 * w and fc's 10 * w).
    assert [w["layers"] for w in widths.values()] == [["conv2", "conv2"]]
