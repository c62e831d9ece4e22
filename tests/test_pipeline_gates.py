"""Gates that pass only on evidence (issue 13): unknown slice names, labels outside the classes,
no slice big enough, near-chance corrupted slices, a failed gate's report and diff, --force,
NaN data, and a --budget plan predicted to lose more than --max-drop."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import DEMO_TEST, files_in


def gemm_classifier(weight: np.ndarray) -> onnx.ModelProto:
    """logits = x @ weight (4 features, 4 classes with weight = identity)."""
    d, c = weight.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")], "clf",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
                          [numpy_helper.from_array(weight.astype(np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """orig.onnx (identity), bad.onnx (classes 2 and 3 swapped), data.npz: 400 samples, balanced."""
    d = tmp_path_factory.mktemp("gates")
    onnx.save(gemm_classifier(np.eye(4)), d / "orig.onnx")
    onnx.save(gemm_classifier(np.eye(4)[[0, 1, 3, 2]]), d / "bad.onnx")
    labels = np.repeat([0, 1, 2, 3], 100)
    x = np.random.default_rng(0).uniform(0, 0.5, size=(400, 4)).astype(np.float32)
    x[np.arange(400), labels] += 1.0
    np.savez(d / "data.npz", x=x, labels=labels)
    return d


def test_unknown_slice_name_is_an_error_listing_the_valid_ones(prunec_cli, clf, tmp_path):
    base = ["check", clf / "orig.onnx", clf / "bad.onnx", "--data", clf / "data.npz"]
    res = prunec_cli(*base, "--slice-max-drop", "raer=2.0")
    assert res.exit_code == 2
    err = prunec_cli.one_line_error(res)
    assert "--slice-max-drop raer" in err and "slices: all, class=0, class=1" in err and "rare" in err
    res = prunec_cli(*base, "--slice-max-drop", "gaussian_noise@*=2.0")  # a glob matching nothing
    assert res.exit_code == 2 and "gaussian_noise@*" in prunec_cli.one_line_error(res)
    # A kind this data has no slice of is valid vocabulary: a note, not an error.
    res = prunec_cli(*base, "--max-drop", "100", "--slice-max-drop", "rare=2.0,class=3=100")
    assert res.exit_code == 0, res.output
    assert "note: --slice-max-drop for rare: this data has no slice of that kind" in res.stdout
    # In `run`, before any pass runs and before any file is written.
    res = prunec_cli("run", clf / "orig.onnx", "--passes", "cleanup", "-o", tmp_path / "o.onnx",
                     "--report", tmp_path / "r.json", "--data", clf / "data.npz", "--slice-max-drop", "raer=2")
    assert res.exit_code == 2 and "raer" in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("bad", [4, -1, 10])
def test_labels_outside_the_class_range(prunec_cli, clf, tmp_path, bad):
    """Labels 0..4 on a 4-class output once scored 0% vs 0% and passed."""
    with np.load(clf / "data.npz") as z:
        x, labels = z["x"], z["labels"].copy()
    labels[:7] = bad
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    res = prunec_cli("check", clf / "orig.onnx", clf / "orig.onnx", "--data", tmp_path / "d.npz")
    assert res.exit_code == 2
    assert (f"labels hold class ids outside 0..3 of output 'logits' (4 classes) in 7 sample(s): {bad}"
            in prunec_cli.one_line_error(res))


def test_a_gate_without_a_big_enough_slice_fails(prunec_cli, clf, tmp_path):
    with np.load(clf / "data.npz") as z:
        np.savez(tmp_path / "few.npz", x=z["x"][::20], labels=z["labels"][::20])  # 20 samples
    res = prunec_cli("check", clf / "orig.onnx", clf / "orig.onnx", "--data", tmp_path / "few.npz",
                     "--json", tmp_path / "g.json")
    assert res.exit_code == 3
    assert "no slice has --min-samples 30 samples (the largest has 20)" in prunec_cli.one_line_error(res)
    assert "FAILED: no slice has --min-samples 30" in res.stdout and "PASSED" not in res.stdout
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["passed"] is False and doc["problems"] and doc["failed"] == []
    res = prunec_cli("check", clf / "orig.onnx", clf / "orig.onnx", "--data", tmp_path / "few.npz",
                     "--min-samples", "20")
    assert res.exit_code == 0, res.output


def test_nan_data_is_one_line(prunec_cli, clf, tmp_path, demo_path):
    with np.load(DEMO_TEST) as z:
        image, labels = z["image"].copy(), z["labels"]
    image[[3, 9], 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", image=image, labels=labels)
    res = prunec_cli("check", demo_path, demo_path, "--data", tmp_path / "nan.npz")
    assert res.exit_code == 2
    assert "holds NaN or infinite values in 2 sample(s) (first: sample 3)" in prunec_cli.one_line_error(res)


def test_failed_gate_writes_report_and_diffs_marked_failed_never_the_model(prunec_cli, clf, tmp_path):
    """`cleanup` is exact (drop 0): a max drop of -1 points is a gate that cannot pass."""
    out = tmp_path / "out.onnx"
    args = ["run", clf / "orig.onnx", "--passes", "cleanup", "-o", out, "--data", clf / "data.npz",
            "--max-drop", "-1", "--report", tmp_path / "r.json", "--diff", tmp_path / "d.json",
            "--diff-each", tmp_path / "each", "--no-profile"]
    res = prunec_cli(*args)
    assert res.exit_code == 3
    assert not out.exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["written"] is False and doc["gate"]["passed"] is False and doc["passes"][0]["name"] == "cleanup"
    diff = json.loads((tmp_path / "d.json").read_text())
    assert "not written: accuracy gate failed" in json.dumps(diff)
    assert files_in(tmp_path / "each") == {"01-cleanup.html"}
    assert "PASSED" not in res.stdout


def test_force_prints_forced_never_passed(prunec_cli, clf, tmp_path):
    out = tmp_path / "out.onnx"
    res = prunec_cli("run", clf / "orig.onnx", "--passes", "cleanup", "-o", out, "--data", clf / "data.npz",
                     "--max-drop", "-1", "--force", "--report", tmp_path / "r.json", "--no-profile")
    assert res.exit_code == 0, res.output
    assert out.exists() and "PASSED" not in res.stdout
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"FORCED: wrote {out} although the accuracy gate failed ("), last
    assert " | prunec run " in last
    assert json.loads((tmp_path / "r.json").read_text())["written"] is True


@pytest.fixture(scope="module")
def pruned_demo(demo_model, tmp_path_factory):
    from prunec.eval.sensitivity import prune_uniform

    p = tmp_path_factory.mktemp("pruned") / "pruned.onnx"
    onnx.save(prune_uniform(demo_model, 0.3)[0], str(p))
    return p


def test_near_chance_corrupted_slices_are_flagged_not_gated(prunec_cli, demo_path, pruned_demo, tmp_path):
    """The demo's original scores 24.1% on contrast@3 (chance: 10%): a pruned model's drop there
    (14 points) is no evidence either way. Strict on that slice alone, the gate passes unless
    --gate-near-chance asks for it."""
    args = ["check", demo_path, pruned_demo, "--data", DEMO_TEST, "--corruptions", "contrast",
            "--max-drop", "100", "--slice-max-drop", "contrast@3=0", "--json", tmp_path / "g.json"]
    res = prunec_cli(*args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["near_chance"] == ["contrast@3"] and doc["failed"] == []
    slice_ = next(s for s in doc["slices"] if s["name"] == "contrast@3")
    assert slice_["status"] == "near chance" and slice_["original"]["value"] < 10 + 15
    assert "not gated: the original scores within 15 points of chance (10%) on them: contrast@3 (24.1%)" \
        in res.stdout
    res = prunec_cli(*args, "--gate-near-chance")
    assert res.exit_code == 3 and "contrast@3" in prunec_cli.one_line_error(res)
    res = prunec_cli(*args, "--chance-margin", "10")  # 24.1% is more than 10 points above chance
    assert res.exit_code == 3


def test_budget_plan_over_max_drop_is_not_written_unless_forced(prunec_cli, demo_path, tmp_path):
    plan = tmp_path / "plan.json"
    args = ["sensitivity", demo_path, "--data", DEMO_TEST, "--ratios", "0.5", "--budget", "macs=0.7",
            "--plan-out", plan, "--cache", tmp_path / "cache", "--max-drop", "0.2", "--json", tmp_path / "s.json",
            "--corruptions", "none"]  # clean drops only: fast enough that no progress line is printed
    res = prunec_cli(*args)
    assert res.exit_code == 3
    err = prunec_cli.one_line_error(res)
    assert "more than --max-drop 0.2; plan not written" in err
    assert "warning: the plan for --budget macs=0.7 predicts a drop of" in res.stdout
    assert not plan.exists()
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["plan_written"] is False and doc["plan"]["predicted_drop_points"] > 0.2
    res = prunec_cli(*args, "--force")  # the sensitivity trials come from the cache now
    assert res.exit_code == 0, res.output
    assert json.loads(plan.read_text())["predicted_drop_points"] == doc["plan"]["predicted_drop_points"]
