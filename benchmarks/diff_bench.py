"""Time `diff_models` on synthetic residual CNNs of growing depth (built here, no downloads).

For each depth: identical copy (matched by name), every node/tensor/initializer renamed (matched
by topology), and a "pruned" copy (every block's inner conv loses half its channels).
Usage: python benchmarks/diff_bench.py [blocks ...]
"""

from __future__ import annotations

import platform
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from prunec.graph.diff import diff_models


def resnet(blocks: int, width: int = 16, inner: int = 16, rename: str = "") -> onnx.ModelProto:
    """Stem conv then `blocks` residual blocks (conv-bn-relu-conv-bn-add-relu), GAP, Gemm."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nm = lambda s: f"{rename}{s}"  # noqa: E731
    nodes, inits = [], []

    def conv(x, cin, cout, name, k=3):
        inits.append(numpy_helper.from_array(f(cout, cin, k, k), nm(f"{name}.w")))
        nodes.append(helper.make_node("Conv", [x, nm(f"{name}.w")], [nm(f"{name}.y")], nm(name),
                                      pads=[k // 2] * 4))
        return nm(f"{name}.y")

    def bn(x, c, name):
        ps = [nm(f"{name}.{p}") for p in ("s", "b", "m", "v")]
        for p, a in zip(ps, (np.abs(f(c)) + .5, f(c), f(c), np.abs(f(c)) + .5)):
            inits.append(numpy_helper.from_array(a, p))
        nodes.append(helper.make_node("BatchNormalization", [x] + ps, [nm(f"{name}.y")], nm(name)))
        return nm(f"{name}.y")

    def relu(x, name):
        nodes.append(helper.make_node("Relu", [x], [nm(f"{name}.y")], nm(name)))
        return nm(f"{name}.y")

    h = relu(bn(conv("x", 3, width, "stem"), width, "stem_bn"), "stem_relu")
    for i in range(blocks):
        y = relu(bn(conv(h, width, inner, f"b{i}.c1"), inner, f"b{i}.bn1"), f"b{i}.r1")
        y = bn(conv(y, inner, width, f"b{i}.c2"), width, f"b{i}.bn2")
        nodes.append(helper.make_node("Add", [h, y], [nm(f"b{i}.add.y")], nm(f"b{i}.add")))
        h = relu(nm(f"b{i}.add.y"), f"b{i}.r2")
    nodes.append(helper.make_node("GlobalAveragePool", [h], [nm("gap.y")], nm("gap")))
    nodes.append(helper.make_node("Flatten", [nm("gap.y")], [nm("flat.y")], nm("flat")))
    inits += [numpy_helper.from_array(f(10, width), nm("fc.w")), numpy_helper.from_array(f(10), nm("fc.b"))]
    nodes.append(helper.make_node("Gemm", [nm("flat.y"), nm("fc.w"), nm("fc.b")], ["logits"], nm("fc"), transB=1))
    g = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def prune_inner(m: onnx.ModelProto, keep: int) -> onnx.ModelProto:
    """Keep the first `keep` inner channels of every block (c1 rows, bn1 params, c2 columns)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if ".c1.w" in t.name or ".bn1." in t.name:
            a = a[:keep]
        elif ".c2.w" in t.name:
            a = a[:, :keep]
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(depths: list[int]) -> None:
    print(f"# diff_models timings, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| blocks | nodes | identical (s) | renamed (s) | pruned (s) | renamed: matched by topology/order |")
    print("|---:|---:|---:|---:|---:|---|")
    for blocks in depths:
        base = resnet(blocks)
        renamed = resnet(blocks, rename="r_")
        pruned = prune_inner(base, 8)
        d0, t0 = timed(lambda: diff_models(base, base))
        d1, t1 = timed(lambda: diff_models(base, renamed))
        d2, t2 = timed(lambda: diff_models(base, pruned))
        assert d0.empty and d1.empty and len(d2.changed_nodes) == 4 * blocks
        print(f"| {blocks} | {len(base.graph.node)} | {t0:.2f} | {t1:.2f} | {t2:.2f} | "
              f"{d1.matched_by['topology']}/{d1.matched_by['order']} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8, 32, 128])
