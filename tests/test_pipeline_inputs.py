"""Inputs a user cannot describe today (issue 13): dims fixed to -1 (PaddleOCR's classifier),
and inputs that need a real value (silero-vad's `sr`): --feed, and values the model names itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models import files_in, init, make_model, run, vi
from prunec.runtime.inputs import graph_inputs, model_named_values, parse_feeds, random_inputs


def paddle_like(width=8) -> onnx.ModelProto:
    """x[-1,3,8,W] -> Conv(8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[-1,2]: -1 dims."""
    r = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="fc")],
        [vi("x", [-1, 3, 8, width])], [vi("y", [-1, 2])],
        [init("w", r.standard_normal((8, 3, 3, 3)).astype(np.float32)), init("b", np.zeros(8, np.float32)),
         init("g", r.standard_normal((8, 2)).astype(np.float32)), init("gb", np.zeros(2, np.float32))])


def test_minus_one_batch_dim_is_a_batch(prunec_cli, tmp_path):
    p = tmp_path / "cls.onnx"
    onnx.save(paddle_like(), str(p))
    assert graph_inputs(onnx.load(str(p)))[0].dims == ("?", 3, 8, 8)
    res = prunec_cli("run", p, "--passes", "channels", "-O", "channels.ratio=0.5", "-O", "channels.round=1",
                     "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json", "--no-profile")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["input_shapes"] == {"x": [1, 3, 8, 8]}
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # the interface is kept
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert run(out, {"x": x})["y"].shape == (3, 2)
    # --input-shape may set a -1 dim: it is not "fixed to -1".
    res = prunec_cli("inspect", p, "--input-shape", "x=4x3x8x8", "--json", "-")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input_shapes"] == {"x": [4, 3, 8, 8]}


def test_minus_one_non_batch_dim_asks_for_a_size(prunec_cli, tmp_path):
    p = tmp_path / "cls.onnx"
    onnx.save(paddle_like(width=-1), str(p))
    res = prunec_cli("run", p, "--passes", "fold-bn", "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2
    err = prunec_cli.one_line_error(res)
    assert "--input-shape x=1x3x8x<?>" in err and "-1" not in err
    # ... before anything reads the data (the gate would run the original over all of it first)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    res = prunec_cli("run", p, "--passes", "fold-bn", "-o", tmp_path / "out.onnx", "--data", bad)
    assert res.exit_code == 2 and "--input-shape x=1x3x8x<?>" in prunec_cli.one_line_error(res)
    res = prunec_cli("run", p, "--passes", "fold-bn", "-o", tmp_path / "out.onnx", "--input-shape", "x=1x3x8x16",
                     "--no-profile")
    assert res.exit_code == 0, res.output


def vad_like(hidden: bool = False, metadata: dict | None = None) -> onnx.ModelProto:
    """x[N,4], sr[] (int64) -> If(sr == 16000) then x else Reshape(x, [7,7]) (fails) -> MatMul -> y.

    Like silero-vad, it only runs for the sample rate it was made for. With `hidden`, the
    constant is computed (8000 + 8000), so only --feed or metadata can say what sr must be."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "one"], ["ht"])], "then", [], [vi("ht", ["N", 4])],
                             [init("one", np.ones(4, np.float32))])
    other = helper.make_graph([helper.make_node("Reshape", ["x", "bad"], ["he"])], "else", [],
                              [helper.make_tensor_value_info("he", TensorProto.FLOAT, None)],
                              [init("bad", np.array([7, 7], np.int64))])
    nodes, inits = [], [init("W", np.eye(4, dtype=np.float32) * 2)]
    if hidden:
        nodes.append(helper.make_node("Add", ["half", "half"], ["ref"]))
        inits.append(init("half", np.array(8000, np.int64)))
    else:
        inits.append(init("ref", np.array(16000, np.int64)))
    nodes += [helper.make_node("Equal", ["sr", "ref"], ["ok"]),
              helper.make_node("If", ["ok"], ["h"], then_branch=then, else_branch=other),
              helper.make_node("MatMul", ["h", "W"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4]), vi("sr", [], TensorProto.INT64)], [vi("y", ["N", 4])], inits)
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def test_model_named_values():
    assert {k: (v.item(), why) for k, (v, why) in model_named_values(vad_like()).items()} == \
        {"sr": (16000, "the model compares it with 16000")}
    assert model_named_values(vad_like(hidden=True)) == {}
    named = model_named_values(vad_like(hidden=True, metadata={"sr": "16000,8000"}))
    assert named["sr"][0].item() == 16000 and "metadata" in named["sr"][1]
    feeds = random_inputs(vad_like(), {"x": (2, 4), "sr": ()}, feeds={})
    assert feeds["sr"].dtype == np.int64 and feeds["sr"].item() == 16000
    # --feed wins over what the model names.
    assert random_inputs(vad_like(), {"x": (2, 4), "sr": ()}, feeds={"sr": np.array(8000)})["sr"] == 8000


