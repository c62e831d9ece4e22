"""Sensitivity, budget allocation and prune potential, driven through the channels pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.errors import OptionError
from prunec.eval.budget import Budget, allocate, parse_budget, uniform_for_budget
from prunec.eval.data import EvalData, load_npz
from prunec.eval.gate import Evaluator
from prunec.eval.potential import potential_of, prune_potential
from prunec.eval.sensitivity import (SensitivityReport, parse_ratios, prune, prune_uniform,
                                     sensitivity)
from prunec.graph.costs import analyze_costs
from prunec.passes.base import registry
from prunec.runtime.session import make_session

pytestmark = pytest.mark.skipif("channels" not in registry(), reason="channels pass not available")

ROOT = Path(__file__).resolve().parents[1]
DEMO, DEMO_DATA = ROOT / "models" / "demo_cnn.onnx", ROOT / "models" / "demo_digits_test.npz"
#: The toy CNN has 8- and 12-channel groups: prune single channels, not multiples of 8.
R1 = {"round": 1}


def cnn(dead: int = 4, seed: int = 0) -> onnx.ModelProto:
    """image (N,1,10,10) -> conv1 (8 ch, the last `dead` all zero) -> relu -> conv2 (12 ch) -> relu
    -> global pool -> fc (4 classes). Removing dead conv1 channels changes nothing; conv2's all matter."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.6, (8, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w1[8 - dead:] = 0
    b1[8 - dead:] = 0
    w2 = rng.normal(0, 0.4, (12, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 12).astype(np.float32)
    w2[:, 8 - dead:] = 0  # dead in every weight it touches, so any magnitude ranking puts it last
    w3 = rng.normal(0, 1.0, (4, 12)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (np.zeros(4, np.float32), "b3")]]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 10, 10])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The CNN with its fc bias centred so the 4 classes are about balanced; labels = its predictions."""
    m = cnn()
    x = np.random.default_rng(1).uniform(0, 1, (240, 1, 10, 10)).astype(np.float32)
    logits = make_session(m).run(None, {"image": x})[0]
    b3 = -logits.mean(0).astype(np.float32)
    for t in m.graph.initializer:
        if t.name == "b3":
            t.CopyFrom(numpy_helper.from_array(b3, "b3"))
    labels = make_session(m).run(None, {"image": x})[0].argmax(1)
    d = tmp_path_factory.mktemp("toy")
    onnx.save(m, d / "cnn.onnx")
    np.savez(d / "data.npz", image=x, labels=labels)
    return m, EvalData({"image": x}, labels), d


def test_parse_ratios_and_budget():
    assert parse_ratios("0.4,0.1,0.1") == [0.1, 0.4]
    assert parse_budget("macs=0.5") == Budget("macs", 0.5)
    for bad in ("0,0.5", "x", "1.0"):
        with pytest.raises(OptionError):
            parse_ratios(bad)
    assert parse_budget("latency=0.6") == Budget("latency", 0.6)
    for bad in ("macs=1.5", "flops=0.5", "latency=1", "macs"):
        with pytest.raises(OptionError):
            parse_budget(bad)


def test_sensitivity_finds_the_tolerant_group(toy):
    m, data, _ = toy
    ev = Evaluator(m, data)
    rep = sensitivity(m, ev, [0.5], cache=None, options=R1)
    by = {g.group.id: g for g in rep.groups}
    assert rep.baseline == 100.0
    conv1 = next(g for g in rep.groups if "conv1" in g.group.layers or g.group.id.startswith("conv1"))
    conv2 = next(g for g in rep.groups if g is not conv1 and not g.group.frozen)
    # Half of conv1 is the 4 dead channels (L1 ranks them last): removing them changes nothing.
    assert conv1.drop_at(0.5) == 0.0
    assert conv2.drop_at(0.5) > 5.0
    assert any(g.group.frozen for g in by.values())  # fc's outputs reach the graph output
    assert conv1.trials[0].macs > 0 and conv2.trials[0].macs > 0
    assert json.dumps(rep.to_dict()) and SensitivityReport.from_dict(rep.to_dict()).to_dict() == rep.to_dict()


def test_sensitivity_resumes_from_cache(toy, tmp_path):
    m, data, _ = toy
    ev = Evaluator(m, data)
    calls = []

    def interrupt(done, total, label):
        calls.append(label)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sensitivity(m, ev, [0.25, 0.5], cache=tmp_path, progress=interrupt, options=R1)
    resumed = sensitivity(m, ev, [0.25, 0.5], cache=tmp_path, options=R1)
    assert resumed.cached_trials == 2
    fresh = sensitivity(m, ev, [0.25, 0.5], cache=None, options=R1)
    assert resumed.to_dict()["groups"] == fresh.to_dict()["groups"]


def test_budget_plan_meets_budget_and_spares_the_sensitive_group(toy):
    m, data, _ = toy
    ev = Evaluator(m, data)
    rep = sensitivity(m, ev, [0.25, 0.5, 0.75], cache=None, options=R1)
    plan = allocate(m, rep, Budget("macs", 0.7), options=R1)
    pruned, run = prune(m, plan.to_dict())
    original = analyze_costs(m).macs
    assert plan.target == int(0.7 * original) and run.after.macs == plan.achieved <= plan.target
    ids = {g.group.id: g for g in rep.groups}
    conv1 = next(i for i, g in ids.items() if "conv1" in g.group.layers or i.startswith("conv1"))
    assert plan.groups[conv1] >= max(v for k, v in plan.groups.items() if k != conv1)
    ratio, uni, achieved = uniform_for_budget(m, Budget("macs", 0.7), options=R1)
    assert achieved <= 0.7 * analyze_costs(m).macs
    # The plan spends the budget on dead channels first, so it loses no more than uniform pruning.
    assert ev.metric_value(pruned) >= ev.metric_value(uni)


def test_potential_definition_hand_cases():
    assert potential_of([0.1, 0.2, 0.3], 100.0, [100.0, 99.6, 98.0], 0.5) == 0.2
    assert potential_of([0.1, 0.2, 0.3], 100.0, [100.0, 98.0, 100.0], 0.5) == 0.1  # must stay within
    assert potential_of([0.1], 100.0, [90.0], 0.5) == 0.0


def test_prune_potential_sweep(toy):
    m, data, _ = toy
    ev = Evaluator(m, data, corruptions=["gaussian_noise"], severities=[2])
    rep = prune_potential(m, ev, [0.25, 0.5, 0.75], delta=0.5, options=R1)
    assert set(rep.potential) == {"clean", "gaussian_noise@2"}
    assert rep.macs == sorted(rep.macs, reverse=True) and rep.macs[0] < rep.original_macs
    for v in rep.variants:
        assert rep.potential[v] == potential_of(rep.ratios, rep.baseline[v], rep.values[v], 0.5)
    # Independently: prune at the reported clean potential and check it is within delta.
    if rep.potential["clean"]:
        pruned, _ = prune_uniform(m, rep.potential["clean"], options=R1)
        assert ev.metric_value(pruned) >= rep.baseline["clean"] - 0.5


def test_cli_sensitivity_budget_plan_run_check(toy, tmp_path):
    _, _, d = toy
    plan, sens_json, plot = tmp_path / "plan.json", tmp_path / "sens.json", tmp_path / "sens.png"
    r = CliRunner().invoke(cli, ["sensitivity", str(d / "cnn.onnx"), "--data", str(d / "data.npz"),
                                 "--ratios", "0.25,0.5", "--budget", "macs=0.8", "--plan-out", str(plan),
                                 "--json", str(sens_json), "--plot", str(plot), "--cache", str(tmp_path / "c"),
                                 "-O", "channels.round=1"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(plan.read_text())["groups"] and plot.stat().st_size > 1000
    assert "plan" in json.loads(sens_json.read_text())
    out = tmp_path / "pruned.onnx"
    r = CliRunner().invoke(cli, ["run", str(d / "cnn.onnx"), "--passes", "channels", "-O", f"channels.plan={plan}",
                                 "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["check", str(d / "cnn.onnx"), str(out), "--data", str(d / "data.npz"),
                                 "--max-drop", "100", "--corruptions", "none"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_cli_run_gate_refuses_a_lossy_prune(toy, tmp_path):
    _, _, d = toy
    out = tmp_path / "pruned.onnx"
    args = ["run", str(d / "cnn.onnx"), "--passes", "channels", "-O", "channels.ratio=0.75", "-O", "channels.round=1", "-o", str(out),
            "--data", str(d / "data.npz"), "--max-drop", "1.0", "--corruptions", "none"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 3, r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, args + ["--force"], catch_exceptions=False)
    assert r.exit_code == 0 and out.exists(), r.output


def test_cli_potential(toy, tmp_path):
    _, _, d = toy
    r = CliRunner().invoke(cli, ["potential", str(d / "cnn.onnx"), "--data", str(d / "data.npz"),
                                 "--ratios", "0.25,0.5", "--corruptions", "contrast", "--json",
                                 str(tmp_path / "p.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert set(doc["potential"]) == {"clean", "contrast@3"}


@pytest.mark.skipif(not (DEMO.exists() and DEMO_DATA.exists()), reason="demo model not bundled")
def test_demo_flow_sensitivity_plan_channels_check(tmp_path):
    """On the bundled demo: sensitivity -> plan at half the MACs -> channels -> check; the plan
    loses no more top-1 than uniform pruning at the same MAC budget."""
    model = onnx.load(DEMO)
    data = load_npz(DEMO_DATA, model)
    ev = Evaluator(model, data)
    rep = sensitivity(model, ev, [0.2, 0.4, 0.6], cache=tmp_path)
    plan = allocate(model, rep, Budget("macs", 0.5))
    pruned, run = prune(model, plan.to_dict(), verify=True)
    assert run.after.macs <= plan.target
    _, uniform, achieved = uniform_for_budget(model, Budget("macs", 0.5))
    assert achieved <= plan.target + 1
    planned_acc, uniform_acc = ev.metric_value(pruned), ev.metric_value(uniform)
    assert planned_acc >= uniform_acc
    onnx.save(pruned, tmp_path / "planned.onnx")
    r = CliRunner().invoke(cli, ["check", str(DEMO), str(tmp_path / "planned.onnx"), "--data", str(DEMO_DATA),
                                 "--max-drop", str(max(1.0, 100 - planned_acc + 1)), "--corruptions", "none",
                                 "--slice-max-drop", "class=100"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_planned_potential_sweeps_mac_budgets(toy):
    m, data, _ = toy
    ev = Evaluator(m, data)
    sens = sensitivity(m, ev, [0.25, 0.5, 0.75], cache=None, options=R1)
    rep = prune_potential(m, ev, [0.2, 0.4, 0.95], delta=0.5, sensitivity=sens, options=R1)
    assert rep.mode == "planned"
    assert rep.ratios == [0.2, 0.4]  # 95% of the MACs is out of reach at ratios <= 0.75: sweep ends
    for r, macs in zip(rep.ratios, rep.macs):
        assert macs <= (1 - r) * rep.original_macs
    # The dead conv1 channels hold more than 20% of the MACs and cost nothing.
    assert rep.values["clean"][0] == 100.0 and rep.potential["clean"] >= 0.2


def test_latency_budget_is_stopped_by_the_meter_not_by_macs(toy):
    """A latency budget steers by MACs but stops on what the meter measures. The meter here is a
    stand-in runtime whose latency is a fixed overhead plus a MAC-proportional part, so the
    MAC fraction that meets a 0.9 latency budget is known: (0.9 - overhead) / (1 - overhead)."""
    m, data, _ = toy
    ev = Evaluator(m, data)
    rep = sensitivity(m, ev, [0.25, 0.5, 0.75], cache=None, options=R1)
    macs0 = analyze_costs(m).macs
    overhead = 0.4
    calls = []

    def meter(original, candidate):
        calls.append(candidate)
        share = analyze_costs(candidate).macs / macs0
        return overhead + (1 - overhead) * share, 2.0

    plan = allocate(m, rep, Budget("latency", 0.9), options=R1, latency=meter)
    pruned, run = prune(m, plan.to_dict())
    assert run.after.macs / macs0 <= (0.9 - overhead) / (1 - overhead) + 1e-9
    assert plan.original == 2000 and plan.target == 1800 and plan.achieved <= plan.target
    assert len(calls) >= 1 and plan.to_dict()["budget"] == {"latency": 0.9}
    with pytest.raises(OptionError, match="out of reach"):
        allocate(m, rep, Budget("latency", 0.3), options=R1, latency=meter)  # overhead alone is 0.4


def test_cli_latency_budget_measures_for_real(toy, tmp_path):
    _, _, d = toy
    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(cli, ["sensitivity", str(d / "cnn.onnx"), "--data", str(d / "data.npz"),
                                 "--ratios", "0.5,0.75", "--budget", "latency=0.999", "--plan-out", str(plan),
                                 "--no-cache", "-O", "channels.round=1"], catch_exceptions=False)
    # A tiny model may not get faster at all: either a plan with measured latency, or a clear refusal.
    if r.exit_code == 0:
        doc = json.loads(plan.read_text())
        assert doc["budget"] == {"latency": 0.999} and doc["latency"]["achieved"] <= doc["latency"]["target"]
        assert "measured latency" in r.output
    else:
        assert r.exit_code == 2 and "out of reach" in r.output and not plan.exists()
