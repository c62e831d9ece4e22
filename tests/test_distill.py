"""distill: the ONNX->torch conversion, one training step, the interface, determinism and errors."""

from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
import zoo
from onnx import helper
from torch import nn

from models import DEMO, init, make_model, rel_err, run, vi
from prunec.errors import DataError, UnsupportedOpError
from prunec.graph.to_torch import convert
from prunec.graph.verify import check_interface
from prunec.passes import PassContext, PassManager, build_passes
from prunec.passes.base import Calibration


def _torch_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    net = convert(model)
    with torch.no_grad():
        out = net({k: torch.from_numpy(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in out.items()}


class TinyEncoder(nn.Module):
    """Embedding, one attention block with a padding mask, LayerNorm, GELU MLP: the op mix of an
    exported BERT (Gather, Shape/Reshape/Transpose, Softmax, Where, Erf, LayerNormalization)."""

    def __init__(self, vocab=50, d=16, heads=2):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.emb(ids) + self.pos(pos)
        a, _ = self.attn(h, h, h, key_padding_mask=mask == 0, need_weights=False)
        h = self.ln1(h + a)
        return self.ln2(h + self.mlp(h))


def _export_encoder() -> onnx.ModelProto:
    torch.manual_seed(0)
    m = TinyEncoder().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (ids, mask), f, dynamo=False, input_names=["ids", "mask"], output_names=["h"],
                          dynamic_axes={"ids": {0: "N", 1: "L"}, "mask": {0: "N", 1: "L"}, "h": {0: "N", 1: "L"}},
                          opset_version=17)
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("arch", ["resnet_basic", "mobilenet_v3", "shufflenet_v2", "inception", "densenet"])
def test_conversion_reproduces_onnx_runtime_on_zoo_cnns(arch):
    o = zoo.build(arch)
    model = zoo.export(o.original, zoo.ZOO[arch].hw, keep_bn=True)
    x = np.random.default_rng(1).standard_normal((3, 3, zoo.ZOO[arch].hw, zoo.ZOO[arch].hw)).astype(np.float32)
    ref, got = run(model, {"x": x}), _torch_run(model, {"x": x})
    for name in ref:
        assert rel_err(ref[name], got[name]) <= 1e-5, name


def test_conversion_reproduces_the_demo_model_and_a_transformer_block():
    demo = onnx.load(str(DEMO))
    x = np.load(str(DEMO).replace("demo_cnn.onnx", "demo_digits_test.npz"))["image"][:64]
    assert rel_err(run(demo, {"image": x})["logits"], _torch_run(demo, {"image": x})["logits"]) <= 1e-5
    enc = _export_encoder()
    ids = np.random.default_rng(2).integers(0, 50, (2, 7)).astype(np.int64)  # the traced shape
    mask = np.ones((2, 7), np.int64)
    mask[0, 5:] = 0  # padding takes the masked branch
    feeds = {"ids": ids, "mask": mask}
    assert rel_err(run(enc, feeds)["h"], _torch_run(enc, feeds)["h"]) <= 1e-5


def test_float_constants_are_parameters_shared_by_name_and_scalars_stay_fixed():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["b"]),
         helper.make_node("Mul", ["b", "half"], ["y"])],
        [vi("x", ["N", 4])], [vi("y", ["N", 4])], [init("w", w), init("half", np.float32(0.5))])
    net = convert(model)
    assert set(net.param_names) == {"w"}  # one parameter for both readers; the scalar is not trained
    assert sum(p.numel() for p in net.parameters()) == 16


def test_unsupported_ops_are_named_in_one_error():
    model = make_model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
                        helper.make_node("NonZero", ["x"], ["nz"])],
                       [vi("x", [2, 5])], [vi("v", [2, 3]), vi("i", [2, 3], onnx.TensorProto.INT64),
                                           vi("nz", [2, None], onnx.TensorProto.INT64)],
                       [init("k", np.array([3], np.int64))])
    with pytest.raises(UnsupportedOpError, match="NonZero, TopK"):
        convert(model)


# ---------------------------------------------------------------- the pass

def _mlp(seed: int = 0, hidden: int = 32) -> onnx.ModelProto:
    """x[N,8] -> Gemm -> Relu -> Gemm -> logits[N,5] (a classifier: KL on logits)."""
    r = np.random.default_rng(seed)
    return make_model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1)],
        [vi("x", ["N", 8])], [vi("logits", ["N", 5])],
        [init("w1", r.standard_normal((hidden, 8)).astype(np.float32)), init("b1", r.standard_normal(hidden).astype(np.float32)),
         init("w2", r.standard_normal((5, hidden)).astype(np.float32)), init("b2", np.zeros(5, np.float32))])


