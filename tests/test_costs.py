"""MACs and params against values computed by hand from the layer definitions."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from models import init, make_model, vi
from prunec.graph.costs import analyze_costs


def _w(*shape):
    return np.zeros(shape, np.float32)


def _single(node, x_shape, y_shape, inits, **kw):
    m = make_model([node], [vi("x", x_shape)], [vi("y", y_shape)], inits)
    return analyze_costs(m, **kw)


# Conv MACs = N * Cout * Hout * Wout * (Cin / group) * kh * kw, with
# Hout = floor((H + pad_top + pad_bottom - dilation * (k - 1) - 1) / stride) + 1.
@pytest.mark.parametrize("cin,h,cout,k,group,stride,pads,dil,hout,want", [
    # 1x3x8x8 -> 4x8x8, 3x3 pad 1: 4*64 * 3*9
    (3, 8, 4, 3, 1, 1, 1, 1, 8, 4 * 8 * 8 * 3 * 9),
    # grouped: 4 in, 6 out, group 2, stride 2, pad 1 on 9x9: Hout = floor((9+2-3)/2)+1 = 5
    (4, 9, 6, 3, 2, 2, 1, 1, 5, 6 * 5 * 5 * 2 * 9),
    # depthwise 8 -> 8, group 8
    (8, 6, 8, 3, 8, 1, 1, 1, 6, 8 * 6 * 6 * 1 * 9),
    # dilation 2, no pad on 10x10: effective kernel 5, Hout = 6
    (3, 10, 4, 3, 1, 1, 0, 2, 6, 4 * 6 * 6 * 3 * 9),
    # stride 3, asymmetric-free pad 2, 1x1 kernel on 7x7: Hout = floor((7+4-1)/3)+1 = 4
    (5, 7, 2, 1, 1, 3, 2, 1, 4, 2 * 4 * 4 * 5 * 1),
])
def test_conv(cin, h, cout, k, group, stride, pads, dil, hout, want):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, strides=[stride, stride],
                            pads=[pads] * 4, dilations=[dil, dil])
    w = _w(cout, cin // group, k, k)
    c = _single(node, ["N", cin, h, h], ["N", cout, hout, hout], [init("w", w), init("b", _w(cout))])
    assert c.macs == want
    assert c.params == w.size + cout
    assert c.layers[0].output_shape == (1, cout, hout, hout)
    # A symbolic batch counts at the requested batch size, and scales linearly.
    assert analyze_costs(make_model([node], [vi("x", ["N", cin, h, h])], [vi("y", ["N", cout, hout, hout])],
                                    [init("w", w), init("b", _w(cout))]), batch=3).macs == 3 * want


def test_conv_asymmetric_pads_and_rect_kernel():
    # 2x5x7 input, kernel 3x2, pads top 1 left 0 bottom 0 right 1: Hout = 5+1-3+1 = 4, Wout = 7+1-2+1 = 7
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 0, 1])
    c = _single(node, [1, 2, 5, 7], [1, 3, 4, 7], [init("w", _w(3, 2, 3, 2))])
    assert c.macs == 3 * 4 * 7 * 2 * 3 * 2


def test_conv1d_and_3d():
    n1 = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1])
    assert _single(n1, [1, 4, 16], [1, 8, 16], [init("w", _w(8, 4, 3))]).macs == 8 * 16 * 4 * 3
    n3 = helper.make_node("Conv", ["x", "w"], ["y"])
    assert _single(n3, [1, 2, 4, 4, 4], [1, 3, 2, 2, 2], [init("w", _w(3, 2, 3, 3, 3))]).macs == \
        3 * 8 * 2 * 27


# ConvTranspose: every input element is multiplied into (Cout/group) * kh * kw outputs:
# MACs = N * Cin * H * W * (Cout / group) * kh * kw.
@pytest.mark.parametrize("cin,cout_g,group,stride,h,hout", [
    (4, 3, 1, 2, 5, 11),  # Hout = (5-1)*2 + 3 = 11
    (4, 3, 2, 2, 5, 11),  # grouped: 6 outputs
    (6, 1, 6, 1, 4, 6),   # depthwise transpose
])
def test_conv_transpose(cin, cout_g, group, stride, h, hout):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=group, strides=[stride, stride])
    c = _single(node, [2, cin, h, h], [2, cout_g * group, hout, hout], [init("w", _w(cin, cout_g, 3, 3))])
    assert c.macs == 2 * cin * h * h * cout_g * 9
    assert c.layers[0].output_shape == (2, cout_g * group, hout, hout)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm(trans_a, trans_b):
    m, k, n = 3, 5, 7
    a_shape = [k, m] if trans_a else [m, k]
    b = _w(n, k) if trans_b else _w(k, n)
    node = helper.make_node("Gemm", ["x", "b", "c"], ["y"], transA=trans_a, transB=trans_b)
    c = _single(node, a_shape, [m, n], [init("b", b), init("c", _w(n))])
    assert c.macs == m * k * n == 105
    assert c.params == k * n + n


def test_gemm_symbolic_batch():
    node = helper.make_node("Gemm", ["x", "b"], ["y"], transB=1)
    c = _single(node, ["N", 64], ["N", 10], [init("b", _w(10, 64))], batch=4)
    assert c.macs == 4 * 64 * 10


def test_matmul_constant_weight_batched():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    c = _single(node, ["N", 6, 5], ["N", 6, 4], [init("w", _w(5, 4))], batch=2)
    assert c.macs == 2 * 6 * 5 * 4
    assert c.params == 20


def test_matmul_two_activations_batched():
    # Attention-like: scores = Q @ K^T with both operands computed from the input.
    nodes = [helper.make_node("Transpose", ["x"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "kt"], ["y"])]
    m = make_model(nodes, [vi("x", ["B", 6, 8])], [vi("y", ["B", 6, 6])])
    c = analyze_costs(m, batch=3)
    assert c.macs == 3 * 6 * 6 * 8
    assert c.params == 0


def test_matmul_broadcast_and_vectors():
    x2 = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                    [vi("a", [6, 5]), vi("b", [2, 3, 5, 4])], [vi("y", [2, 3, 6, 4])])
    assert analyze_costs(x2).macs == 2 * 3 * 6 * 4 * 5
    vec = make_model([helper.make_node("MatMul", ["a", "w"], ["y"])], [vi("a", [5])], [vi("y", [4])],
                     [init("w", _w(5, 4))])
    assert analyze_costs(vec).macs == 20
    mat_vec = make_model([helper.make_node("MatMul", ["a", "w"], ["y"])], [vi("a", [3, 5])],
                         [vi("y", [3])], [init("w", _w(5))])
    assert analyze_costs(mat_vec).macs == 15


def test_whole_model_totals_and_histogram():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    m = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])],
                   [init("w1", _w(16, 3, 3, 3)), init("w2", _w(10, 16)), init("b2", _w(10))])
    c = analyze_costs(m, {"x": (2, 3, 8, 8)})
    assert c.macs == 2 * (16 * 64 * 27 + 16 * 10)
    assert c.params == 16 * 27 + 160 + 10
    assert c.nodes == 5
    assert c.op_histogram == {"Conv": 1, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 1}
    assert c.unknown_mac_layers == []
    assert c.input_shapes == {"x": (2, 3, 8, 8)}


def test_demo_model_macs_from_its_architecture(demo_model):
    # (Cout, Hout*Wout, Cin*k*k) per conv of models/make_demo.py, input 1x8x8.
    convs = [(16, 64, 1 * 9),                                    # stem
             (16, 64, 16 * 9), (16, 64, 16 * 9),                 # block1
             (32, 16, 16 * 9), (32, 16, 32 * 9), (32, 16, 16),   # block2 (stride 2) + projection
             (32, 16, 32 * 9), (16, 16, 32),                     # concat branches 3x3 and 1x1
             (64, 16, 48 * 9), (64, 16, 64 * 9), (64, 16, 48)]   # block3 + projection
    want = sum(a * b * c for a, b, c in convs) + 64 * 10          # + Gemm
    assert analyze_costs(demo_model).macs == want
    assert analyze_costs(demo_model, batch=5).macs == 5 * want


# --- property: agree with torch's FLOP counter, an independent implementation ---------------

torch = pytest.importorskip("torch")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _torch_macs(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


@st.composite
def _conv_cases(draw):
    group = draw(st.sampled_from([1, 2, 3]))
    cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    k, stride, dil, pad = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                           draw(st.integers(0, 2)))
    h, w = draw(st.integers(dil * (k - 1) + 1, 9)), draw(st.integers(dil * (k - 1) + 1, 9))
    return draw(st.integers(1, 2)), cin, cout, group, k, stride, dil, pad, h, w


@settings(max_examples=25, deadline=None)
@given(_conv_cases(), st.booleans())
def test_conv_and_conv_transpose_match_torch(case, transpose):
    n, cin, cout, group, k, stride, dil, pad, h, w = case
    x = torch.zeros(n, cin, h, w)
    if transpose:
        assume((min(h, w) - 1) * stride - 2 * pad + dil * (k - 1) + 1 >= 1)
        wt = torch.zeros(cin, cout // group, k, k)
        want = _torch_macs(lambda: torch.nn.functional.conv_transpose2d(
            x, wt, stride=stride, padding=pad, dilation=dil, groups=group))
    else:
        wt = torch.zeros(cout, cin // group, k, k)
        want = _torch_macs(lambda: torch.nn.functional.conv2d(
            x, wt, stride=stride, padding=pad, dilation=dil, groups=group))
    node = helper.make_node("ConvTranspose" if transpose else "Conv", ["x", "w"], ["y"], group=group,
                            strides=[stride] * 2, pads=[pad] * 4, dilations=[dil] * 2)
    m = make_model([node], [vi("x", [n, cin, h, w])], [vi("y", ["a", "b", "c", "d"])],
                   [init("w", wt.numpy())])
    assert analyze_costs(m).macs == want


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=2), st.integers(1, 5), st.integers(1, 5),
       st.integers(1, 5), st.booleans())
def test_matmul_matches_torch(batch, m_, k, n, const_b):
    a, b = torch.zeros(*batch, m_, k), torch.zeros(k, n) if const_b else torch.zeros(*batch, k, n)
    want = _torch_macs(lambda: torch.matmul(a, b))
    inputs = [vi("a", list(a.shape))] + ([] if const_b else [vi("b", list(b.shape))])
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])], inputs,
                       [vi("y", ["d%d" % i for i in range(a.dim())])],
                       [init("b", b.numpy())] if const_b else [])
    assert analyze_costs(model).macs == want
