"""Saving: atomic (no half-written target, no temp files), never over the input unless asked,
external data when forced or when the model passes the (lowered) size threshold."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import prunec.graph.io as io
from models import conv_relu_model, files_in, make_model, ops, run, vi
from onnx import helper
from prunec.errors import ModelSaveError
from prunec.graph.io import load_model, save_model


@pytest.fixture(scope="module")
def small_model() -> onnx.ModelProto:
    return conv_relu_model()


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32)}


def test_save_writes_loadable_model_and_nothing_else(tmp_path, small_model):
    out = save_model(small_model, tmp_path / "m.onnx")
    assert files_in(tmp_path) == {"m.onnx"}
    assert onnx.load(str(out)) == small_model


# The external-data path does not fsync, so that failure point only exists inline.
@pytest.mark.parametrize("fail_at,external", [("fsync", False), ("replace", False), ("replace", True)])
def test_failure_during_save_leaves_target_untouched(tmp_path, small_model, monkeypatch, fail_at,
                                                     external):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous contents")
    real_replace = os.replace

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if fail_at == "fsync":
        monkeypatch.setattr(io.os, "fsync", boom)
    else:
        # Fail the final rename of the model (the data file may already be in place).
        monkeypatch.setattr(io.os, "replace",
                            lambda src, dst: boom() if str(dst) == str(target) else real_replace(src, dst))
    with pytest.raises(ModelSaveError, match="cannot write: No space left"):
        save_model(small_model, target, external_data=external)
    assert target.read_bytes() == b"previous contents"
    leftovers = {f for f in files_in(tmp_path) if f != "m.onnx" and f != "m.onnx.data"}
    assert leftovers == set(), leftovers


def test_interrupt_during_save_cleans_up(tmp_path, small_model, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(small_model, tmp_path / "m.onnx")
    assert files_in(tmp_path) == set()


def test_refuses_to_overwrite_input(tmp_path, small_model):
    p = tmp_path / "m.onnx"
    onnx.save(small_model, str(p))
    before = p.read_bytes()
    for spelling in (p, tmp_path / "." / "m.onnx"):
        with pytest.raises(ModelSaveError, match="--in-place"):
            save_model(small_model, spelling, input_path=p)
    assert p.read_bytes() == before
    save_model(small_model, p, input_path=p, in_place=True)
    assert files_in(tmp_path) == {"m.onnx"}


def test_refuses_to_overwrite_input_through_symlink(tmp_path, small_model):
    p = tmp_path / "m.onnx"
    onnx.save(small_model, str(p))
    link = tmp_path / "link.onnx"
    link.symlink_to(p)
    with pytest.raises(ModelSaveError, match="--in-place"):
        save_model(small_model, link, input_path=p)


def test_bad_output_paths(tmp_path, small_model):
    with pytest.raises(ModelSaveError, match="is a directory"):
        save_model(small_model, tmp_path)
    with pytest.raises(ModelSaveError, match="does not exist"):
        save_model(small_model, tmp_path / "no" / "m.onnx")
    assert files_in(tmp_path) == set()


def _identity_model() -> onnx.ModelProto:
    """x -> Identity -> Relu -> y: cleanup changes it, so an in-place run visibly rewrites it."""
    return make_model([helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
                      [vi("x", ["N", 3])], [vi("y", ["N", 3])])


def test_cli_refuses_to_overwrite_input(prunec_cli, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_identity_model(), str(p))
    before = p.read_bytes()
    res = prunec_cli("run", p, "--passes", "cleanup", "-o", p)
    assert res.exit_code == 2
    assert "--in-place" in prunec_cli.one_line_error(res)
    res = prunec_cli("run", p, "--passes", "cleanup")
    assert res.exit_code == 2
    assert "no output given" in prunec_cli.one_line_error(res)
    assert p.read_bytes() == before
    assert files_in(tmp_path) == {"m.onnx"}


@pytest.mark.parametrize("with_o", [False, True])
def test_cli_in_place(prunec_cli, tmp_path, with_o):
    p = tmp_path / "m.onnx"
    onnx.save(_identity_model(), str(p))
    args = ["run", p, "--passes", "cleanup", "--in-place"] + (["-o", p] if with_o else [])
    res = prunec_cli(*args)
    assert res.exit_code == 0, res.output
    assert ops(onnx.load(str(p))) == ["Relu"]
    assert files_in(tmp_path) == {"m.onnx"}


def test_forced_external_data_with_only_small_tensors(tmp_path, small_model):
    out = save_model(small_model, tmp_path / "m.onnx", external_data=True)
    assert files_in(tmp_path) <= {"m.onnx", "m.onnx.data"}
    x = _feeds()
    np.testing.assert_array_equal(run(load_model(out).model, x)["y"], run(small_model, x)["y"])


def test_external_data_round_trip(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                        helper.make_node("Add", ["h", "b"], ["h2"]),
                        helper.make_node("Slice", ["h2", "s0", "s1"], ["y"])],
                       [vi("x", ["N", 64])], [vi("y", ["N", 3])],
                       [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.zeros(32, np.float32), "b"),
                        onnx.numpy_helper.from_array(np.array([0]), "s0"),
                        onnx.numpy_helper.from_array(np.array([3]), "s1")])
    out = save_model(model, tmp_path / "big.onnx", external_data=True)
    assert files_in(tmp_path) == {"big.onnx", "big.onnx.data"}
    raw = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}  # the final name, not the temp file's
    assert os.path.getsize(tmp_path / "big.onnx.data") >= w.nbytes
    loaded = load_model(out).model
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    x = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run(loaded, x)["y"], run(model, x)["y"])


def test_external_data_switch_by_size(tmp_path, monkeypatch, demo_model):
    nbytes = io.weight_bytes(demo_model)
    assert nbytes > 300_000
    save_model(demo_model, tmp_path / "inline.onnx")
    assert files_in(tmp_path) == {"inline.onnx"}
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", nbytes - 1)
    save_model(demo_model, tmp_path / "ext.onnx")
    assert files_in(tmp_path) == {"inline.onnx", "ext.onnx", "ext.onnx.data"}
    assert os.path.getsize(tmp_path / "ext.onnx") < 100_000
    loaded = load_model(tmp_path / "ext.onnx").model
    assert [n for n in loaded.graph.node] == [n for n in demo_model.graph.node]
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in demo_model.graph.initializer}


def test_cli_writes_external_data_above_threshold(prunec_cli, tmp_path, monkeypatch, demo_path,
                                                  demo_data):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "o.onnx"
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", out)
    assert res.exit_code == 0, res.output
    assert files_in(tmp_path) == {"o.onnx", "o.onnx.data"}
    feeds = {"image": demo_data["image"][:16]}
    got = run(load_model(out).model, feeds)["logits"]
    want = run(onnx.load(str(demo_path)), feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_saved_files_get_normal_permissions(tmp_path, small_model):
    import stat as st

    from prunec.report.files import write_text_atomic

    umask = os.umask(0o022)
    try:
        save_model(small_model, tmp_path / "m.onnx")
        write_text_atomic(tmp_path / "r.json", "{}")
        for name in ("m.onnx", "r.json"):
            assert st.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        # Overwriting keeps the existing file's mode.
        (tmp_path / "m.onnx").chmod(0o640)
        save_model(small_model, tmp_path / "m.onnx")
        assert st.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o640
    finally:
        os.umask(umask)