def _calib(n: int = 256, seed: int = 3) -> Calibration:
    return Calibration({"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}, "test")


def _kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(softmax(t) || softmax(s)), computed here with numpy (the oracle)."""
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lt, ls = log_softmax(teacher_logits.astype(np.float64)), log_softmax(student_logits.astype(np.float64))
    return float((np.exp(lt) * (lt - ls)).sum(1).mean())


def _run_passes(model, names, options, calib, seed=0):
    ctx = PassContext(calib=calib, seed=seed)
    return PassManager(build_passes(names, options), ctx=ctx).run(model)


def test_one_distillation_step_lowers_the_loss_against_the_original():
    original, calib = _mlp(), _calib()
    pruned, _ = _run_passes(original, ["sparsity"], {"sparsity": {"ratio": 0.6}}, calib)
    out, report = _run_passes(original, ["sparsity", "distill"],
                              {"sparsity": {"ratio": 0.6}, "distill": {"steps": 1, "lr": 0.01, "batch": 256}},
                              calib)
    x = calib.inputs
    teacher = run(original, x)["logits"]
    before, after = _kl(teacher, run(pruned, x)["logits"]), _kl(teacher, run(out, x)["logits"])
    assert report.passes[-1].result.changed
    assert report.passes[-1].result.details["steps"] == 1
    assert after < before * 0.98, (before, after)


def test_distilled_model_keeps_interface_names_and_structure():
    from prunec.graph.ir import from_onnx

    model = zoo.export(zoo.build("resnet_basic").original, 16, keep_bn=False)
    calib = Calibration({"x": np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32)}, "t")
    pruned, _ = _run_passes(model, ["channels"], {"channels": {"ratio": 0.5, "round": 1}}, calib)
    out, report = _run_passes(model, ["channels", "distill"],
                              {"channels": {"ratio": 0.5, "round": 1}, "distill": {"steps": 3}}, calib)
    check_interface(model, out)  # names, dtypes, shapes; symbolic dims stay symbolic
    assert [d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim][:1] == ["N"]
    assert [(n.op_type, n.name) for n in out.graph.node] == [(n.op_type, n.name) for n in pruned.graph.node]
    assert {t.name for t in out.graph.initializer} == {t.name for t in pruned.graph.initializer}
    assert out.opset_import[0].version == pruned.opset_import[0].version
    changed = [t.name for t, p in zip(out.graph.initializer, pruned.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(p))]
    assert report.passes[-1].result.changed and changed
    assert len(from_onnx(out).nodes) == len(pruned.graph.node)


def test_a_step_budget_is_deterministic_with_the_seed():
    original, calib = _mlp(seed=1), _calib()
    opts = {"sparsity": {"ratio": 0.6}, "distill": {"steps": 4, "batch": 16}}
    a, _ = _run_passes(original, ["sparsity", "distill"], opts, calib, seed=5)
    b, _ = _run_passes(original, ["sparsity", "distill"], opts, calib, seed=5)
    c, _ = _run_passes(original, ["sparsity", "distill"], opts, calib, seed=6)
    wa, wb, wc = (onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
                  for m in (a, b, c))
    assert np.array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


def test_distill_without_calibration_data_is_a_data_error():
    with pytest.raises(DataError, match="distill needs calibration data"):
        _run_passes(_mlp(), ["sparsity", "distill"], {"distill": {"steps": 1}}, None)


def test_distill_without_torch_says_what_to_install(prunec_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError, as without the extra
    data = str(DEMO).replace("demo_cnn.onnx", "demo_digits_train.npz")
    res = prunec_cli("run", DEMO, "--passes", "channels,distill", "-o", tmp_path / "o.onnx", "--data", data,
                     "--no-profile")
    assert res.exit_code == 2
    assert "pip install 'prunec[distill]'" in prunec_cli.one_line_error(res)


def test_sequence_loss_ignores_padding_positions_marked_by_the_mask_input():
    from prunec.passes.distill import _mask_input, _mse

    t = torch.randn(2, 5, 3)
    s = t.clone()
    s[0, 3:] += 10.0  # differs only at padding positions of sample 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(_mse(s, t, mask)) == 0.0
    assert float(_mse(s, t, None)) > 1.0
    model = make_model([helper.make_node("Identity", ["ids"], ["y"])],
                       [vi("ids", ["N", "L"], onnx.TensorProto.INT64), vi("attention_mask", ["N", "L"], onnx.TensorProto.INT64)],
                       [vi("y", ["N", "L"], onnx.TensorProto.INT64)])
    assert _mask_input(model) == "attention_mask"
