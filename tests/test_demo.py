"""The bundled demo model has the structure the issue asks for, and its script regenerates it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from models import DEMO_TEST, REPO, run


def test_bundled_model_structure(demo_path, demo_model):
    assert demo_path.stat().st_size < 2 * 2**20
    hist = Counter(n.op_type for n in demo_model.graph.node)
    assert hist["BatchNormalization"] >= 5 and hist["Add"] >= 2  # residual blocks with BN
    assert hist["Concat"] == 1 and hist["Gemm"] == 1 and hist["GlobalAveragePool"] == 1
    weights = {t.name: t.dims for t in demo_model.graph.initializer}
    convs = [n for n in demo_model.graph.node if n.op_type == "Conv"]
    one_by_one = [n for n in convs if list(weights[n.input[1]][2:]) == [1, 1]]
    # A 1x1 projection shortcut where the channel count changes.
    assert any(weights[n.input[1]][0] != weights[n.input[1]][1] for n in one_by_one)
    assert max(weights[n.input[1]][0] for n in convs) >= 32
    assert [i.name for i in demo_model.graph.input] == ["image"]
    assert [o.name for o in demo_model.graph.output] == ["logits"]


def test_held_out_data_and_accuracy(demo_model, demo_data):
    assert set(demo_data) == {"image", "labels"}
    x, y = demo_data["image"], demo_data["labels"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
    assert 0.25 <= len(y) / 1797 <= 0.31  # 30% of scikit-learn's 1797 digits
    assert set(np.bincount(y)) <= set(range(50, 58))  # stratified: ~54 per class
    acc = (run(demo_model, {"image": x})["logits"].argmax(1) == y).mean()
    assert acc >= 0.98


def test_make_demo_script_regenerates(tmp_path):
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "models" / "make_demo.py"), "--epochs", "1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["demo_cnn.onnx", "demo_digits_test.npz", "demo_digits_train.npz"]
    onnx.checker.check_model(str(tmp_path / "demo_cnn.onnx"), full_check=True)
    # The split does not depend on training: it must equal the bundled one exactly.
    with np.load(tmp_path / "demo_digits_test.npz") as new, np.load(DEMO_TEST) as bundled:
        for k in ("image", "labels"):
            np.testing.assert_array_equal(new[k], bundled[k])
    assert (tmp_path / "demo_digits_train.npz").stat().st_size < 2**20
