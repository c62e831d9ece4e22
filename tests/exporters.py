"""Exports of the zoo by torch's two exporters at two opsets each, and hand-built graphs in the
styles of other frameworks' converters (tf2onnx, paddle2onnx), each with channels zeroed by hand
so that removing them must leave the outputs unchanged."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: (exporter, opset): torch's legacy TorchScript exporter at 13 and 18; the dynamo exporter
#: (torch.export + onnxscript) at 18 and 20 (it cannot write opsets below 18).
EXPORTS = [("legacy", 13), ("legacy", 18), ("dynamo", 18), ("dynamo", 20)]


def export(model, hw: int, exporter: str, opset: int) -> onnx.ModelProto:
    """Export a zoo module with a dynamic batch, BatchNorm folded as each exporter does by default."""
    import torch

    x = torch.randn(2, 3, hw, hw)
    with torch.no_grad():
        y = model.eval()(x)
    outs = [f"y{i}" for i in range(len(y))] if isinstance(y, tuple) else ["y"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            f = io.BytesIO()
            torch.onnx.export(model.eval(), (x,), f, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=outs, dynamic_axes={k: {0: "N"} for k in ["x", *outs]})
            return onnx.load_from_string(f.getvalue())
        logging.disable(logging.WARNING)  # the dynamo exporter logs its steps
        try:
            prog = torch.onnx.export(model.eval(), (x,), dynamo=True, opset_version=opset,
                                     input_names=["x"], output_names=outs, verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N")},))
        finally:
            logging.disable(logging.NOTSET)
        return prog.model_proto


# -- hand-built converter styles ---------------------------------------------------------------

R = np.random.default_rng(7)


def _w(*shape) -> np.ndarray:
    return (R.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)


def _const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(value), name))


def tf2onnx_style() -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """NHWC input, Transposes around the convs, weights in Constant nodes, a residual Add,
    Reshape to [-1, H*W*C] of the channels-last map, MatMul + Add head. Returns the model and the
    weight shapes pruning must reach (names of the Constant outputs -> shape)."""
    c, h = 8, 4
    zeroed = [1, 2, 5, 6]
    w1, b1, w2, b2 = _w(c, 3, 3, 3), _w(c), _w(c, c, 3, 3), _w(c)
    fc = _w(h * h * c, 10)
    w1[zeroed], b1[zeroed], w2[zeroed], b2[zeroed] = 0, 0, 0, 0
    w2[:, zeroed] = 0
    rows = [(p * c + k) for p in range(h * h) for k in zeroed]  # NHWC flatten: (h, w, c)
    fc[rows] = 0
    nodes = [
        _const_node("StatefulPartitionedCall/conv1/kernel", w1), _const_node("conv1/bias", b1),
        _const_node("StatefulPartitionedCall/conv2/kernel", w2), _const_node("conv2/bias", b2),
        _const_node("dense/kernel", fc), _const_node("dense/bias", _w(10)),
        _const_node("flat_shape", np.array([-1, h * h * c], np.int64)),
        helper.make_node("Transpose", ["input_1"], ["nchw"], name="conv1__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "StatefulPartitionedCall/conv1/kernel", "conv1/bias"], ["c1"],
                         name="StatefulPartitionedCall/conv1/BiasAdd", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="StatefulPartitionedCall/conv1/Relu"),
        helper.make_node("Conv", ["r1", "StatefulPartitionedCall/conv2/kernel", "conv2/bias"], ["c2"],
                         name="StatefulPartitionedCall/conv2/BiasAdd", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="StatefulPartitionedCall/add/add"),
        helper.make_node("Relu", ["a"], ["r2"], name="StatefulPartitionedCall/relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["nhwc"], name="conv2__12", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="StatefulPartitionedCall/flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"], name="StatefulPartitionedCall/dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["dense"], name="StatefulPartitionedCall/dense/BiasAdd"),
    ]
    g = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                           ["unk__1", 8, 8, 3])],
                          [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__1", 10])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m, {"StatefulPartitionedCall/conv1/kernel": (4, 3, 3, 3), "dense/kernel": (64, 10)}


def paddle2onnx_style() -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """p2o names, BatchNormalization kept, HardSwish, a depthwise conv, GlobalAveragePool, a
    Reshape with [0, -1] (0 copies the batch), MatMul + Add head, shape constants as Constant
    nodes (paddle2onnx writes them that way); weights as initializers."""
    c, e = 8, 16
    z1, z2 = [0, 3, 4, 7], [1, 2, 5, 6, 9, 10, 13, 14]
    inits = {"conv2d_0.w_0": _w(c, 3, 3, 3), "conv2d_1.w_0": _w(e, c, 1, 1), "conv2d_2.w_0": _w(e, 1, 3, 3),
             "conv2d_3.w_0": _w(c, e, 1, 1), "linear_0.w_0": _w(c, 10), "linear_0.b_0": _w(10)}
    for k, n in (("bn0", c), ("bn1", e), ("bn2", e)):
        inits |= {f"{k}.scale": R.uniform(0.5, 1.5, n).astype(np.float32), f"{k}.bias": _w(n),
                  f"{k}.mean": _w(n), f"{k}.var": R.uniform(0.5, 1.5, n).astype(np.float32)}
    inits["conv2d_0.w_0"][z1] = 0
    inits["bn0.scale"][z1] = inits["bn0.bias"][z1] = 0
    inits["conv2d_1.w_0"][:, z1] = 0
    inits["conv2d_3.w_0"][:, :, :] *= 1
    inits["conv2d_1.w_0"][z2] = 0
    for k in ("bn1", "bn2"):
        inits[f"{k}.scale"][z2] = inits[f"{k}.bias"][z2] = 0
    inits["conv2d_2.w_0"][z2] = 0
    inits["conv2d_3.w_0"][:, z2] = 0
    # conv2d_3's own channels reach the head: zero its rows and the head's columns too.
    inits["conv2d_3.w_0"][z1] = 0
    inits["linear_0.w_0"][z1] = 0

    def bn(i, x, k, y):
        return helper.make_node("BatchNormalization", [x, f"{k}.scale", f"{k}.bias", f"{k}.mean", f"{k}.var"],
                                [y], name=f"p2o.BatchNormalization.{i}", epsilon=1e-5)
    nodes = [
        helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["conv2d_0.tmp_0"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
        bn(0, "conv2d_0.tmp_0", "bn0", "bn0.tmp"), helper.make_node("HardSwish", ["bn0.tmp"], ["hs0"], name="p2o.HardSwish.0"),
        helper.make_node("Conv", ["hs0", "conv2d_1.w_0"], ["conv2d_1.tmp_0"], name="p2o.Conv.1"),
        bn(1, "conv2d_1.tmp_0", "bn1", "bn1.tmp"), helper.make_node("Relu", ["bn1.tmp"], ["r1"], name="p2o.Relu.0"),
        helper.make_node("Conv", ["r1", "conv2d_2.w_0"], ["conv2d_2.tmp_0"], name="p2o.Conv.2", group=e,
                         pads=[1, 1, 1, 1]),
        bn(2, "conv2d_2.tmp_0", "bn2", "bn2.tmp"), helper.make_node("Relu", ["bn2.tmp"], ["r2"], name="p2o.Relu.1"),
        helper.make_node("Conv", ["r2", "conv2d_3.w_0"], ["conv2d_3.tmp_0"], name="p2o.Conv.3"),
        helper.make_node("Add", ["conv2d_3.tmp_0", "hs0"], ["add_0"], name="p2o.Add.0"),
        helper.make_node("GlobalAveragePool", ["add_0"], ["pool"], name="p2o.GlobalAveragePool.0"),
        _const_node("p2o.helper.constant.0", np.array([0, -1], np.int64)),
        helper.make_node("Reshape", ["pool", "p2o.helper.constant.0"], ["flat"], name="p2o.Reshape.0"),
        helper.make_node("MatMul", ["flat", "linear_0.w_0"], ["mm"], name="p2o.MatMul.0"),
        helper.make_node("Add", ["mm", "linear_0.b_0"], ["linear_0.tmp_1"], name="p2o.Add.1"),
        helper.make_node("Softmax", ["linear_0.tmp_1"], ["softmax_0.tmp_0"], name="p2o.Softmax.0", axis=-1),
    ]
    g = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3, 8, 8])],
                          [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 10])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], producer_name="PaddlePaddle")
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m, {"conv2d_0.w_0": (4, 3, 3, 3), "conv2d_1.w_0": (8, 4, 1, 1), "conv2d_2.w_0": (8, 1, 3, 3),
               "linear_0.w_0": (4, 10)}


# -- caches shared by the test modules (one export or quantization per process) ---------------

from functools import cache


@cache
def oracle_pair(name: str, exporter: str, opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(wide, narrow) oracle exports of a zoo architecture by one exporter at one opset."""
    import zoo

    o = zoo.build(name, seed=0)
    hw = zoo.ZOO[name].hw
    return export(o.wide, hw, exporter, opset), export(o.narrow, hw, exporter, opset)


@cache
def quantized_pair(name: str, fmt: str = "QDQ") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(wide, narrow) of the legacy opset-17 oracle export, quantized by ONNX Runtime's static
    quantizer in `fmt` (QDQ or QOperator): per-channel int8 weights, uint8 activations."""
    import tempfile
    from pathlib import Path

    import zoo

    o = zoo.build(name, seed=0)
    hw = zoo.ZOO[name].hw
    pair = []
    for model in (o.wide, o.narrow):
        folder = Path(tempfile.mkdtemp(prefix="prunec_quant_"))
        pair.append(quantize(zoo.export(model, hw, keep_bn=False), hw, folder, fmt))
    return pair[0], pair[1]


def quantize(model: onnx.ModelProto, hw: int, folder, fmt: str = "QDQ") -> onnx.ModelProto:
    """Static quantization by ONNX Runtime, calibrated on 8 random batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.standard_normal((2, 3, hw, hw)).astype(np.float32)}
                                 for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = folder / "float.onnx", folder / "quant.onnx"
    onnx.save(model, str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # "please consider pre-processing" on every call
        try:
            quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt),
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        finally:
            logging.disable(logging.NOTSET)
    return onnx.load(str(dst))
