"""`channels.protect-early`: groups produced within the first share of the model's MACs stay whole."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunec.errors import OptionError
from prunec.graph.ir import from_onnx
from prunec.passes import PassContext, PassManager, build_passes

# conv1 3->8 (3x3), conv2 8->8 (3x3), conv3 8->4 (1x1) on 8x8 maps, MACs by hand:
MACS = [8 * 64 * 3 * 9, 8 * 64 * 8 * 9, 4 * 64 * 8]
SHARE = np.cumsum(MACS) / sum(MACS)  # 0.262, 0.961, 1.0


def chain() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def frozen(fraction: float) -> dict[str, str | None]:
    p = build_passes(["channels"], {"channels": {"protect_early": str(fraction), "round": "1"}})[0]
    groups = p.analyze(from_onnx(chain()), PassContext()).groups
    return {g.id: g.frozen for g in groups if g.id != "conv3"}  # conv3 writes the output: frozen anyway


def test_groups_within_the_share_are_frozen_with_the_reason():
    assert frozen(0.0) == {"conv1": None, "conv2": None}
    below = frozen(SHARE[0] - 0.01)
    assert below["conv1"] is None and below["conv2"] is None
    first = frozen(SHARE[0] + 0.01)
    assert "early" in first["conv1"] and f"{SHARE[0]:.1%}" in first["conv1"] and first["conv2"] is None
    both = frozen(SHARE[1] + 0.01)
    assert both["conv1"] and both["conv2"]


def test_the_pass_keeps_protected_channels_and_prunes_the_rest():
    opts = {"channels": {"ratio": "0.5", "round": "1", "protect_early": "0.3"}}
    out, _ = PassManager(build_passes(["channels"], opts), ctx=PassContext()).run(chain())
    w = {i.name: numpy_helper.to_array(i).shape for i in out.graph.initializer}
    shapes = sorted(w.values())
    assert (8, 3, 3, 3) in shapes  # conv1 whole
    assert (4, 8, 3, 3) in shapes and (4, 4, 1, 1) in shapes  # conv2 halved, conv3 reads 4


def test_bad_share_is_an_option_error():
    with pytest.raises(OptionError, match="protect-early"):
        build_passes(["channels"], {"channels": {"protect_early": "1.5"}})
