"""The zero-channel oracle (tests/zoo.py) on quantized and half-precision forms of the zoo.

QDQ: the wide, oracle-zeroed export is quantized with ONNX Runtime's own tool (static, QDQ
format, per-channel int8 weights), pruned, and must reproduce the quantized wide model within
one quantization step of its output, keep every quantize/dequantize node and int8 weight, and
have exactly the parameters of the identically quantized narrow model. fp16: the same with all
weights and inputs in float16, within float16's tolerance. bf16 (which ONNX Runtime's CPU convs
do not run) is checked at the weight level: the same channels leave as in float32, in bf16."""

from __future__ import annotations

import exporters
import numpy as np
import onnx
import pytest
import zoo
from onnx import TensorProto, helper, numpy_helper
from test_channels_oracle import inputs, run_ort

from models import apply_pass
from prunec.graph.costs import analyze_costs
from prunec.passes import PassManager, build_passes

QDQ_ARCHS = ["resnet_basic", "mobilenet_v2", "inception"]
FP16_ARCHS = ["resnet_basic", "mobilenet_v2", "densenet", "shufflenet_v2"]


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    passes = build_passes(["channels"], {"channels": {"ratio": "0.5", "importance": "l1", "round": "1"}})
    out, _ = PassManager(passes).run(model)
    return out


@pytest.fixture(scope="session")
def oracle_exports():
    cache = {}

    def get(name):
        if name not in cache:
            o = zoo.build(name, seed=0)
            hw = zoo.ZOO[name].hw
            cache[name] = (zoo.export(o.wide, hw, keep_bn=False), zoo.export(o.narrow, hw, keep_bn=False))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def qdq():
    """(wide, narrow) quantized by ONNX Runtime, per architecture and format (cached)."""
    return exporters.quantized_pair


def _quant_ops(model):
    return sorted(n.op_type for n in model.graph.node if "Quantize" in n.op_type)


def _output_step(model) -> float:
    """The scale of the last QuantizeLinear before the output: one step of the output's grid."""
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(np.max(inits[q.input[1]]))


@pytest.mark.parametrize("name", QDQ_ARCHS)
def test_qdq_oracle_prunes_exactly_and_stays_quantized(name, qdq):
    wide, narrow = qdq(name)
    got = prune(wide)
    onnx.checker.check_model(got, full_check=True)
    x = inputs(zoo.ZOO[name].hw)
    ref, out = run_ort(wide, x), run_ort(got, x)
    # Exact up to rounding in the requantization of the output (at most a step or two).
    err = max(float(np.max(np.abs(r - o))) for r, o in zip(ref, out))
    assert err <= 2 * _output_step(wide) + 1e-6, err
    assert _quant_ops(got) == _quant_ops(wide), "quantize/dequantize nodes must all stay"
    dq_weights = {n.input[0] for n in got.graph.node if n.op_type == "DequantizeLinear"}
    dtypes = {t.data_type for t in got.graph.initializer if t.name in dq_weights and len(t.dims) > 1}
    assert dtypes == {TensorProto.INT8}, "weights stay int8"
    assert _int8_weights(got) == _int8_weights(narrow) < _int8_weights(wide)
    assert analyze_costs(got).params < analyze_costs(wide).params


