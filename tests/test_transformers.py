"""Transformers: the `heads` pass, MLP neurons and head_dim through `channels`, the KV-cache
interface policy, and symbolic dims, against zero-head oracles (tests/transformer_zoo.py).

Each oracle zeroes, from the torch module structure alone, a random half of every attention
layer's heads (KV groups under grouped-query attention) and head_dim indices and of every MLP's
neurons. `heads` then `channels`, both at ratio 0.5, must reproduce the wide model's outputs
within 1e-4 (relative) at two batch sizes and two sequence lengths, and end with exactly the
narrow twin's parameter count. Every model is exported with both of torch's exporters.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import transformer_zoo as tz  # tests/ is on sys.path (see conftest.py)

from prunec.errors import BreakingChange
from prunec.graph.costs import analyze_costs
from prunec.passes import PassContext, PassManager, build_passes

EXPORTERS = ["legacy", "dynamo"]
TOL = 1e-4


@pytest.fixture(scope="session")
def oracle():
    cache: dict[str, tz.Oracle] = {}

    def get(name: str) -> tz.Oracle:
        if name not in cache:
            cache[name] = tz.make_oracle(tz.ARCHS[name])
        return cache[name]
    return get


@pytest.fixture(scope="session")
def exported(oracle):
    """(wide, narrow) ONNX per architecture and exporter, exported once per session."""
    cache: dict[tuple[str, str], tuple[onnx.ModelProto, onnx.ModelProto]] = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            o, arch = oracle(name), tz.ARCHS[name]
            cache[name, exporter] = (tz.export(o.wide, arch, exporter),
                                     tz.export(o.narrow, arch, exporter, cfg=arch.cfg.narrow()))
        return cache[name, exporter]
    return get


def prune(model: onnx.ModelProto, *, allow: bool = False, passes=("heads", "channels"), **channels):
    """heads then channels at 0.5 (l1, round 1: the oracle removes exactly half); returns the
    model after each pass and the run report."""
    opts = {"heads": {"ratio": "0.5"}, "channels": {"ratio": "0.5", "round": "1", **channels}}
    after: list[onnx.ModelProto] = []
    _, report = PassManager(build_passes(list(passes), {p: opts[p] for p in passes}),
                              ctx=PassContext(allow_interface_change=allow),
                              on_pass=lambda i, rec, m: after.append(m)).run(model)
    return after, report


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def sliced(values: dict[str, np.ndarray], interface: dict) -> dict[str, np.ndarray]:
    """Inputs or outputs with the positions an allowed interface change removed taken out."""
    out = dict(values)
    for name, axes in interface.items():
        if name in out:
            for ax, idx in axes.items():
                out[name] = np.take(out[name], idx, axis=int(ax))
    return out


def assert_reproduces(arch: tz.Arch, wide: onnx.ModelProto, got: onnx.ModelProto, interface=None):
    """Equal outputs at batch 1 and 3 and sequence 5 and 9 (a fixed image size for the ViT)."""
    interface = interface or {}
    seqs = (5,) if arch.kind == "vit" else (5, 9)
    for batch in (1, 3):
        for seq in seqs:
            feeds = tz.inputs(arch, batch, seq, past=4, seed=batch + seq)
            ref = sliced(run(wide, feeds), interface)
            out = run(got, sliced(feeds, interface))
            err = tz.rel_err(list(ref.values()), [out[k] for k in ref])
            assert err <= TOL, f"batch {batch} seq {seq}: rel err {err:.3g}"


def interface_of(report) -> dict:
    out: dict = {}
    for p in report.passes:
        for name, axes in p.result.interface.items():
            assert name not in out, "an interface changed twice: compose the slices"
            out[name] = axes
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["bert", "vit", "gpt", "gqa"])
def test_heads_and_channels_reproduce_the_zero_head_oracle(name, exporter, oracle, exported):
    arch = tz.ARCHS[name]
    wide, narrow = exported(name, exporter)
    (after_heads, after_channels), report = prune(wide)
    heads = report.passes[0].result.details
    c = arch.cfg
    # Whole heads (KV groups, each with its query heads) went, half in every layer.
    assert heads["layers"] == c.layers and heads["layers_frozen"] == 0
    assert heads["heads_removed"] == c.layers * c.kv_heads // 2
    assert all(g["kept"] == g["size"] // 2 for g in heads["group_table"])
    # Both passes were proven equal to the model before them with what they removed masked.
    assert all(p.verification.proof is not None and p.verification.proof.max_rel <= TOL for p in report.passes)
    assert_reproduces(arch, wide, after_heads)
    assert_reproduces(arch, wide, after_channels)
    got, want = analyze_costs(after_channels).params, analyze_costs(narrow).params
    assert got == want, f"pruned params {got} != oracle narrow {want}"
    # Symbolic batch and sequence dims stay symbolic in the written model.
    for before, now in zip(list(wide.graph.input) + list(wide.graph.output),
                           list(after_channels.graph.input) + list(after_channels.graph.output)):
        assert now.type == before.type


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_kv_cache_heads_change_the_interface_only_when_allowed(exporter, oracle, exported):
    from prunec.graph.diff import diff_models

    arch = tz.ARCHS["gpt_cache"]
    wide, narrow = exported("gpt_cache", exporter)
    with pytest.raises(BreakingChange, match="past_key_0.*--allow-interface-change"):
        prune(wide, passes=("heads",))
    (_, after_channels), report = prune(wide, allow=True)
    interface = interface_of(report)
    o = oracle("gpt_cache")
    kept_kv = o.kept[0][0].tolist()
    assert set(interface) == {"past_key_0", "past_value_0", "present_key_0", "present_value_0"}
    assert all(axes == {1: kept_kv} for axes in interface.values())
    assert_reproduces(arch, wide, after_channels, interface)
    assert analyze_costs(after_channels).params == analyze_costs(narrow).params
    warnings = diff_models(wide, after_channels).warnings
    assert any(w.startswith("BREAKING: input 'past_key_0'") for w in warnings), warnings
    assert any(w.startswith("BREAKING: output 'present_value_0'") for w in warnings), warnings


# -- hidden width (opt-in, lossy) -------------------------------------------------------------

@pytest.mark.parametrize("norm,exporter", [("ln", "legacy"), ("rms", "dynamo"), ("ln_decomposed", "legacy")])
def test_hidden_width_computes_what_the_narrow_twin_with_norms_over_kept_channels_does(norm, exporter):
    """The oracle also zeroes half the hidden width; `channels.hidden` must remove exactly that
    and then compute the narrow twin, whose LayerNorm/RMSNorm statistics cover only the kept
    channels (the op, and the decomposed ReduceMean forms)."""
    from dataclasses import replace

    arch = tz.Arch("gpt_hidden", replace(tz.ARCHS["gpt"].cfg, norm=norm), "decoder")
    o = tz.make_oracle(arch, hidden=True)
    wide = tz.export(o.wide, arch, exporter)
    narrow = tz.export(o.narrow, arch, exporter, cfg=replace(arch.cfg.narrow(), d=arch.cfg.d // 2))
    (_, got), report = prune(wide, hidden="true")
    assert_reproduces(arch, narrow, got)
    assert analyze_costs(got).params == analyze_costs(narrow).params
    notes = report.passes[1].result.notes
    op = "LayerNormalization" if norm == "ln" else "ReduceMean"
    count = (2 * arch.cfg.layers + 1) * (2 if norm == "ln_decomposed" else 1)
    assert notes == [f"{count} {op} statistics now over 16 of 32 channels (lossy): " + notes[0].split(": ", 1)[1]]


def test_hidden_width_is_frozen_by_default_with_the_option_named(exported):
    wide, _ = exported("gpt", "legacy")
    _, report = prune(wide, passes=("channels",))
    table = report.passes[0].result.details["group_table"]
    hidden = next(g for g in table if g["size"] == tz.ARCHS["gpt"].cfg.d)
    assert hidden["kept"] == hidden["size"] and "channels.hidden=true" in hidden["frozen"]
    assert set(hidden["producers"]) >= {"/tok/Gather", "/pos/Gather", "/blocks.0/attn/o/MatMul"}


# -- fused attention ---------------------------------------------------------------------------

def _fused_ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node
            if n.domain == "com.microsoft" or n.op_type == "Attention"}


@pytest.mark.parametrize("name,exporter", [("bert_fused", "legacy"), ("bert", "dynamo")])
def test_ort_transformer_optimizer_output_prunes_exactly(name, exporter, oracle, exported, tmp_path):
    """ONNX Runtime's transformer optimizer fuses the legacy export's attention into
    com.microsoft Attention (its head_dim stays: the fused op's scale depends on it) and the
    dynamo export's norms and GELUs into SkipLayerNormalization, BiasGelu and
    EmbedLayerNormalization; heads and MLP neurons still go exactly."""
    from onnxruntime.transformers.optimizer import optimize_model

    arch = tz.ARCHS[name]
    wide, narrow = exported(name, exporter)
    src = tmp_path / "wide.onnx"
    onnx.save(wide, str(src))
    opt = optimize_model(str(src), model_type="bert", num_heads=arch.cfg.heads, hidden_size=arch.cfg.d,
                         opt_level=0)
    opt.save_model_to_file(str(tmp_path / "opt.onnx"))
    fused = onnx.load(str(tmp_path / "opt.onnx"))
    ops = _fused_ops(fused)
    assert {("com.microsoft", "SkipLayerNormalization"), ("com.microsoft", "BiasGelu")} <= ops
    assert (("com.microsoft", "Attention") in ops) == (exporter == "legacy")
    assert analyze_costs(fused).macs == analyze_costs(wide).macs  # fused attention ops are counted
    (after_heads, after_channels), report = prune(fused)
    assert report.passes[0].result.details["heads_removed"] == arch.cfg.layers * arch.cfg.heads // 2
    assert_reproduces(arch, fused, after_heads)
    assert_reproduces(arch, fused, after_channels)
    assert analyze_costs(after_channels).params == analyze_costs(narrow).params + \
        analyze_costs(fused).params - analyze_costs(wide).params  # fusion itself changes no weight count
    if exporter == "legacy":
        attn = [n for n in after_channels.graph.node if n.op_type == "Attention"]
        assert [a.attribute[0].i for a in attn if a.attribute[0].name == "num_heads"] == \
            [arch.cfg.heads // 2] * arch.cfg.layers


def test_onnx_attention_op_opset_23(oracle):
    """The dynamo exporter writes F.scaled_dot_product_attention as ONNX's Attention (opset
    23): heads go through it (the Reshapes into heads and out of them), head_dim stays."""
    arch = tz.ARCHS["gpt_sdpa"]
    o = oracle("gpt_sdpa")
    wide = tz.export(o.wide, arch, "dynamo", opset=23)
    narrow = tz.export(o.narrow, arch, "dynamo", opset=23, cfg=arch.cfg.narrow())
    assert ("ai.onnx", "Attention") in _fused_ops(wide)
    (_, after_channels), report = prune(wide)
    assert report.passes[0].result.details["heads_removed"] == arch.cfg.layers * arch.cfg.heads // 2
    assert_reproduces(arch, wide, after_channels)
    assert analyze_costs(after_channels).params == analyze_costs(narrow).params
    frozen = " ".join(s.why for s in report.passes[1].result.skipped)
    assert "pruning head_dim would change its softmax scale" in frozen


def _fused_block(op: str, gone_kv: list[int]) -> onnx.ModelProto:
    """x -> Q/K/V MatMuls -> com.microsoft MultiHeadAttention (4 heads, packed bias) or
    GroupQueryAttention (4 query heads on 2 KV heads, an empty constant cache) -> out-projection,
    with the weights of KV heads `gone_kv` (and their query heads) zeroed by hand."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b, s, d, h, hd = 2, 4, 32, 4, 8
    kv = 2 if op == "GroupQueryAttention" else h
    rep = h // kv
    w = {"wq": rng.standard_normal((d, h * hd)), "wk": rng.standard_normal((d, kv * hd)),
         "wv": rng.standard_normal((d, kv * hd)), "wo": rng.standard_normal((h * hd, d))}
    w = {k: (0.3 * v).astype(np.float32) for k, v in w.items()}
    q_gone = [g * rep + r for g in gone_kv for r in range(rep)]
    for name, heads in (("wq", q_gone), ("wk", gone_kv), ("wv", gone_kv)):
        for x in heads:
            w[name][:, x * hd:(x + 1) * hd] = 0
    for x in q_gone:
        w["wo"][x * hd:(x + 1) * hd] = 0
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c], name=c) for c in "qkv"]
    if op == "MultiHeadAttention":
        bias = (0.1 * rng.standard_normal(3 * h * hd)).astype(np.float32)
        for part in range(3):
            for x in q_gone:
                bias[part * h * hd + x * hd: part * h * hd + (x + 1) * hd] = 0
        w["bias"] = bias
        nodes.append(helper.make_node(op, ["q", "k", "v", "bias"], ["a"], name="attn", domain="com.microsoft",
                                      num_heads=h))
    else:
        w.update(pk=np.zeros((b, kv, 0, hd), np.float32), pv=np.zeros((b, kv, 0, hd), np.float32),
                 sl=np.full((b,), s - 1, np.int32), tl=np.array(s, np.int32))
        nodes.append(helper.make_node(op, ["q", "k", "v", "pk", "pv", "sl", "tl"], ["a", "pk_out", "pv_out"],
                                      name="attn", domain="com.microsoft", num_heads=h, kv_num_heads=kv))
    nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"], name="o"))
    g = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, s, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, d])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op,attrs", [("MultiHeadAttention", {"num_heads": 2}),
                                      ("GroupQueryAttention", {"num_heads": 2, "kv_num_heads": 1})])
