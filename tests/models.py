"""Tiny ONNX models built with onnx.helper, and helpers to run and rewrite them in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.passes.base import PassContext, get_pass, make_options

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo_cnn.onnx"
DEMO_TEST = REPO / "models" / "demo_digits_test.npz"

F = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    """Seeded generator so every test model is reproducible."""
    return np.random.default_rng(seed)


def init(name: str, value) -> onnx.TensorProto:
    """An initializer from a numpy value."""
    return numpy_helper.from_array(np.asarray(value), name)


def vi(name: str, shape, elem=F) -> onnx.ValueInfoProto:
    """A tensor value info (shape entries may be ints or symbolic names)."""
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, ir_version: int = 8
               ) -> onnx.ModelProto:
    """A checked model from nodes, value infos and initializers."""
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def bn_params(prefix: str, c: int, seed: int = 1) -> list[onnx.TensorProto]:
    """Non-trivial BatchNormalization scale, bias, mean and (positive) var."""
    r = rng(seed)
    return [init(f"{prefix}_scale", r.uniform(0.5, 2.0, c).astype(np.float32)),
            init(f"{prefix}_bias", r.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_mean", r.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_var", r.uniform(0.2, 3.0, c).astype(np.float32))]


def bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    """BatchNormalization reading the parameters made by bn_params(prefix)."""
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
                            [y], name=f"{prefix}_node", epsilon=1e-3, **attrs)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name from ONNX Runtime with graph optimisations off (an independent oracle)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def apply_pass(model: onnx.ModelProto, name: str, **options):
    """Run one pass directly (no PassManager, no verification) -> (new model, PassResult)."""
    cls = get_pass(name)
    graph = from_onnx(model)
    result = cls(make_options(cls, options)).run(graph, PassContext())
    normalize(graph)
    return to_onnx(graph, model), result


def ops(model: onnx.ModelProto) -> list[str]:
    """Op types in graph order."""
    return [n.op_type for n in model.graph.node]


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """Max abs error over max |ref|."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(ref - np.asarray(got, np.float64))) / max(np.max(np.abs(ref)), 1e-30))


def conv_relu_model(*, opset: int = 17, ir_version: int = 8, batch="N") -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv(3, 3x3, pad 1) + bias -> Relu -> y. 54+3 params."""
    r = rng(3)
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [vi("x", [batch, 2, 4, 4])], [vi("y", [batch, 3, 4, 4])],
        [init("w", r.standard_normal((3, 2, 3, 3)).astype(np.float32)),
         init("b", r.standard_normal(3).astype(np.float32))],
        opset=opset, ir_version=ir_version)


def bn_spatial0_opset8() -> onnx.ModelProto:
    """Opset 8 BatchNormalization with spatial=0: onnx's version converter cannot lift it."""
    c = [init(n, np.ones((2, 4, 4), np.float32)) for n in ("s", "b", "m", "v")]
    return make_model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                                        spatial=0)],
                      [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 2, 4, 4])], c, opset=8, ir_version=4)


def files_in(folder: Path) -> set[str]:
    """Every file name under `folder` (relative), hidden temp files included."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def attention_block():
    """A two-head self-attention block in torch (embedding, Q, K, V, output projection, residual,
    LayerNorm, head; d=16, so head_dim 8), seeded (torch.manual_seed(0)) and in eval mode."""
    import math

    import torch

    class Attn(torch.nn.Module):
        def __init__(self, d=16, h=2):
            super().__init__()
            self.h, self.dh = h, d // h
            self.emb = torch.nn.Linear(6, d)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
            self.ln = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, 3)

        def forward(self, x):
            x = self.emb(x)
            b, t, d = x.shape

            def heads(z):
                return z.view(b, t, self.h, self.dh).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), -1)
            y = (a @ v).transpose(1, 2).reshape(b, t, d)
            return self.head(self.ln(x + self.o(y)))

    torch.manual_seed(0)
    return Attn().eval()


def dq_conv_pair(r: np.random.Generator) -> onnx.ModelProto:
    """Conv -> Relu -> Conv with uint8 weights behind DequantizeLinear at zero point 100 (weights
    drawn from `r`): a removed channel's "zero" there is 100, not 0."""
    u8 = lambda *s: r.integers(0, 256, size=s).astype(np.uint8)  # noqa: E731
    inits = {"w1q": u8(8, 4, 3, 3), "s1": np.array(0.01, np.float32), "z1": np.array(100, np.uint8),
             "w2q": u8(3, 8, 1, 1), "s2": np.array(0.02, np.float32), "z2": np.array(100, np.uint8)}
    nodes = [helper.make_node("DequantizeLinear", ["w1q", "s1", "z1"], ["w1"], name="dq1"),
             helper.make_node("DequantizeLinear", ["w2q", "s2", "z2"], ["w2"], name="dq2"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="c2")]
    return make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 3, 6, 6])],
                      [numpy_helper.from_array(v, k) for k, v in inits.items()])


def hidden_batch_classifier(x: str, dims: list[int], batch: int) -> onnx.ModelProto:
    """logits (4 classes) = reshape(x, [batch, 4]) @ I, with x declared [N, *dims] (4 values per
    sample): it runs only when N == batch, a hard-coded batch its inputs do not declare, as some
    exporters write."""
    nodes = [helper.make_node("Reshape", [x, "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])]
    return make_model(nodes, [vi(x, ["N", *dims])], [vi("logits", ["N", 4])],
                      [init("shape", np.array([batch, 4], np.int64)), init("W", np.eye(4, dtype=np.float32))],
                      ir_version=9)
