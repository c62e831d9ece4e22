"""The commands end to end: inspect (--json schema), passes, run (--report), and issue 3's
done-when on the bundled demo model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from models import files_in, ops, rel_err, run
from prunec.passes import registry


@pytest.fixture(scope="module")
def demo_run(prunec_cli, demo_path, tmp_path_factory):
    """`prunec run demo --passes fold-bn,cleanup -o out.onnx --report r.json`, once per module."""
    d = tmp_path_factory.mktemp("demo_run")
    res = prunec_cli("run", demo_path, "--passes", "fold-bn,cleanup", "-o", d / "out.onnx",
                     "--report", d / "report.json")
    assert res.exit_code == 0, res.output + res.stderr
    return d, res


def test_done_when_outputs_match_on_held_out_data(demo_run, demo_model, demo_data):
    d, _ = demo_run
    out = onnx.load(str(d / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert "BatchNormalization" not in ops(out) and "Identity" not in ops(out)
    feeds = {"image": demo_data["image"]}
    want, got = run(demo_model, feeds)["logits"], run(out, feeds)["logits"]
    assert got.shape == want.shape == (len(demo_data["labels"]), 10)
    assert rel_err(want, got) < 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Same predictions, and the model is the accurate one the README advertises.
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert (want.argmax(1) == demo_data["labels"]).mean() > 0.95
    # The batch axis stays symbolic.
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_done_when_summary_shows_node_counts(demo_run, demo_model, demo_path):
    d, res = demo_run
    out = onnx.load(str(d / "out.onnx"))
    before, after = len(demo_model.graph.node), len(out.graph.node)
    assert (before, after) == (40, 27)
    assert f"{before} → {after}" in res.stdout
    # The closing line repeats the command, whatever sys.argv is.
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"PASSED: wrote {d / 'out.onnx'} (exact; checks: ")
    assert line.endswith(f" | prunec run {demo_path} --passes fold-bn,cleanup "
                         f"-o {d / 'out.onnx'} --report {d / 'report.json'}")
    assert files_in(d) == {"out.onnx", "report.json"}


def test_run_report_json(demo_run, demo_model, demo_path):
    d, _ = demo_run
    doc = json.loads((d / "report.json").read_text())
    assert set(doc) >= {"input", "output", "passes_requested", "before", "after", "input_shapes",
                        "passes", "final_deviation"}
    assert doc["input"] == str(demo_path) and doc["output"] == str(d / "out.onnx")
    assert doc["passes_requested"] == ["fold-bn", "cleanup"]
    assert doc["input_shapes"] == {"image": [1, 1, 8, 8]}
    out = onnx.load(str(d / "out.onnx"))
    assert doc["before"]["nodes"] == len(demo_model.graph.node)
    assert doc["after"]["nodes"] == len(out.graph.node)
    assert doc["before"]["macs"] == doc["after"]["macs"] > 0  # folding BN does not change MACs
    assert doc["after"]["params"] < doc["before"]["params"]
    fold, clean = doc["passes"]
    assert [fold["name"], clean["name"]] == ["fold-bn", "cleanup"]
    assert fold["details"]["folded"] == 11 and fold["skipped"] == []
    assert fold["before"] == doc["before"] and clean["after"] == doc["after"]
    assert fold["after"] == clean["before"]
    assert fold["changed"] is True
    # The Identity nodes feeding BN parameters die with the BNs, so cleanup finds nothing left.
    assert clean["changed"] is False and clean["before"]["nodes"] == clean["after"]["nodes"]
    for p in doc["passes"]:
        assert p["exact"] is True
        assert p["verification"]["exact"] is True
        assert p["verification"]["max_rel"] <= p["verification"]["rtol"]
        assert set(p) >= {"options", "details", "skipped", "before", "after", "seconds"}
    assert clean["options"] == {"fold_constants": True, "fold_size_limit": 16 * 2**20,
                                "remove_identity": True}
    assert doc["final_deviation"]["logits"]["rel"] < 1e-5
    assert set(doc["final_deviation"]["logits"]) == {"max_abs", "rel", "cosine"}


def test_inspect_json_schema(prunec_cli, demo_path, demo_model):
    res = prunec_cli("inspect", demo_path, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert set(doc) == {"model", "opset", "ir_version", "producer", "file_bytes", "inputs", "outputs",
                        "nodes", "params", "macs", "macs_min", "unknown_mac_layers", "op_histogram", "layers",
                        "input_shapes", "chosen_dims"}
    assert doc["chosen_dims"] == {}  # only the batch is symbolic
    assert doc["opset"] == 17 and doc["producer"] == "pytorch"
    assert doc["file_bytes"] == demo_path.stat().st_size
    assert doc["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["N", 1, 8, 8]}]
    assert doc["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}]
    assert doc["nodes"] == len(demo_model.graph.node)
    assert doc["op_histogram"] == dict(Counter(n.op_type for n in demo_model.graph.node))
    # Every float initializer is a parameter (BN running stats included).
    assert doc["params"] == sum(int(np.prod(t.dims)) for t in demo_model.graph.initializer)
    assert doc["unknown_mac_layers"] == []
    assert doc["input_shapes"] == {"image": [1, 1, 8, 8]}
    layer_keys = {"name", "op_type", "params", "macs", "output_shape", "weight_shape"}
    assert all(set(layer) == layer_keys for layer in doc["layers"])
    convs = [layer for layer in doc["layers"] if layer["op_type"] == "Conv"]
    assert len(convs) == 11 and convs[0]["weight_shape"] == [16, 1, 3, 3]
    assert convs[0]["output_shape"] == [1, 16, 8, 8] and convs[0]["macs"] == 16 * 64 * 9
    assert sum(layer["macs"] for layer in doc["layers"]) == doc["macs"]


def test_inspect_batch_and_input_shape(prunec_cli, demo_path):
    base = json.loads(prunec_cli("inspect", demo_path, "--json").stdout)["macs"]
    b4 = json.loads(prunec_cli("inspect", demo_path, "--json", "--batch", "4").stdout)
    assert b4["macs"] == 4 * base and b4["input_shapes"] == {"image": [4, 1, 8, 8]}
    s2 = json.loads(prunec_cli("inspect", demo_path, "--json", "--input-shape", "image=2x1x8x8").stdout)
    assert s2["macs"] == 2 * base
    res = prunec_cli("inspect", demo_path, "--input-shape", "image=2x3x8x8")
    assert res.exit_code == 2 and "axis 1 is fixed to 1" in prunec_cli.one_line_error(res)
    res = prunec_cli("inspect", demo_path, "--input-shape", "images=2x1x8x8")
    assert res.exit_code == 2 and "the model's inputs are image" in prunec_cli.one_line_error(res)


def test_inspect_tables(prunec_cli, demo_path):
    res = prunec_cli("inspect", demo_path)
    assert res.exit_code == 0
    for text in ("image", "logits", "BatchNormalization", "Conv", "total", "MACs 1.77M"):
        assert text in res.stdout, text


def test_passes_lists_every_pass_and_option(prunec_cli):
    res = prunec_cli("passes")
    assert res.exit_code == 0
    for name in registry():
        assert name in res.stdout
    for opt in ("cleanup.fold-constants", "cleanup.fold-size-limit", "cleanup.remove-identity"):
        assert opt in res.stdout


def test_version_and_help(prunec_cli):
    res = prunec_cli("--version")
    assert res.exit_code == 0 and "prunec" in res.stdout
    res = prunec_cli("--help")
    assert res.exit_code == 0
    for cmd in ("run", "passes", "inspect"):
        assert cmd in res.stdout


@pytest.mark.parametrize("where", ["missing-folder", "directory"])
def test_bad_report_path_fails_before_any_work(prunec_cli, tmp_path, demo_path, where):
    report = tmp_path / "nodir" / "r.json" if where == "missing-folder" else tmp_path
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--report", report)
    assert res.exit_code == 2
    assert "--report" in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == set()


def test_bad_output_path_fails_before_any_work(prunec_cli, tmp_path, demo_path):
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "nodir" / "o.onnx")
    assert res.exit_code == 2
    assert "does not exist" in prunec_cli.one_line_error(res)
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", tmp_path)
    assert res.exit_code == 2
    assert "is a directory" in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == set()