def test_fused_ms_attention_ops_lose_whole_heads(op, attrs):
    model = _fused_block(op, gone_kv=[1] if op == "GroupQueryAttention" else [0, 3])
    b, s, d, h, hd, kv = 2, 4, 32, 4, 8, 2 if op == "GroupQueryAttention" else 4
    projections = b * s * d * (h * hd + 2 * kv * hd) + b * s * h * hd * d
    attention = b * s * s * 2 * h * hd  # Q·Kᵀ and scores·V of every query head
    assert analyze_costs(model).macs == projections + attention
    (got,), _ = prune(model, passes=("heads",))
    x = np.random.default_rng(5).standard_normal((2, 4, 32)).astype(np.float32)
    assert tz.rel_err([run(model, {"x": x})["y"]], [run(got, {"x": x})["y"]]) <= TOL
    node = next(n for n in got.graph.node if n.op_type == op)
    assert {a.name: a.i for a in node.attribute if a.name in attrs} == attrs
    assert analyze_costs(got).params < analyze_costs(model).params


@pytest.mark.parametrize("importance", ["activation", "output", "reconstruction"])
def test_calibrated_head_importance_finds_the_oracle_heads(importance, exported):
    """Zeroed heads output nothing: every calibrated score ranks them first."""
    arch = tz.ARCHS["bert"]
    wide, _ = exported("bert", "legacy")
    data = tz.inputs(arch, 6, 9, seed=11)
    out, report = PassManager(build_passes(["heads"], {"heads": {"ratio": "0.5", "importance": importance}}),
                              ctx=PassContext(data=data)).run(wide)
    assert report.passes[0].result.details["heads_removed"] == arch.cfg.layers * arch.cfg.heads // 2
    assert_reproduces(arch, wide, out)