def _int8_weights(model) -> int:
    """Elements of the quantized weight tensors (the oracle's narrow count, quantized the same)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type == TensorProto.INT8 and len(t.dims) > 1)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_qoperator_oracle_prunes_qlinear_ops_exactly(name, qdq):
    """QOperator format: QLinearConv (depthwise too), QLinearAdd, QLinearGlobalAveragePool, QGemm."""
    wide, narrow = qdq(name, "QOperator")
    assert "QLinearConv" in {n.op_type for n in wide.graph.node}
    # QLinearConv/QGemm count the MACs of the float layers they replace.
    assert analyze_costs(wide).macs == analyze_costs(zoo.export(zoo.build(name).wide, 16, keep_bn=False)).macs
    got = prune(wide)
    x = inputs(zoo.ZOO[name].hw)
    err = max(float(np.max(np.abs(r - o))) for r, o in zip(run_ort(wide, x), run_ort(got, x)))
    assert err <= 2 * _output_step(wide) + 1e-6, err
    assert _int8_weights(got) == _int8_weights(narrow) < _int8_weights(wide)


def test_qdq_per_channel_scales_are_sliced_with_their_weights(qdq):
    wide, _ = qdq("resnet_basic")
    got = prune(wide)
    inits = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    checked = 0
    for n in got.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4:
            assert inits[n.input[1]].shape == (inits[n.input[0]].shape[0],)
            checked += 1
    assert checked >= 4


# -- fp16 and bf16 ----------------------------------------------------------------------------

def to_half(model: onnx.ModelProto, elem=TensorProto.FLOAT16) -> onnx.ModelProto:
    """Every float32 weight, Constant, input and output in float16 (or bfloat16)."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem)
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def convert(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type != TensorProto.FLOAT:
            return t
        a = numpy_helper.to_array(t).astype(np_type)
        return numpy_helper.from_array(a, t.name) if elem == TensorProto.FLOAT16 else \
            helper.make_tensor(t.name, elem, a.shape, a.astype(np.float32).ravel().tolist())

    new = [convert(t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    m.graph.initializer.extend(new)
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(convert(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = elem
    for v in list(m.graph.input) + list(m.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = elem
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("name", FP16_ARCHS)
def test_fp16_oracle_prunes_exactly_in_half_precision(name, oracle_exports):
    wide32, narrow32 = oracle_exports(name)
    wide, narrow = to_half(wide32), to_half(narrow32)
    got = prune(wide)
    onnx.checker.check_model(got, full_check=True)
    x = inputs(zoo.ZOO[name].hw).astype(np.float16)
    err = zoo.rel_err([r.astype(np.float32) for r in run_ort(wide, x)],
                      [o.astype(np.float32) for o in run_ort(got, x)])
    assert err <= 5e-3, err   # float16 keeps about 3 decimal digits
    assert {t.data_type for t in got.graph.initializer if len(t.dims) > 1} == {TensorProto.FLOAT16}
    assert analyze_costs(got).params == analyze_costs(narrow).params


def test_bf16_weights_lose_the_same_channels_as_float32_and_stay_bf16(oracle_exports):
    wide32, _ = oracle_exports("resnet_basic")
    got32, _ = apply_pass(wide32, "channels", ratio=0.5, round=1)
    got16, _ = apply_pass(to_half(wide32, TensorProto.BFLOAT16), "channels", ratio=0.5, round=1)
    w32 = {t.name: numpy_helper.to_array(t) for t in got32.graph.initializer if len(t.dims) == 4}
    w16 = {t.name: t for t in got16.graph.initializer if len(t.dims) == 4}
    assert w32 and set(w32) == set(w16)
    for k, v in w32.items():
        assert w16[k].data_type == TensorProto.BFLOAT16
        assert tuple(w16[k].dims) == v.shape, k


def test_dynamic_quantization_conv_integer_prunes_exactly(oracle_exports, tmp_path):
    """ONNX Runtime's dynamic quantization (DynamicQuantizeLinear + ConvInteger, as in ddddocr's
    common_old.onnx): zeroed channels leave every weight, outputs stay within a quantization step."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def dyn(model, name):
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}_int8.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["Conv"], per_channel=True,
                         weight_type=QuantType.QInt8)
        return onnx.load(str(dst))
    wide32, narrow32 = oracle_exports("resnet_basic")
    wide, narrow = dyn(wide32, "w"), dyn(narrow32, "n")
    assert "ConvInteger" in {n.op_type for n in wide.graph.node}
    got = prune(wide)
    x = inputs(16)
    assert zoo.rel_err(run_ort(wide, x), run_ort(got, x)) <= 1e-3
    assert _int8_weights(got) == _int8_weights(narrow) < _int8_weights(wide)
