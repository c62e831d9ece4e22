"""Symbolic dims other than the batch: prunec sizes them itself (and says so), keeps them
symbolic in what it writes, verifies at two sizes, and lets --input-shape set them by name."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunec.errors import InputShapeError
from prunec.runtime.inputs import REPRESENTATIVE_DIM, chosen_sizes, resolve_input_shapes


def _decoder_like() -> onnx.ModelProto:
    """ids [batch, seq], a KV cache `past_key` [batch, 2, past, 4] and a mask over past + seq; y = the
    embedded ids through a MatMul (a symbolic seq flows to the output)."""
    ins = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
           helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", 2, "past", 4]),
           helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "past + seq"])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 6])
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    m = helper.make_model(helper.make_graph(nodes, "g", ins, [out], [table, w]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_symbolic_dims_get_representative_sizes_and_expressions_agree():
    m = _decoder_like()
    n = REPRESENTATIVE_DIM
    assert resolve_input_shapes(m) == {"ids": (1, n), "past_key": (1, 2, n, 4), "mask": (1, 2 * n)}
    # Verification's second set: batch 2 and half the sizes, still consistent.
    assert resolve_input_shapes(m, batch=2, alternate=True) == \
        {"ids": (2, n // 2), "past_key": (2, 2, n // 2, 4), "mask": (2, n)}
    assert chosen_sizes(m) == {"seq": n, "past": n, "past + seq": 2 * n}


def test_input_shape_sets_a_symbolic_dim_by_name_in_every_input():
    m = _decoder_like()
    shapes = resolve_input_shapes(m, {"seq": (7,), "past": (3,)})
    assert shapes == {"ids": (1, 7), "past_key": (1, 2, 3, 4), "mask": (1, 10)}
    assert chosen_sizes(m, {"seq": (7,)}) == {"past": REPRESENTATIVE_DIM, "past + seq": REPRESENTATIVE_DIM + 7}
    # A name that is an input is the input's shape, not a dim.
    assert resolve_input_shapes(m, {"past_key": (2, 2, 5, 4)})["past_key"] == (2, 2, 5, 4)
    with pytest.raises(InputShapeError, match=r"symbolic dims .*seq"):
        resolve_input_shapes(m, {"sequence": (7,)})


def test_inspect_and_run_need_no_input_shape_and_say_which_sizes(prunec_cli, tmp_path):
    m = _decoder_like()
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    res = prunec_cli("inspect", path)
    assert res.exit_code == 0, res.output
    assert f"symbolic dims sized by prunec: seq={REPRESENTATIVE_DIM}" in " ".join(res.stdout.split())
    out = tmp_path / "out.onnx"
    res = prunec_cli("run", path, "--passes", "cleanup", "-o", out, "--no-profile")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert f"verification also at batch 2, seq={REPRESENTATIVE_DIM // 2}" in text
    written = onnx.load(str(out))
    assert [d.dim_param for d in written.graph.output[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
