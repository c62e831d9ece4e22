"""Channel rules on small hand-built graphs: each test zeroes channels by hand (not through the
analysis under test), prunes, and checks outputs and the exact weight shapes that must result."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import attention_block
from prunec.errors import OptionError
from prunec.graph.channels import analyze_channels
from prunec.passes import PassManager, build_passes
from prunec.passes.channels import class_multiple, kept_count
from prunec.runtime.cpu import channel_block

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def make_model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape, *, extra_outputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs]
    g = helper.make_graph(nodes, "t", [x], outs,
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def zero(inits, name, axis, idx):
    sl = [slice(None)] * inits[name].ndim
    sl[axis] = list(idx)
    inits[name][tuple(sl)] = 0.0


def prune(model, **opts):
    # round=1: these tests are about the rules, exact channel counts matter (rounding is tested below)
    opts = {k: str(v) for k, v in {"ratio": 0.5, "round": 1, **opts}.items()}
    out, report = PassManager(build_passes(["channels"], {"channels": opts})).run(model)
    return out, report.passes[0].result


def run(model, x):
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same(a, b, x):
    ya, yb = run(a, x), run(b, x)
    assert np.max(np.abs(ya - yb)) <= 1e-4 * np.max(np.abs(ya)) + 1e-6


def conv(name, x, w, b=None, y=None, **attrs):
    ins = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", ins, [y or name], name=name, **attrs)


X = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)


def test_residual_add_couples_both_sides_and_slices_every_weight():
    # c1 -> relu -> c2 ; add(c1 relu, c2) -> c3 (graph output)
    inits = {"w1": _w(8, 4, 3, 3), "b1": _w(8), "w2": _w(8, 8, 3, 3), "w3": _w(5, 8, 1, 1)}
    zero(inits, "w1", 0, [1, 4, 6, 7]); zero(inits, "b1", 0, [1, 4, 6, 7])
    zero(inits, "w2", 0, [1, 4, 6, 7]); zero(inits, "w2", 1, [1, 4, 6, 7])
    zero(inits, "w3", 1, [1, 4, 6, 7])
    nodes = [conv("c1", "x", "w1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv("c2", "r1", "w2", pads=[1, 1, 1, 1]), helper.make_node("Add", ["r1", "c2"], ["a"]),
             conv("c3", "a", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 5, 6, 6])
    out, res = prune(m)
    w = inits_of(out)
    shapes = {k: v.shape for k, v in w.items()}
    assert shapes["w1"] == (4, 4, 3, 3) and shapes["b1"] == (4,)
    assert shapes["w2"] == (4, 4, 3, 3) and shapes["w3"] == (5, 4, 1, 1)
    assert_same(m, out, X)
    assert res.details["groups_frozen"] == 1  # c3 feeds the graph output


def test_unknown_op_freezes_only_the_groups_it_touches():
    # c1 -> LRN (no rule) -> c2 ; c2 -> relu -> c3 -> y ; c2's group is still prunable
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 8, 1, 1), "w3": _w(3, 8, 1, 1)}
    zero(inits, "w2", 0, [0, 2, 4, 6]); zero(inits, "w3", 1, [0, 2, 4, 6])
    nodes = [conv("c1", "x", "w1"), helper.make_node("LRN", ["c1"], ["l"], size=3),
             conv("c2", "l", "w2"), helper.make_node("Relu", ["c2"], ["r"]), conv("c3", "r", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, res = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (8, 4, 1, 1), "c1 feeds an op without a rule: must stay"
    assert shapes["w2"] == (4, 8, 1, 1) and shapes["w3"] == (3, 4, 1, 1)
    frozen = [s.why for s in res.skipped]
    assert any("LRN" in why for why in frozen)
    assert_same(m, out, X)


def test_concat_offsets_and_split_sizes_are_rewritten():
    # c1 (6) and c2 (4) concat -> split [6, 4] -> convs reading each part
    inits = {"w1": _w(6, 4, 1, 1), "w2": _w(4, 4, 1, 1), "wa": _w(2, 6, 1, 1), "wb": _w(2, 4, 1, 1),
             "sp": np.array([6, 4], dtype=np.int64)}
    zero(inits, "w1", 0, [0, 1, 5]); zero(inits, "wa", 1, [0, 1, 5])
    zero(inits, "w2", 0, [2, 3]); zero(inits, "wb", 1, [2, 3])
    nodes = [conv("c1", "x", "w1"), conv("c2", "x", "w2"),
             helper.make_node("Concat", ["c1", "c2"], ["cat"], axis=1),
             helper.make_node("Split", ["cat", "sp"], ["s1", "s2"], axis=1),
             conv("ca", "s1", "wa"), conv("cb", "s2", "wb"),
             helper.make_node("Add", ["ca", "cb"], ["y"])]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 2, 6, 6])
    out, _ = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (3, 4, 1, 1) and shapes["w2"] == (2, 4, 1, 1)
    assert shapes["wa"] == (2, 3, 1, 1) and shapes["wb"] == (2, 2, 1, 1)
    assert_same(m, out, X)


def test_channel_slice_bounds_follow_the_kept_channels():
    inits = {"w1": _w(8, 4, 1, 1), "wa": _w(2, 3, 1, 1), "st": np.array([2], np.int64),
             "en": np.array([5], np.int64), "ax": np.array([1], np.int64)}
    # Slice keeps channels 2,3,4 of c1. Zero c1 channels 0, 3, 6, 7: 3 lies inside the slice.
    zero(inits, "w1", 0, [0, 3, 6, 7]); zero(inits, "wa", 1, [1])
    nodes = [conv("c1", "x", "w1"), helper.make_node("Slice", ["c1", "st", "en", "ax"], ["s"]),
             conv("ca", "s", "wa", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 2, 6, 6])
    out, _ = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (4, 4, 1, 1) and shapes["wa"] == (2, 2, 1, 1)
    assert_same(m, out, X)


def test_flatten_to_gemm_removes_a_block_of_features_per_channel():
    inits = {"w1": _w(6, 4, 3, 3), "g": _w(6 * 4, 5), "gb": _w(5)}
    zero(inits, "w1", 0, [1, 2, 5])
    for c in (1, 2, 5):
        inits["g"][c * 4:(c + 1) * 4, :] = 0.0
    nodes = [conv("c1", "x", "w1", strides=[3, 3]), helper.make_node("Flatten", ["c1"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="fc")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 5])
    out, _ = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (3, 4, 3, 3) and shapes["g"] == (12, 5)
    assert_same(m, out, X)


def test_a_reshape_keeping_the_trailing_channel_axis_follows_it():
    # Channels last: the trailing dim both shapes share *is* the channel axis (it must be
    # followed, not set aside with shared spatial dims).
    inits = {"w1": _w(6, 4, 3, 3), "m": _w(6, 5), "s3": np.array([0, 36, 6], np.int64)}
    zero(inits, "w1", 0, [1, 2, 5])
    inits["m"][[1, 2, 5], :] = 0.0
    nodes = [conv("c1", "x", "w1", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c1"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "s3"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 36, 5])
    g = next(g for g in analyze_channels(m).groups if g.id == "c1")
    assert g.frozen is None and "mm" in g.layers
    out, _ = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (3, 4, 3, 3) and shapes["m"] == (3, 5)
    assert_same(m, out, X)


def test_a_shuffle_keeping_trailing_spatial_dims_couples_its_columns():
    # (N, 8, H, W) -> (N, 2, 4, H, W) -> transpose -> (N, 8, H, W): H, W are shared trailing
    # dims without channels; channel g*4+j lands at j*2+g, and j is one class across both g.
    inits = {"w2": _w(8, 4, 1, 1), "w3": _w(3, 8, 1, 1),
             "s5": np.array([0, 2, 4, 6, 6], np.int64), "s4": np.array([0, 8, 6, 6], np.int64)}
    zero(inits, "w2", 0, [1, 5, 3, 7])
    zero(inits, "w3", 1, [2, 3, 6, 7])
    nodes = [conv("c2", "x", "w2"),
             helper.make_node("Reshape", ["c2", "s5"], ["r5"]),
             helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s4"], ["sh"]),
             conv("c3", "sh", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    g = next(g for g in analyze_channels(m).groups if g.id == "c2")
    assert g.frozen is None and "c3" in g.layers and len(g.classes) == 4
    out, _ = prune(m)
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w2"] == (4, 4, 1, 1) and shapes["w3"] == (3, 4, 1, 1)
    assert_same(m, out, X)


def test_squeeze_excitation_mul_couples_gate_with_features():
    # f = c1(x); s = sigmoid(c3(relu(c2(gap(f))))); y = c4(f * s)
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(2, 8, 1, 1), "w3": _w(8, 2, 1, 1), "b3": _w(8),
             "w4": _w(3, 8, 1, 1)}
    gone = [0, 1, 2, 7]
    zero(inits, "w1", 0, gone); zero(inits, "w2", 1, gone); zero(inits, "w3", 0, gone)
    zero(inits, "b3", 0, gone); zero(inits, "w4", 1, gone)
    nodes = [conv("c1", "x", "w1"), helper.make_node("GlobalAveragePool", ["c1"], ["p"]),
             conv("c2", "p", "w2"), helper.make_node("Relu", ["c2"], ["r"]),
             conv("c3", "r", "w3", "b3"), helper.make_node("Sigmoid", ["c3"], ["s"]),
             helper.make_node("Mul", ["c1", "s"], ["m"]), conv("c4", "m", "w4", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, res = prune(m, protect="^c2$")  # the SE bottleneck is a group of its own; keep it
    shapes = {k: v.shape for k, v in inits_of(out).items()}
    assert shapes["w1"] == (4, 4, 1, 1) and shapes["w3"] == (4, 2, 1, 1) and shapes["w4"] == (3, 4, 1, 1)
    g = [row for row in res.details["group_table"] if row["id"] == "c1"][0]
    assert set(g["producers"]) == {"c1", "c3"}
    assert_same(m, out, X)


def test_normalization_across_channels_freezes():
    inits = {"w1": _w(8, 4, 1, 1), "sc": np.ones(8, np.float32), "bi": np.zeros(8, np.float32),
             "w2": _w(3, 8, 1, 1)}
    nodes = [conv("c1", "x", "w1"), helper.make_node("Transpose", ["c1"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["t", "sc", "bi"], ["ln"], axis=-1),
             helper.make_node("Transpose", ["ln"], ["t2"], perm=[0, 3, 1, 2]), conv("c2", "t2", "w2", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, res = prune(m)
    assert inits_of(out)["w1"].shape == (8, 4, 1, 1)
    assert any("LayerNormalization" in s.why for s in res.skipped)


def _channels_last_softmax_model(opset: int):
    """Conv -> [N, H*W, C] (channels last) -> Softmax(axis=1) -> MatMul reader. Channels whose
    producer rows are zero are exactly zero before the Softmax."""
    inits = {"w1": _w(8, 4, 1, 1), "shape": np.array([0, 8, 36], np.int64), "wm": _w(8, 3)}
    zero(inits, "w1", 0, [1, 5])
    zero(inits, "wm", 0, [1, 5])
    nodes = [conv("c1", "x", "w1"), helper.make_node("Reshape", ["c1", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Softmax", ["t"], ["s"], axis=1),
             helper.make_node("MatMul", ["s", "wm"], ["y"])]
    m = make_model(nodes, inits, [2, 4, 6, 6], [2, 36, 3])
    m.opset_import[0].version = opset
    m.ir_version = 7
    return m


def test_softmax_before_opset_13_mixes_every_axis_from_its_axis_on():
    # At opset 11, Softmax(axis=1) on [N, T, C] normalizes over T*C, so a zero channel still
    # adds exp(0) to every denominator: removing it changes the output, and it must freeze.
    m11 = _channels_last_softmax_model(11)
    out, res = prune(m11, ratio=0.25)
    assert inits_of(out)["w1"].shape == (8, 4, 1, 1)
    assert any("Softmax" in s.why for s in res.skipped)
    # From opset 13 the same node normalizes over T only: the channels pass through and prune.
    m13 = _channels_last_softmax_model(13)
    out13, _ = prune(m13, ratio=0.25)  # the two zero channels
    assert inits_of(out13)["w1"].shape[0] == 6
    assert_same(m13, out13, X)


def test_rules_are_looked_up_by_domain_and_opset_version():
    from prunec.graph.channel_core import find_rule

    assert find_rule("Softmax", "", 11) is not find_rule("Softmax", "", 13)
    assert find_rule("Softmax", "ai.onnx", 18) is find_rule("Softmax", "", 13)
    assert find_rule("Relu", "com.microsoft", 1) is None  # not a contrib op: no rule there
    assert find_rule("Gelu", "com.microsoft", 1) is not None
    assert find_rule("NoSuchOp", "", 17) is None


def test_graph_input_and_output_channels_never_change():
    inits = {"w1": _w(8, 4, 1, 1)}
    m = make_model([conv("c1", "x", "w1", y="y")], inits, ["N", 4, 6, 6], ["N", 8, 6, 6])
    out, res = prune(m)
    assert not res.changed
    assert inits_of(out)["w1"].shape == (8, 4, 1, 1)


def test_protect_regex_and_min_and_round():
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 8, 1, 1), "w3": _w(3, 8, 1, 1)}
    nodes = [conv("c1", "x", "w1"), conv("c2", "c1", "w2"), conv("c3", "c2", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, _ = prune(m, protect="^c1$")
    assert inits_of(out)["w1"].shape[0] == 8 and inits_of(out)["w2"].shape[0] == 4
    out, _ = prune(m, ratio=0.9, min=3)
    assert inits_of(out)["w1"].shape[0] == 3
    out, _ = prune(m, ratio=0.6, round=4)
    assert inits_of(out)["w1"].shape[0] == 4


def test_plan_file_sets_per_group_ratios(tmp_path):
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 8, 1, 1), "w3": _w(3, 8, 1, 1)}
    nodes = [conv("c1", "x", "w1"), conv("c2", "c1", "w2"), conv("c3", "c2", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default_ratio": 0.0, "groups": {"c2": 0.75}}))
    out, _ = prune(m, plan=plan)
    assert inits_of(out)["w1"].shape[0] == 8 and inits_of(out)["w2"].shape[0] == 2
    plan.write_text(json.dumps({"groups": {"nope": 0.5}}))
    with pytest.raises(OptionError, match="unknown group"):
        prune(m, plan=plan)


def test_global_ranking_takes_more_from_the_weaker_group():
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 8, 1, 1), "w3": _w(3, 8, 1, 1)}
    inits["w2"][:6] *= 1e-3  # six of c2's channels are nearly dead
    inits["w3"][:, :6] *= 1e-3
    nodes = [conv("c1", "x", "w1"), conv("c2", "c1", "w2"), conv("c3", "c2", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, _ = prune(m, **{"global": "true", "ratio": 0.4})
    w = inits_of(out)
    assert w["w2"].shape[0] == 2 and w["w1"].shape[0] == 8


def test_kept_count_rules():
    assert kept_count(10, 0.5) == 5
    assert kept_count(7, 0.5) == 4  # floor(3.5) = 3 removed
    assert kept_count(4, 0.99) == 1  # never all
    assert kept_count(16, 0.5, multiple=8) == 8
    assert kept_count(16, 0.6, multiple=8) == 8 and kept_count(16, 0.4, multiple=8) == 8  # 6.4, 9.6 -> 8
    assert kept_count(24, 0.5, multiple=8) == 16  # 12 is a tie: keep more
    assert kept_count(24, 0.9, multiple=8) == 8 and kept_count(6, 0.5, multiple=8) == 6  # never below 8 or n
    assert kept_count(16, 0.9, minimum=4) == 4
    assert class_multiple(8, 1) == 8 and class_multiple(8, 4) == 1 and class_multiple(16, 32) == 1


def test_round_keeps_multiples_of_n_channels_and_auto_follows_the_cpu():
    inits = {"w1": _w(24, 4, 1, 1), "w2": _w(40, 24, 1, 1), "w3": _w(3, 40, 1, 1)}
    nodes = [conv("c1", "x", "w1"), conv("c2", "c1", "w2"), conv("c3", "c2", "w3", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, _ = PassManager(build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "8"}})).run(m)
    w = inits_of(out)
    assert w["w1"].shape[0] == 16 and w["w2"].shape[0] == 24  # 12 -> 16, 20 -> 24
    out, res = PassManager(build_passes(["channels"], {"channels": {"ratio": "0.5"}})).run(m)
    block = channel_block()[0]
    assert res.passes[0].result.details["round"] == block
    assert inits_of(out)["w2"].shape[0] == kept_count(40, 0.5, multiple=block)


def test_channel_block_is_16_only_with_avx512(monkeypatch):
    import prunec.runtime.cpu as cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert cpu.channel_block()[0] == 16
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert cpu.channel_block()[0] == 8
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert cpu.channel_block()[0] == 8


def test_analysis_does_not_mutate_the_graph():
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(3, 8, 1, 1)}
    m = make_model([conv("c1", "x", "w1"), conv("c2", "c1", "w2", y="y")], inits,
                   ["N", 4, 6, 6], ["N", 3, 6, 6])
    before = m.SerializeToString()
    a = analyze_channels(m)
    assert [g.id for g in a.groups] == ["c1", "c2"] and a.groups[1].frozen
    assert m.SerializeToString() == before


def test_attention_head_dim_is_pruned_in_q_k_v_and_the_output_projection():
    torch = pytest.importorskip("torch")
    import io

    m = attention_block()
    gone = [h * 8 + j for h in range(2) for j in (1, 3, 4, 6)]  # the same head_dim indices in each head
    with torch.no_grad():
        for lin in (m.q, m.k, m.v):
            lin.weight[gone] = 0
            lin.bias[gone] = 0
        m.o.weight[:, gone] = 0
    f = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 5, 6),), f, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17)
    model = onnx.load_from_string(f.getvalue())
    out, res = prune(model)
    w = inits_of(out)
    names = {n.name: n for n in out.graph.node}
    qw = w[names["/q/MatMul"].input[1]]
    ow = w[names["/o/MatMul"].input[1]]
    assert qw.shape == (16, 8) and ow.shape == (8, 16)
    x = np.random.default_rng(3).standard_normal((2, 5, 6)).astype(np.float32)
    assert_same(model, out, x)
    pruned = {row["id"]: row for row in res.details["group_table"] if row["kept"] < row["size"]}
    assert set(pruned) == {"/q/MatMul", "/v/MatMul"}
    assert set(pruned["/q/MatMul"]["producers"]) == {"/q/MatMul", "/k/MatMul"}


def test_groups_of_one_split_producer_get_distinct_ids_and_both_prune():
    # c1 (8) is split in halves; the first half is added to d's output, the second is not:
    # two groups ({c1, d} and {c1}) whose first producer is c1 for both.
    inits = {"w1": _w(8, 4, 1, 1), "wd": _w(4, 4, 1, 1), "wa": _w(2, 4, 1, 1), "wb": _w(2, 4, 1, 1),
             "sp": np.array([4, 4], np.int64)}
    zero(inits, "w1", 0, [0, 1, 6, 7]); zero(inits, "wd", 0, [0, 1])
    zero(inits, "wa", 1, [0, 1]); zero(inits, "wb", 1, [2, 3])
    nodes = [conv("c1", "x", "w1"), helper.make_node("Split", ["c1", "sp"], ["s1", "s2"], axis=1),
             conv("d", "x", "wd"), helper.make_node("Add", ["s1", "d"], ["a"]),
             conv("ca", "a", "wa"), conv("cb", "s2", "wb"), helper.make_node("Add", ["ca", "cb"], ["y"])]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 2, 6, 6])
    ids = sorted(g.id for g in analyze_channels(m).groups if not g.frozen)
    assert ids == ["c1@0", "c1@4"]
    out, res = prune(m)
    w = inits_of(out)
    assert w["w1"].shape[0] == 4 and w["wd"].shape[0] == 2
    assert w["wa"].shape[1] == 2 and w["wb"].shape[1] == 2
    assert_same(m, out, X)


def test_activation_importance_removes_channels_silent_on_the_calibration_data():
    from prunec.errors import DataError
    from prunec.passes import PassContext

    w1 = np.zeros((8, 4, 1, 1), np.float32)
    w1[:4, 0] = 2.0 + RNG.random((4, 1, 1)).astype(np.float32)  # read input channel 0 only
    w1[4:, 1] = 0.5 + 0.5 * RNG.random((4, 1, 1)).astype(np.float32)  # read input channel 1 only, smaller
    inits = {"w1": w1, "w2": np.full((3, 8, 1, 1), 0.1, np.float32)}
    m = make_model([conv("c1", "x", "w1"), conv("c2", "c1", "w2", y="y")], inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    data = RNG.standard_normal((16, 4, 6, 6)).astype(np.float32)
    data[:, 0] = 0.0  # input channel 0 is silent in the calibration data
    passes = build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "1", "importance": "activation"}})
    out, _ = PassManager(passes, ctx=PassContext(data={"x": data})).run(m)
    kept = inits_of(out)["w1"]
    assert kept.shape[0] == 4 and np.all(kept[:, 1] != 0) and np.all(kept[:, 0] == 0)
    l1, _ = prune(m)  # magnitude alone would keep the larger, silent channels
    assert np.all(inits_of(l1)["w1"][:, 0] != 0)
    with pytest.raises(DataError, match="calibration data"):
        PassManager(passes).run(m)


def test_weights_shared_behind_identity_stay_shared_and_prune_together():
    # torch dedups identical initializers as Identity(first copy): c2 and c3 share one weight
    inits = {"w1": _w(8, 4, 1, 1), "ws": _w(8, 8, 1, 1), "w4": _w(3, 8, 1, 1)}
    nodes = [conv("c1", "x", "w1"), conv("c2", "c1", "ws"), helper.make_node("Identity", ["ws"], ["ws_copy"]),
             conv("c3", "c2", "ws_copy"), conv("c4", "c3", "w4", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    out, res = prune(m)
    w = inits_of(out)
    assert sorted(w) == ["w1", "w4", "ws"], "the shared weight must not be copied"
    assert w["ws"].shape == (4, 4, 1, 1) and w["w1"].shape == (4, 4, 1, 1) and w["w4"].shape == (3, 4, 1, 1)
    readers = [n.input[1] for n in out.graph.node if n.op_type == "Conv" and n.name in ("c2", "c3")]
    assert readers == ["ws", "ws"]


def test_analysis_of_a_model_sees_weights_behind_identity_like_the_pass():
    # a BN whose bias is an Identity of another BN's bias (what torch's dedup writes)
    inits = {"w1": _w(8, 4, 1, 1), "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
             "m": np.zeros(8, np.float32), "v": np.ones(8, np.float32), "w2": _w(3, 8, 1, 1)}
    nodes = [conv("c1", "x", "w1"), helper.make_node("Identity", ["b"], ["b2"]),
             helper.make_node("BatchNormalization", ["c1", "g", "b2", "m", "v"], ["bn"]),
             conv("c2", "bn", "w2", y="y")]
    m = make_model(nodes, inits, ["N", 4, 6, 6], ["N", 3, 6, 6])
    groups = {g.id: g for g in analyze_channels(m).groups}
    assert groups["c1"].frozen is None


def test_tensors_read_inside_an_if_branch_are_frozen():
    # c1's output is read implicitly by both branches of an If whose output feeds c2
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(3, 8, 1, 1)}
    def branch(name, op):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node(op, ["c1"], [f"{name}_out"])], name, [], [out])
    nodes = [conv("c1", "x", "w1"),
             helper.make_node("If", ["cond"], ["branch"], then_branch=branch("then", "Relu"),
                              else_branch=branch("else", "Sigmoid")),
             conv("c2", "branch", "w2", y="y")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 6])
    g = helper.make_graph(nodes, "t", [x, cond], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, res = prune(m)
    assert inits_of(out)["w1"].shape == (8, 4, 1, 1)
    assert any("subgraph of If" in s.why for s in res.skipped)


def test_unnamed_producers_get_names_and_distinct_group_ids():
    # Hand-built graphs and some exporters leave node names empty; group ids name producers.
    inits = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 4, 1, 1), "w3": _w(6, 8, 1, 1), "w4": _w(5, 8, 1, 1)}
    zero(inits, "w1", 0, [0, 3, 5, 6]); zero(inits, "w3", 1, [0, 3, 5, 6])
    zero(inits, "w2", 0, [1, 2, 4, 7]); zero(inits, "w4", 1, [1, 2, 4, 7])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Conv", ["x", "w2"], ["b"]),
             helper.make_node("Conv", ["a", "w3"], ["c"]), helper.make_node("Conv", ["b", "w4"], ["d"]),
             helper.make_node("ReduceMean", ["c"], ["cs"], axes=[1], keepdims=1),
             helper.make_node("ReduceMean", ["d"], ["ds"], axes=[1], keepdims=1),
             helper.make_node("Add", ["cs", "ds"], ["y"])]
    m = make_model(nodes, inits, [2, 4, 6, 6], [2, 1, 6, 6])
    groups = analyze_channels(m).groups
    live = [g for g in groups if not g.frozen]
    assert len(live) == 2 and len({g.id for g in live}) == 2 and all(g.id for g in live)
    out, res = prune(m)
    assert inits_of(out)["w1"].shape[0] == 4 and inits_of(out)["w2"].shape[0] == 4
    assert_same(m, out, X)
