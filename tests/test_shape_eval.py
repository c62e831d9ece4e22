"""Shapes propagated in numpy (`prunec.graph.shape_eval`) against ONNX Runtime's, which is the
oracle: every tensor the propagation reports must have the shape a real run gives it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from test_fold_static import shuffle_chain

from models import init, rng, run, vi
from prunec.graph import fold
from prunec.graph.shape_eval import tensor_shapes_at

I64 = TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=()):
    """A model whose outputs are named only (their shapes are what is under test)."""
    outs = [onnx.ValueInfoProto(name=o.name) for o in outputs]
    graph = helper.make_graph(list(nodes), "test", list(inputs), outs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_shapes(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every node output in a real run (each exposed as a graph output)."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    listed = {o.name for o in m2.graph.output}
    m2.graph.output.extend(onnx.ValueInfoProto(name=o) for n in m2.graph.node for o in n.output
                           if o and o not in listed)
    return {k: tuple(np.shape(v)) for k, v in run(m2, feeds).items()}


def check(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], *, complete: bool = True) -> dict:
    """Propagated shapes equal the run's for every tensor reported, and (`complete`) every node
    output is reported."""
    feeds = {}
    for x in m.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
        feeds[x.name] = rng(0).standard_normal(shapes[x.name]).astype(dtype)
    want = ort_shapes(m, feeds)
    [got] = tensor_shapes_at(gs.import_onnx(m), shapes)
    for name, shape in got.items():
        if name in want:
            assert shape == want[name], name
    if complete:
        missing = sorted(set(want) - set(got))
        assert not missing, missing
    return got


def conv_model(**attrs) -> onnx.ModelProto:
    g = attrs.get("group", 1)
    w = rng(1).standard_normal((6, 6 // g, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    return make_model([node], [vi("x", ["N", 6, "H", "W"])], [vi("y", None)], [init("w", w)])


@pytest.mark.parametrize("attrs", [{}, {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 0, 1, 0]},
                                   {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, {"group": 3, "strides": [3, 2]},
                                   {"auto_pad": "VALID", "strides": [2, 2]}])
@pytest.mark.parametrize("hw", [(7, 7), (8, 11)])
def test_conv_windows(attrs, hw):
    check(conv_model(**attrs), {"x": (2, 6, *hw)})


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("kernel,stride,pad", [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 3, 1), (2, 3, 0)])
@pytest.mark.parametrize("ceil", [0, 1])
@pytest.mark.parametrize("size", [6, 7, 9, 12])
def test_pool_windows_with_and_without_ceil_mode(op, kernel, stride, pad, ceil, size):
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                            pads=[pad, pad, pad, pad], ceil_mode=ceil)
    check(make_model([node], [vi("x", ["N", 2, "H", "W"])], [vi("y", None)]), {"x": (1, 2, size, size + 1)})


def test_shape_arithmetic_and_layout_ops():
    # Run-time shape arithmetic as exporters write it (Shape with start/end, Gather, negative
    # integer Div, Cast, Unsqueeze, Concat, Reshape with 0 and -1), then layout and reduction ops.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Shape", ["x"], ["s12"], start=1, end=-1),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Div", ["c", "neg4"], ["cneg"]),  # 6 / -4: -1 (truncated, not floored)
        helper.make_node("Mul", ["cneg", "mone"], ["c3"]),
        helper.make_node("Cast", ["c3"], ["c3i"], to=I64),
        helper.make_node("Unsqueeze", ["c3i", "ax0"], ["u"]),
        helper.make_node("Concat", ["zero", "u", "m1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["t", "st", "en", "axs", "stp"], ["sl"]),
        helper.make_node("Split", ["sl", "parts"], ["p0", "p1"], axis=1),
        helper.make_node("ReduceMean", ["p1"], ["rm"], axes=[1], keepdims=0),
        helper.make_node("ReduceSum", ["p0", "ax0"], ["rs"], keepdims=1),
        helper.make_node("Unsqueeze", ["rm", "ax0"], ["rmu"]),
        helper.make_node("Squeeze", ["rmu", "ax0"], ["rms"]),
        helper.make_node("Flatten", ["p0"], ["fl"], axis=2),
        helper.make_node("Gather", ["x", "idx2"], ["gx"], axis=-1),
        helper.make_node("Slice", ["s12", "st1", "en1"], ["s12b"]),
    ]
    inits = [init("i1", np.array(1, np.int64)), init("neg4", np.array(-4, np.int64)), init("mone", np.array(-1, np.int64)),
             init("ax0", np.array([0], np.int64)), init("zero", np.array([0], np.int64)),
             init("m1", np.array([-1], np.int64)),
             init("st", np.array([-1, 1], np.int64)), init("en", np.array([-100, 2 ** 62], np.int64)),
             init("axs", np.array([2, 1], np.int64)), init("stp", np.array([-2, 1], np.int64)),
             init("parts", np.array([19, 100], np.int64)), init("idx2", np.array([[0, -1], [1, 1]], np.int64)),
             init("st1", np.array([0], np.int64)), init("en1", np.array([1], np.int64))]
    m = make_model(nodes, [vi("x", ["N", 6, "H", "W"])], [vi("rs", None), vi("rms", None), vi("fl", None),
                                                          vi("gx", None), vi("s12b", None)], inits)
    got = check(m, {"x": (2, 6, 5, 4)})
    assert got["r"] == (2, 1, 120)


def test_dense_layers_and_broadcasting():
    a = rng(2).standard_normal((5, 7)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "a"], ["y"], transB=1),
             helper.make_node("MatMul", ["x", "b"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["ad"]),
             helper.make_node("Mul", ["ad", "col"], ["mu"]),
             helper.make_node("Clip", ["mu", "lo", "hi"], ["cl"]),
             helper.make_node("HardSwish", ["cl"], ["hs"])]
    inits = [init("a", a), init("b", rng(3).standard_normal((3, 4)).astype(np.float32)),
             init("bias", np.zeros(4, np.float32)), init("col", np.ones((1, 7, 1, 1), np.float32)),
             init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32))]
    m = make_model(nodes, [vi("x", ["N", 7, "H", 3])], [vi("y", None), vi("hs", None)], inits)
    check(m, {"x": (2, 7, 5, 3)})


def test_uncovered_ops_leave_their_outputs_and_everything_after_unknown():
    # NonZero's output shape depends on the data: nothing downstream of it may be claimed.
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("NonZero", ["r"], ["nz"]),
             helper.make_node("Shape", ["nz"], ["s"]),
             helper.make_node("Relu", ["r"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 3])], [vi("s", None), vi("y", None)])
    got = check(m, {"x": (2, 3)}, complete=False)
    assert got["r"] == got["y"] == (2, 3)
    assert "nz" not in got and "s" not in got


def _targets(graph: gs.Graph) -> list[gs.Tensor]:
    return list({id(n.inputs[0]): n.inputs[0] for n in graph.nodes if n.op == "Shape"}.values())


@pytest.mark.parametrize("spatial,input_shapes", [((4, 4), None), (("H", "W"), None),
                                                  (("H", "W"), {"x": (1, 8, 6, 10)})])
def test_propagated_shape_reads_equal_the_measured_ones(spatial, input_shapes):
    g = gs.import_onnx(shuffle_chain(4, spatial=spatial))
    targets = _targets(g)
    measured = fold._measured_shape_reads(g, targets, input_shapes)
    assert measured is not None and len(measured) == 4
    assert fold._propagated_shape_reads(g, targets, input_shapes) == measured


def test_shape_reads_behind_an_uncovered_op_are_measured():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Shape", ["nz"], ["s"])]
    g = gs.import_onnx(make_model(nodes, [vi("x", ["N", 3])], [vi("s", None)]))
    targets = _targets(g)
    assert fold._propagated_shape_reads(g, targets, None) is None
    assert fold.static_shape_reads(g) == fold._measured_shape_reads(g, targets, None) == {"nz": (2, None)}


@pytest.mark.parametrize("arch", sorted(__import__("zoo").ZOO))
def test_propagated_graph_shapes_equal_onnx_inference_on_the_zoo(arch):
    # What the channel analysis reads: the shapes of every tensor of the folded graph at the
    # input shapes. Where the propagation covers the whole graph, it must give exactly what
    # ONNX's inference (with its folding and run-time fallbacks) gives.
    import zoo

    a = zoo.ZOO[arch]
    model = zoo.export(zoo.build(a).wide, a.hw, keep_bn=True)
    g = fold.fold_constants(gs.import_onnx(model))
    g.toposort()
    propagated = fold._propagated_shapes(g, None)
    inferred = fold._inferred_shapes(g, None, symbolic=False)
    if arch in ("resnet_basic", "mobilenet_v3", "efficientnet", "densenet", "inception", "shufflenet_v2"):
        assert propagated is not None  # the CNNs the benchmark prunes are covered whole
    if propagated is not None:
        assert propagated == inferred


def test_graphs_with_subgraphs_are_left_to_onnx_inference():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [vi("t", ["N", 3])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", ["N", 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    m = make_model(nodes, [vi("x", ["N", 3]), vi("c", [], elem=TensorProto.BOOL)], [vi("y", None), vi("r", None)])
    assert fold._propagated_shapes(gs.import_onnx(m), None) is None