def test_parse_feeds(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((2, 1, 3), np.float32))
    f = parse_feeds(["sr=16000", "t=0.5", "v=1,2,3", f"s={tmp_path / 's.npy'}"])
    assert f["sr"].dtype.kind == "i" and f["sr"].item() == 16000 and f["t"].item() == 0.5
    assert f["v"].tolist() == [1, 2, 3] and f["s"].shape == (2, 1, 3)
    from prunec.errors import InputShapeError

    for bad in ("sr", "sr=", "=1", "sr=abc", f"s={tmp_path / 'missing.npy'}"):
        with pytest.raises(InputShapeError, match="--feed"):
            parse_feeds([bad])


def test_feed_reaches_verification(prunec_cli, tmp_path):
    seen, hidden = tmp_path / "vad.onnx", tmp_path / "hidden.onnx"
    onnx.save(vad_like(), str(seen))
    onnx.save(vad_like(hidden=True), str(hidden))
    out = tmp_path / "out.onnx"
    # The model names 16000 itself: prunec uses it and says so.
    res = prunec_cli("run", seen, "--passes", "cleanup", "-o", out, "--no-profile")
    assert res.exit_code == 0, res.output
    assert "input 'sr' is fed 16000 (the model compares it with 16000)" in res.stdout
    out.unlink()
    # Nothing names it: the input model cannot run (exit 2, not a verification failure).
    res = prunec_cli("run", hidden, "--passes", "cleanup", "-o", out, "--no-profile")
    assert res.exit_code == 2
    assert "cannot run the input model" in prunec_cli.one_line_error(res) and "--feed" in res.stderr
    res = prunec_cli("run", hidden, "--passes", "cleanup", "-o", out, "--feed", "sr=16000", "--no-profile")
    assert res.exit_code == 0, res.output
    # A wrong --feed overrides the model's own value (and fails the same way).
    res = prunec_cli("run", seen, "--passes", "cleanup", "-o", out, "--feed", "sr=8000", "--no-profile")
    assert res.exit_code == 2 and "input model" in prunec_cli.one_line_error(res)
    res = prunec_cli("run", seen, "--passes", "cleanup", "-o", out, "--feed", "rate=1")
    assert res.exit_code == 2 and "the model's inputs are sr, x" in prunec_cli.one_line_error(res)
    res = prunec_cli("run", seen, "--passes", "cleanup", "-o", out, "--feed", "sr=0.5")
    assert res.exit_code == 2 and "int64" in prunec_cli.one_line_error(res)


def test_feed_reaches_profiling_and_the_gate(prunec_cli, tmp_path):
    hidden = tmp_path / "hidden.onnx"
    onnx.save(vad_like(hidden=True), str(hidden))
    res = prunec_cli("profile", hidden, "--runs", "3", "--no-ops", "--no-memory")
    assert res.exit_code == 2
    assert "cannot run the model on prunec's made-up inputs" in prunec_cli.one_line_error(res)
    res = prunec_cli("profile", hidden, "--runs", "3", "--no-ops", "--feed", "sr=16000")  # memory: child process
    assert res.exit_code == 0, res.output
    x = np.random.default_rng(0).uniform(0.1, 1, (40, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)  # no `sr` array: it is one value for every sample
    res = prunec_cli("check", hidden, hidden, "--data", tmp_path / "d.npz", "--json", tmp_path / "g.json")
    assert res.exit_code == 2 and "--feed sr=VALUE" in prunec_cli.one_line_error(res)
    res = prunec_cli("check", hidden, hidden, "--data", tmp_path / "d.npz", "--feed", "sr=16000")
    assert res.exit_code == 0, res.output
    np.savez(tmp_path / "both.npz", x=x, sr=np.full(40, 16000))
    res = prunec_cli("check", hidden, hidden, "--data", tmp_path / "both.npz", "--feed", "sr=16000")
    assert res.exit_code == 2 and "both in the data and given with --feed" in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == {"hidden.onnx", "d.npz", "both.npz"}