def test_reconstruction_importance_is_the_least_squares_refit_loss():
    """What removing columns loses after a least-squares refit of the reader on the rest (with
    a bias), against numpy's lstsq: a head whose output the others can express costs nothing."""
    from prunec.passes.head_importance import Reader

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 2)), rng.standard_normal((200, 2))
    x = np.hstack([a, 0.1 * b, a @ rng.standard_normal((2, 2)) + 3.0])  # head 2 = head 0 mixed, shifted
    w = rng.standard_normal((6, 5))
    r = Reader("x", 1, np.array([0, 0, 1, 1, 2, 2]), w)
    r.add(x)
    for gone in ({0}, {1}, {2}, {0, 1}):
        cols = np.isin(r.roots, list(gone))
        keep = np.hstack([x[:, ~cols], np.ones((200, 1))])
        fit, *_ = np.linalg.lstsq(keep, x @ w, rcond=None)
        want = np.square(keep @ fit - x @ w).sum() / 200
        assert r.loss(gone, refit=True) == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert r.loss(gone, refit=False) == pytest.approx(np.square(x[:, cols] @ w[cols]).sum() / 200, rel=1e-9)
    assert r.loss({2}, refit=True) < 1e-6 < r.loss({1}, refit=True)   # head 2 is redundant
    assert r.loss({1}, refit=False) < r.loss({2}, refit=False)        # yet head 1 is the quietest


def test_channels_activation_importance_reads_the_token_axis_layout(exported, oracle):
    """MLP neurons and head_dim live on the last axis of [batch, sequence, channels] MatMul
    outputs; mean |activation| is taken per channel there (zeroed ones are exactly 0)."""
    arch = tz.ARCHS["gpt"]
    wide, narrow = exported("gpt", "legacy")
    passes = build_passes(["heads", "channels"], {"heads": {"ratio": "0.5"},
                                                  "channels": {"ratio": "0.5", "round": "1", "importance": "activation"}})
    out, _ = PassManager(passes, ctx=PassContext(data=tz.inputs(arch, 6, 9, seed=4))).run(wide)
    assert_reproduces(arch, wide, out)
    assert analyze_costs(out).params == analyze_costs(narrow).params
