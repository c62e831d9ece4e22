"""Constant folding of run-time shape arithmetic: every static dim in one round, symbolic dims
(batch and others) never baked in."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from models import init, make_model, ops, rng, run, vi
from prunec.graph import fold


def shuffle_chain(blocks: int, spatial=("H", "W")) -> onnx.ModelProto:
    """x [N, 8, H, W] through `blocks` channel shuffles, each reshaping with a shape vector it
    computes at run time from the previous block's output (Shape -> Gather -> Div -> Concat)."""
    nodes, inits = [], [init("two", np.array(2, np.int64)), init("g", np.array([2], np.int64))]
    for k in range(4):
        inits.append(init(f"i{k}", np.array(k, np.int64)))
    inits.append(init("ax0", np.array([0], np.int64)))
    x = "x"
    for b in range(blocks):
        p = f"b{b}_"
        nodes += [helper.make_node("Shape", [x], [p + "s"])]
        dims = []
        for k in range(4):
            nodes.append(helper.make_node("Gather", [p + "s", f"i{k}"], [p + f"d{k}"], axis=0))
            nodes.append(helper.make_node("Unsqueeze", [p + f"d{k}", "ax0"], [p + f"u{k}"]))
            dims.append(p + f"u{k}")
        nodes += [helper.make_node("Div", [p + "d1", "two"], [p + "half"]),
                  helper.make_node("Unsqueeze", [p + "half", "ax0"], [p + "uh"]),
                  helper.make_node("Concat", [dims[0], "g", p + "uh", dims[2], dims[3]], [p + "shp5"], axis=0),
                  helper.make_node("Reshape", [x, p + "shp5"], [p + "r5"]),
                  helper.make_node("Transpose", [p + "r5"], [p + "t5"], perm=[0, 2, 1, 3, 4]),
                  helper.make_node("Concat", [dims[0], dims[1], dims[2], dims[3]], [p + "shp4"], axis=0),
                  helper.make_node("Reshape", [p + "t5", p + "shp4"], [p + "y"])]
        x = p + "y"
    nodes.append(helper.make_node("Relu", [x], ["y"]))
    return make_model(nodes, [vi("x", ["N", 8, *spatial])], [vi("y", ["N", 8, *spatial])], inits)


def folded(m: onnx.ModelProto, input_shapes=None) -> onnx.ModelProto:
    g = fold.fold_constants(gs.import_onnx(m), input_shapes)
    out = gs.export_onnx(g)
    out.ir_version = m.ir_version
    return out


def gathers_of_shapes(m: onnx.ModelProto) -> list[int]:
    """Indices read from Shape outputs that are left in the model."""
    shape_outs = {n.output[0] for n in m.graph.node if n.op_type == "Shape"}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    return sorted(int(np.ravel(consts[n.input[1]])[0]) for n in m.graph.node
                  if n.op_type == "Gather" and n.input[0] in shape_outs)


def test_every_static_dim_of_a_chain_folds_in_one_measured_round(monkeypatch):
    calls = []
    real = fold.static_shape_reads
    monkeypatch.setattr(fold, "static_shape_reads", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = shuffle_chain(6, spatial=(4, 4))
    out = folded(m)
    assert len(calls) == 1
    # Only the batch (index 0) is still read at run time; channels and spatial dims are constants.
    assert gathers_of_shapes(out) == [0] * 6
    x = rng(1).standard_normal((3, 8, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})["y"], run(m, {"x": x})["y"])


def test_symbolic_spatial_dims_are_not_baked_in():
    # Folded at H=W=4 (the --input-shape), the model must still run at other sizes.
    m = shuffle_chain(3)
    out = folded(m, {"x": (1, 8, 4, 4)})
    assert gathers_of_shapes(out) == sorted([0, 2, 3] * 3)
    for shape in ((1, 8, 4, 4), (2, 8, 6, 10)):
        x = rng(2).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(run(out, {"x": x})["y"], run(m, {"x": x})["y"])


def test_symbolic_spatial_dims_without_input_shapes_are_measured_and_stay_symbolic():
    # H and W symbolic and no input shapes: they are run at prunec's representative size and at
    # twice it, so they vary and stay read at run time, while the channel count folds.
    m = shuffle_chain(2)
    reads = fold.static_shape_reads(gs.import_onnx(m))
    assert reads["x"] == (None, 8, None, None)
    out = folded(m)
    assert 1 not in gathers_of_shapes(out)
    x = rng(3).standard_normal((2, 8, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})["y"], run(m, {"x": x})["y"])


def test_unmeasurable_shape_reads_fall_back_to_symbolic_inference(monkeypatch):
    # When the graph cannot be run (static_shape_reads gives None), the old rounds of symbolic
    # inference and folding still fold the channel count.
    monkeypatch.setattr(fold, "static_shape_reads", lambda *a, **k: None)
    m = shuffle_chain(2)
    out = folded(m)
    assert 1 not in gathers_of_shapes(out)
    x = rng(3).standard_normal((2, 8, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})["y"], run(m, {"x": x})["y"])


def test_a_model_without_shape_reads_is_not_run():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", 3])], [vi("y", ["N", 3])], [])
    assert fold.static_shape_reads(gs.import_onnx(m)) == {}
    assert ops(folded(m)) == ["Relu"]

