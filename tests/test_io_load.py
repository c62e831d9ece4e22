"""Every way an input model can be wrong gives one error line, exit code 2, and no output file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from models import REPO, bn_spatial0_opset8, conv_relu_model, files_in, run
from prunec.errors import ModelLoadError
from prunec.graph.io import default_opset, load_model


def _fails_cleanly(prunec_cli, folder, model_arg, *expect: str) -> str:
    """`prunec run` and `prunec inspect` both fail with one line naming the problem; nothing written."""
    before = files_in(folder)
    out = folder / "out.onnx"
    report = folder / "report.json"
    res = prunec_cli("run", model_arg, "--passes", "cleanup", "-o", out, "--report", report)
    assert res.exit_code == 2, res.output
    line = prunec_cli.one_line_error(res)
    for e in expect:
        assert e in line, line
    assert files_in(folder) == before  # no output, no report, no temp files
    res = prunec_cli("inspect", model_arg, "--json")
    assert res.exit_code == 2
    assert prunec_cli.one_line_error(res) == line
    assert res.stdout == ""
    return line


def test_missing_path(prunec_cli, tmp_path):
    _fails_cleanly(prunec_cli, tmp_path, tmp_path / "nope.onnx", "nope.onnx", "no such file")


def test_directory(prunec_cli, tmp_path):
    (tmp_path / "adir.onnx").mkdir()
    _fails_cleanly(prunec_cli, tmp_path, tmp_path / "adir.onnx", "adir.onnx", "is a directory")


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", b"\x00" * 7, b""],
                         ids=["text", "zeros", "empty"])
def test_not_protobuf(prunec_cli, tmp_path, content):
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    line = _fails_cleanly(prunec_cli, tmp_path, p, "junk.onnx")
    assert "not" in line and ("ONNX" in line)


def test_random_bytes_not_onnx(prunec_cli, tmp_path):
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails_cleanly(prunec_cli, tmp_path, p, "random.onnx", "ONNX")


@pytest.mark.parametrize("what", ["no-graph", "no-opset"])
def test_valid_protobuf_but_not_a_model(prunec_cli, tmp_path, what):
    m = conv_relu_model()
    if what == "no-graph":
        m.ClearField("graph")
    else:
        del m.opset_import[:]
    p = tmp_path / "hollow.onnx"
    p.write_bytes(m.SerializeToString())
    _fails_cleanly(prunec_cli, tmp_path, p, "hollow.onnx", "not an ONNX model")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    # onnx.save_model(save_as_external_data=True) rewrites the tensors of the model it is given.
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _opset_field_bytes(model: onnx.ModelProto) -> int:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.opset_import[:]
    return model.ByteSize() - m.ByteSize()


@pytest.mark.parametrize("cut", ["byte1", "tenth", "half", "last-byte", "before-opset"])
def test_truncated(prunec_cli, tmp_path, demo_model, cut):
    raw = demo_model.SerializeToString()
    n = {"byte1": 1, "tenth": len(raw) // 10, "half": len(raw) // 2, "last-byte": len(raw) - 1,
         "before-opset": len(raw) - _opset_field_bytes(demo_model)}[cut]
    p = tmp_path / "cut.onnx"
    p.write_bytes(raw[:n])
    line = _fails_cleanly(prunec_cli, tmp_path, p, "cut.onnx")
    assert "truncated" in line or "not an ONNX model" in line


def _external(tmp_path, demo_model):
    p = tmp_path / "ext.onnx"
    onnx.save_model(_copy(demo_model), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    return p, tmp_path / "ext.onnx.data"


def test_missing_external_data(prunec_cli, tmp_path, demo_model):
    p, data = _external(tmp_path, demo_model)
    data.unlink()
    _fails_cleanly(prunec_cli, tmp_path, p, "missing external data file", "ext.onnx.data")


def test_truncated_external_data(prunec_cli, tmp_path, demo_model):
    p, data = _external(tmp_path, demo_model)
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) - 100])
    line = _fails_cleanly(prunec_cli, tmp_path, p, "ext.onnx", "external data")
    assert "truncated" in line or "exceeds available data" in line


def test_external_data_outside_model_folder_refused(prunec_cli, tmp_path, demo_model):
    sub = tmp_path / "sub"
    sub.mkdir()
    p = sub / "m.onnx"
    onnx.save_model(_copy(demo_model), str(p), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    (sub / "m.onnx.data").rename(tmp_path / "m.onnx.data")
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.onnx.data"
    p.write_bytes(m.SerializeToString())
    _fails_cleanly(prunec_cli, tmp_path, p, "outside")


def test_external_data_loads(tmp_path, demo_model):
    p, _ = _external(tmp_path, demo_model)
    loaded = load_model(p)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in demo_model.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.model.graph.initializer}
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_old_opset_that_cannot_be_converted(prunec_cli, tmp_path):
    p = tmp_path / "bn8.onnx"
    onnx.save(bn_spatial0_opset8(), str(p))
    _fails_cleanly(prunec_cli, tmp_path, p, "bn8.onnx", "opset 8", "cannot be converted")


@pytest.mark.parametrize("opset", [9, 10])
def test_old_opset_is_converted(prunec_cli, tmp_path, opset):
    model = conv_relu_model(opset=opset, ir_version=4)
    p = tmp_path / f"conv{opset}.onnx"
    onnx.save(model, str(p))
    loaded = load_model(p)
    assert loaded.converted_from_opset == opset
    assert default_opset(loaded.model) >= 11
    out = tmp_path / "out.onnx"
    res = prunec_cli("run", p, "--passes", "cleanup", "-o", out)
    assert res.exit_code == 0, res.output
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert default_opset(saved) >= 11
    assert saved.ir_version >= onnx.helper.find_min_ir_version_for(saved.opset_import)
    x = {"x": np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(saved, x)["y"], run(model, x)["y"], rtol=1e-6, atol=1e-6)
    res = prunec_cli("inspect", p)
    assert res.exit_code == 0 and f"converted in memory from opset {opset}" in res.stdout


def test_no_conversion_when_disabled(tmp_path):
    p = tmp_path / "conv9.onnx"
    onnx.save(conv_relu_model(opset=9, ir_version=5), str(p))
    with pytest.raises(ModelLoadError, match="opset 9 is older than 11"):
        load_model(p, convert_old_opset=False)


def test_subprocess_exit_code_and_one_line(tmp_path):
    # The real console entry point, not the in-process runner.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "prunec", "run", str(tmp_path / "missing.onnx"),
                          "--passes", "cleanup", "-o", str(tmp_path / "o.onnx")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"prunec: error: {tmp_path / 'missing.onnx'}: no such file"]
    assert list(tmp_path.iterdir()) == []
