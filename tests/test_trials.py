"""Masked sensitivity trials against real removal, and sweeps spread over workers.

A trial masks the channels it would remove (zeroed where they are read) instead of pruning. On
the oracle zoo's architectures (tests/zoo.py, random weights) and an attention model, every trial's output must match the model
the `channels` pass really prunes, and its MAC and parameter savings must be exactly those
counted on the pruned model. Sweeps must give identical reports on one worker, two local worker
processes and a local Ray cluster, and resume from the cache after an interruption.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo  # tests/ is on sys.path (see conftest.py)
from models import attention_block, dq_conv_pair

from prunec.eval.data import EvalData, load_npz
from prunec.eval.executor import ExecutorSettings
from prunec.eval.gate import Evaluator
from prunec.eval.sensitivity import prune, sensitivity
from prunec.eval.slices import CLEAN
from prunec.eval.trials import MaskedRunner, TrialGraph, TrialTask
from prunec.graph.costs import analyze_costs

ROOT = Path(__file__).resolve().parents[1]
DEMO, DEMO_DATA = ROOT / "models" / "demo_cnn.onnx", ROOT / "models" / "demo_digits_test.npz"
R1 = {"round": 1}
#: Zoo models whose groups cover residual adds, depthwise/grouped convs, SE gates, concat,
#: split/shuffle, Flatten->Gemm, U-Net skips, several outputs and odd widths.
ARCHS = ["resnet_basic", "mobilenet_v3", "shufflenet_v2", "densenet", "resnext", "unet", "yolo",
         "two_outputs", "odd_widths", "traps"]


def attention_model() -> onnx.ModelProto:
    """Two-head self-attention block (Q, K, V, output projection) with a LayerNorm and a head."""
    torch = pytest.importorskip("torch")
    m = attention_block()
    f = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 5, 6),), f, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def zoo_case(arch: str):
    """An oracle architecture with its random weights before the oracle zeroes half of each group
    (`Oracle.original`): removed channels must be alive, or a trial that forgot to mask one would
    still match the removal."""
    a = zoo.ZOO[arch]
    model = zoo.export(zoo.build(arch).original, a.hw, keep_bn=True)
    x = np.random.default_rng(1).normal(size=(12, 3, a.hw, a.hw)).astype(np.float32)
    return model, {"x": x}


def real_outputs(model, plan, evaluator, options) -> tuple[np.ndarray, int, int]:
    pruned, rep = prune(model, plan, options=options)
    out = evaluator.outputs(pruned, [CLEAN])[CLEAN][evaluator.output]
    return out, rep.after.params, rep.after.macs


def check_against_removal(model, feeds, ratios=(0.5,), options=R1, target=None):
    """Every unfrozen group alone at each ratio: masked output vs pruned output, costs exact."""
    ev = Evaluator(model, EvalData(feeds), batch_size=5, target=target)  # 5: several chunks, a short last one
    tg = TrialGraph(model, options=options)
    runner = MaskedRunner(tg, ev)
    if target is not None:
        assert runner.target.runtime == target.runtime
    checked = changed = 0
    for g in tg.groups:
        if g.frozen:
            continue
        for r in ratios:
            removed = tg.select({g.id: r})
            if not removed:
                continue
            task = TrialTask(tg.cut_for(tg.masks(removed)), [("t", tuple(removed))])
            got = runner.outputs(task)["t"][CLEAN][ev.output]
            want, params, macs = real_outputs(model, {"default_ratio": 0.0, "groups": {g.id: r}}, ev, options)
            scale = max(float(np.abs(want).max()), 1e-12)
            assert float(np.abs(got - want).max()) / scale < 1e-4, f"group {g.id} at {r}"
            assert tg.costs(removed) == (params, macs), f"group {g.id} at {r}"
            checked += 1
            changed += float(np.abs(want - ev.reference[CLEAN][ev.output]).max()) / scale > 1e-3
    assert checked, "no prunable group was tried"
    assert changed, "no trial changed the output: the comparison proves nothing"
    return checked


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_trials_equal_real_removal_on_oracles(arch):
    model, feeds = zoo_case(arch)
    check_against_removal(model, feeds)


def test_masked_trials_run_on_the_evaluator_s_runtime():
    # --runtime openvino: the trial sessions open on OpenVINO, as the evaluation of a pruned model does.
    pytest.importorskip("openvino")
    from prunec.runtime.target import Target

    model, feeds = zoo_case("resnet_basic")
    check_against_removal(model, feeds, target=Target(runtime="openvino"))


def test_masked_trials_equal_real_removal_through_attention():
    model = attention_model()
    x = np.random.default_rng(2).standard_normal((8, 5, 6)).astype(np.float32)
    tg = TrialGraph(model, options=R1)
    # The head_dim of Q and K is read by the Q @ K^T contraction: it is masked there.
    removed = tg.select({"/q/MatMul": 0.5})
    assert tg.masks(removed).contractions
    check_against_removal(model, {"x": x}, ratios=(0.25, 0.5))


def transformer_case(name: str, **cfg):
    """A transformer of tests/transformer_zoo.py with random weights (legacy export), and feeds
    at a sequence length other than the one it was exported at."""
    from dataclasses import replace

    import transformer_zoo as tz

    arch = tz.ARCHS[name]
    if cfg:
        arch = tz.Arch(name, replace(arch.cfg, **cfg), arch.kind)
    model = tz.export(tz.randomize(arch.build(), 3), arch, "legacy")
    return model, tz.inputs(arch, 6, 7, seed=4)


@pytest.mark.parametrize("name", ["bert", "gqa"])
def test_masked_trials_equal_real_removal_on_transformers(name):
    # Attention contractions (Q·Kᵀ, A·V; rotary and grouped KV heads in gqa), MLP neurons, an
    # attention mask input: every group's trial against the pruned model.
    pytest.importorskip("torch")
    model, feeds = transformer_case(name)
    assert check_against_removal(model, feeds, ratios=(0.5,)) >= 3


def test_masked_trials_zero_a_quantized_weight_at_its_zero_point():
    # uint8 weights behind DequantizeLinear with zero point 100: a removed channel's "zero" there
    # is 100 (0 would dequantize to -100 * scale and change the output).
    r = np.random.default_rng(7)
    model = dq_conv_pair(r)
    x = r.standard_normal((5, 4, 6, 6)).astype(np.float32)
    assert check_against_removal(model, {"x": x}) >= 1


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_masked_trials_equal_real_removal_on_a_quantized_model(fmt, tmp_path):
    # ONNX Runtime's static quantizer: QDQ weights behind DequantizeLinear, or QLinearConv and
    # com.microsoft's QGemm/QLinearAdd (where shape inference stops, so the trials type the
    # tensors they cut at from their values). Removed int8 weights go to their zero points.
    import exporters

    _, feeds = zoo_case("resnet_basic")
    a = zoo.ZOO["resnet_basic"]
    q = exporters.quantize(zoo.export(zoo.build("resnet_basic").original, a.hw, keep_bn=False), a.hw,
                           tmp_path, fmt)
    assert check_against_removal(q, {"x": feeds["x"][:6]}) >= 3


def constant_channel_model(matmul_reader: bool = False) -> onnx.ModelProto:
    """Conv -> ReLU -> reader, where four of the first conv's eight channels have all-zero weights
    and a positive bias: constant channels (their bias after ReLU) that l1 ranks lowest. The
    reader is a 1x1 Conv, or (`matmul_reader`) a bias-less MatMul over the channels-last map."""
    from onnx import helper, numpy_helper

    r = np.random.default_rng(5)
    w1 = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[:4] = 0
    b1 = np.abs(r.standard_normal(8)).astype(np.float32) + 0.5
    inits = {"w1": w1, "b1": b1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu")]
    f32 = onnx.TensorProto.FLOAT  # a feature map out: scored by cosine to the original's
    if matmul_reader:
        inits["w2"] = r.standard_normal((8, 5)).astype(np.float32)
        nodes += [helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 3, 1], name="nhwc"),
                  helper.make_node("MatMul", ["t1", "w2"], ["y"], name="c2")]
        out = helper.make_tensor_value_info("y", f32, ["N", 6, 6, 5])
    else:
        inits.update(w2=r.standard_normal((5, 8, 1, 1)).astype(np.float32), b2=np.zeros(5, np.float32))
        nodes.append(helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2"))
        out = helper.make_tensor_value_info("y", f32, ["N", 5, 6, 6])
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", f32, ["N", 3, 6, 6])], [out],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _trial_metrics(report: dict) -> list[float]:
    return [t["metric"] for g in report["groups"] for t in g["trials"]]


@pytest.mark.parametrize("matmul_reader", [False, True], ids=["conv-reader", "matmul-reader"])
def test_compensated_trials_mask_with_the_bias_change(matmul_reader):
    # Removing a constant channel, the pass (compensate=auto, no --calib) folds its value into the
    # reader's bias. A masked trial feeds that bias change: it must give the outputs of the real
    # removal, and score like the rewrite method.
    model = constant_channel_model(matmul_reader)
    x = np.random.default_rng(5).standard_normal((10, 3, 6, 6)).astype(np.float32)
    ev = Evaluator(model, EvalData({"x": x}), batch_size=4)
    tg = TrialGraph(model, options=R1)
    removed = tg.select({"c1": 0.5})
    assert tg.maskable(removed) and tg.masks(removed).biases  # masked, with a bias change
    got = MaskedRunner(tg, ev).outputs(TrialTask(tg.cut_for(tg.masks(removed)), [("t", tuple(removed))]))
    want, _, _ = real_outputs(model, {"default_ratio": 0.0, "groups": {"c1": 0.5}}, ev, R1)
    np.testing.assert_allclose(got["t"][CLEAN][ev.output], want, rtol=1e-4, atol=1e-5)
    masked = sensitivity(model, ev, [0.5], options=R1).to_dict()
    rewrite = sensitivity(model, ev, [0.5], options=R1, method="rewrite").to_dict()
    np.testing.assert_allclose(_trial_metrics(masked), _trial_metrics(rewrite), rtol=1e-5)
    # Without compensation the trial scores lower: the bias change is what the mask adds.
    plain = sensitivity(model, ev, [0.5], options={**R1, "compensate": "none"}).to_dict()
    assert _trial_metrics(plain)[0] < _trial_metrics(masked)[0] - 1


def test_mean_compensated_trials_are_pruned_for_real():
    # Mean compensation (independent calibration data) is measured on data and checked end to end
    # by the pass, which masking does not reproduce: such trials must be pruned for real.
    from prunec.passes import Calibration, PassContext

    model = constant_channel_model()
    x = np.random.default_rng(5).standard_normal((10, 3, 6, 6)).astype(np.float32)
    ctx = PassContext(calib=Calibration({"x": x}, "calibration"))
    tg = TrialGraph(model, options=R1)
    assert not tg.maskable(tg.select({"c1": 0.5}), ctx)
    assert tg.maskable(tg.select({"c1": 0.5}, ctx), PassContext())


def test_hidden_width_trials_are_pruned_for_real():
    # Hidden width changes LayerNorm statistics, which masking cannot reproduce: those trials must
    # still give the rewrite method's numbers (and the others the masked ones).
    pytest.importorskip("torch")
    model, feeds = transformer_case("gpt", layers=1)
    ev = Evaluator(model, EvalData(feeds), batch_size=4)
    opts = {**R1, "hidden": True}
    tg = TrialGraph(model, options=opts)
    hidden = [g for g in tg.groups if not g.frozen and not tg.maskable(tg.select({g.id: 0.5}))]
    assert hidden, "no group changes normalization statistics: the test proves nothing"
    masked = sensitivity(model, ev, [0.5], options=opts).to_dict()
    rewrite = sensitivity(model, ev, [0.5], options=opts, method="rewrite").to_dict()
    # The metric (cosine to the original's outputs) of a masked trial may differ from the
    # pruned model's in the last float bits; everything else is equal.
    for m, r in zip(masked["groups"], rewrite["groups"]):
        assert {**m, "trials": None} == {**r, "trials": None}
        for tm, tr in zip(m["trials"], r["trials"]):
            assert {**tm, "metric": 0, "drop": 0, "drops": 0} == {**tr, "metric": 0, "drop": 0, "drops": 0}, m["id"]
            assert tm["metric"] == pytest.approx(tr["metric"], rel=1e-6, abs=1e-6), m["id"]
            assert tm["drops"] == pytest.approx(tr["drops"], rel=1e-6, abs=1e-6), m["id"]
    row = next(g for g in masked["groups"] if g["id"] == hidden[0].id)
    assert row["trials"][0]["drop"] > 0.01


def test_uniform_removal_of_every_group_equals_the_pruned_model():
    model, feeds = zoo_case("mobilenet_v3")
    ev = Evaluator(model, EvalData(feeds))
    tg = TrialGraph(model, options=R1)
    removed = tg.select({}, default=0.5)
    got = MaskedRunner(tg, ev).outputs(TrialTask(0, [("u", tuple(removed))]))["u"][CLEAN][ev.output]
    want, params, macs = real_outputs(model, {"default_ratio": 0.5, "groups": {}}, ev, R1)
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < 1e-4
    assert tg.costs(removed) == (params, macs)


def test_trials_pick_the_channels_the_pass_removes_with_rounding():
    # round=4 with ratios that do not land on multiples: the trial's count and its savings must
    # be the pass's, including groups that rounding trims at ratio 0.
    model, _ = zoo_case("odd_widths")
    tg = TrialGraph(model, options={"round": 4})
    base = analyze_costs(model)
    for g in [g for g in tg.groups if not g.frozen][:4]:
        _, rep = prune(model, {"default_ratio": 0.0, "groups": {g.id: 0.3}}, options={"round": 4})
        table = {row["id"]: row for row in rep.passes[0].result.details["group_table"]}
        removed = tg.select({g.id: 0.3})
        for h in tg.groups:
            assert len(removed & set(h.classes)) == table[h.id]["size"] - table[h.id]["kept"]
        assert tg.costs(removed) == (rep.after.params, rep.after.macs)
        assert base.macs >= rep.after.macs


def test_trials_round_to_the_block_of_the_run_s_target():
    # round=auto follows the context's target (--runtime ...): OpenVINO CPU bf16 keeps multiples
    # of 32, ORT CPU of 8 or 16. The trial must count what a real run on that target removes.
    from prunec.passes import PassContext
    from prunec.runtime.target import Target

    model, _ = zoo_case("odd_widths")
    ctx = PassContext(target=Target(runtime="openvino", precision="bf16"))
    tg = TrialGraph(model)
    counts = {}
    for g in [g for g in tg.groups if not g.frozen and g.size > 32][:2]:
        _, rep = prune(model, {"default_ratio": 0.0, "groups": {g.id: 0.5}}, ctx=ctx)
        assert rep.passes[0].result.details["round"] == 32
        table = {row["id"]: row for row in rep.passes[0].result.details["group_table"]}
        removed = tg.select({g.id: 0.5}, ctx)
        assert tg.round == 32
        counts[g.id] = len(removed & set(g.classes))
        assert counts[g.id] == table[g.id]["size"] - table[g.id]["kept"]
        assert tg.costs(removed) == (rep.after.params, rep.after.macs)
    assert counts, "no group wide enough to round"
    default = {gid: len(tg.select({gid: 0.5}) & set(next(g for g in tg.groups if g.id == gid).classes))
               for gid in counts}
    assert default != counts, "the target's block made no difference: the test proves nothing"


def test_results_do_not_depend_on_the_order_of_trials_or_on_stored_frontiers():
    model, feeds = zoo_case("resnet_basic")
    ev = Evaluator(model, EvalData(feeds), batch_size=4)
    tg = TrialGraph(model, options=R1)
    tasks = {}
    for g in tg.groups:
        if not g.frozen:
            removed = tg.select({g.id: 0.5})
            j = tg.cut_for(tg.masks(removed))
            tasks.setdefault(j, TrialTask(j, [])).trials.append((g.id, tuple(removed)))
    order = sorted(tasks)
    assert len(order) >= 3, "needs several cuts to exercise the chain"
    def run(cuts, **kw):
        runner, out = MaskedRunner(tg, ev, **kw), {}
        for j in cuts:
            out.update(runner.outputs(tasks[j]))
        return out

    chained = run(order)
    # Backwards (each cut restarts the chain from the inputs), and forwards without keeping
    # any frontier (each chunk runs the chain from the inputs again).
    for other in (run(reversed(order)), run(order, frontier_bytes=0)):
        assert chained.keys() == other.keys()
        for k in chained:
            assert np.array_equal(chained[k][CLEAN][ev.output], other[k][CLEAN][ev.output]), k


# -- sweeps over workers

@pytest.fixture(scope="module")
def demo():
    model = onnx.load(DEMO)
    data = load_npz(DEMO_DATA, model)
    return model, Evaluator(model, data)


def sweep(demo, tmp_path=None, **kw):
    model, ev = demo
    return sensitivity(model, ev, [0.25, 0.5], options=R1, cache=tmp_path, **kw).to_dict()


@pytest.fixture(scope="module")
def serial(demo):
    return sweep(demo)


def test_masked_sweep_equals_the_rewrite_sweep_on_the_demo(demo, serial):
    rewrite = sweep(demo, method="rewrite")
    assert serial == rewrite


def test_two_worker_processes_give_identical_results(demo, serial):
    assert sweep(demo, executor=ExecutorSettings(jobs=2)) == serial


def test_a_local_ray_cluster_gives_identical_results(demo, serial):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'prunec[cluster]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    except Exception as exc:
        pytest.skip(f"a local Ray instance cannot start here: {exc}")
    try:
        got = sweep(demo, executor=ExecutorSettings(kind="ray", jobs=2))
    finally:
        ray.shutdown()
    assert got == serial


def test_an_interrupted_parallel_sweep_resumes_from_the_cache(demo, serial, tmp_path):
    seen = []

    def interrupt(done, total, label):
        seen.append(label)
        if len(seen) == 3:
            raise KeyboardInterrupt

    model, ev = demo
    with pytest.raises(KeyboardInterrupt):
        sensitivity(model, ev, [0.25, 0.5], options=R1, cache=tmp_path, progress=interrupt,
                    executor=ExecutorSettings(jobs=2))
    (cache_file,) = tmp_path.glob("sensitivity-*.json")
    stored = json.loads(cache_file.read_text())["trials"]
    assert len(stored) >= 3 and set(seen) <= set(stored)
    resumed = sweep(demo, tmp_path)
    assert resumed["cached_trials"] == len(stored)
    assert {**resumed, "cached_trials": 0} == serial


def test_sensitivity_command_on_two_workers(prunec_cli, demo_path, tmp_path):
    res = prunec_cli("sensitivity", demo_path, "--data", DEMO_DATA, "--ratios", "0.5", "-O", "channels.round=1",
                     "--jobs", "2", "--cache", tmp_path, "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s.json").read_text())["sensitivity"]
    assert sum(len(g["trials"]) for g in report["groups"]) > 2


def test_executor_options_are_checked(prunec_cli, demo_path, tmp_path):
    res = prunec_cli("sensitivity", demo_path, "--data", DEMO_DATA, "--address", "auto")
    assert res.exit_code == 2
    assert "--executor ray" in prunec_cli.one_line_error(res)
    res = prunec_cli("sensitivity", demo_path, "--data", DEMO_DATA, "--jobs", "-1")
    assert res.exit_code == 2 and "--jobs" in prunec_cli.one_line_error(res)


def test_a_task_metric_sweep_is_the_same_masked_rewritten_and_on_two_workers():
    # A user's metric function (loaded from a file) scores every output; workers load it by spec.
    from test_task_metric import CTC, recognizer, words_data

    from prunec.eval.task_metric import load_metric

    model = recognizer()
    x, words = words_data(60)
    ev = Evaluator(model, EvalData({"x": x}, targets=words), metric=load_metric(f"{CTC}:exact_match"))
    kw = dict(options=R1, cache=None)
    masked = sensitivity(model, ev, [0.3, 0.9], **kw).to_dict()
    assert masked["metric"] == "task:exact_match"
    hidden = next(g for g in masked["groups"] if g["id"] == "hidden")
    assert hidden["trials"][1]["drop"] > 50  # the identity channels go: the metric must see it
    assert sensitivity(model, ev, [0.3, 0.9], method="rewrite", **kw).to_dict() == masked
    # Workers get the evaluator pickled: in a fresh process the metric loads again from its file.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_reference_value, ev).result(timeout=120) == ev.reference_value()


def _reference_value(ev) -> float:
    return ev.reference_value()
