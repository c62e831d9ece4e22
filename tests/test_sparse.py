"""Tests for the sparse passes (`2to4`, `sparsity`, `csr`), sparse storage and the sparse profile.

The 2:4 checker here is written from the layout definition with explicit loops and shares no
code with the pass; ratios are checked against hand-computed element counts.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.errors import OptionError
from prunec.graph.sparse import densified, from_sparse_proto, to_sparse_proto
from prunec.passes import PassContext, PassManager, build_passes

RNG_SEED = 7


def _init(rng, name, shape):
    # Continuous random values: no magnitude ties, so "the 2 largest" is unambiguous.
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


@pytest.fixture(scope="session")
def mixed_model() -> onnx.ModelProto:
    """x[1,8,8,8] -> Conv(8->16) -> grouped Conv(16->16, g=2) -> slice 12 ch -> Conv(12->12, g=4:
    3 in-channels per group, not 2:4-eligible) -> ConvTranspose(12->8) -> flatten -> Gemm(transB=1)
    -> Gemm(transB=0) -> MatMul -> y[1,12]."""
    rng = np.random.default_rng(RNG_SEED)
    inits = [
        _init(rng, "w_conv", (16, 8, 3, 3)), _init(rng, "b_conv", (16,)),
        _init(rng, "w_gconv", (16, 8, 3, 3)),             # groups=2: 8 input channels per group
        _init(rng, "w_odd", (12, 3, 1, 1)),                # groups=4: 3 input channels per group
        _init(rng, "w_deconv", (12, 8, 2, 2)),            # ConvTranspose [I=12, O/g=8, 2, 2]
        _init(rng, "w_fc1", (32, 8 * 16 * 16)), _init(rng, "b_fc1", (32,)),   # transB=1: [N, K]
        _init(rng, "w_fc2", (32, 24)),                     # transB=0: [K, N]
        _init(rng, "w_mm", (24, 12)),                      # MatMul B [K, N]
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w_gconv"], ["c2"], name="gconv", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Slice", ["c2", "s0", "s1", "s_ax"], ["c2s"], name="slice"),
        helper.make_node("Conv", ["c2s", "w_odd"], ["c3"], name="odd_conv", group=4),
        helper.make_node("ConvTranspose", ["c3", "w_deconv"], ["c4"], name="deconv", strides=[2, 2]),
        helper.make_node("Reshape", ["c4", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w_fc1", "b_fc1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Gemm", ["g1", "w_fc2"], ["g2"], name="fc2"),
        helper.make_node("MatMul", ["g2", "w_mm"], ["y"], name="mm"),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
              numpy_helper.from_array(np.array([12], np.int64), "s1"),
              numpy_helper.from_array(np.array([1], np.int64), "s_ax")]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    d = densified(model)
    return {t.name: numpy_helper.to_array(t) for t in d.graph.initializer}


def _run(names, options, model, **kw):
    passes = build_passes(names, options)
    return PassManager(passes, ctx=PassContext(seed=0), **kw).run(model)


# ---------------------------------------------------------------- independent 2:4 checker

def groups_2to4(w: np.ndarray, op: str, trans_b: int = 0, group: int = 1) -> list[tuple[np.ndarray, tuple]]:
    """Every group of 4 weights that TensorRT-style 2:4 requires, by explicit index loops."""
    out = []
    if op == "Conv":  # [O, C/g, kh, kw]: 4 consecutive input channels per (o, kh, kw)
        o_n, c_n, kh_n, kw_n = w.shape
        for o in range(o_n):
            for i in range(kh_n):
                for j in range(kw_n):
                    for c in range(0, c_n, 4):
                        out.append((w[o, c:c + 4, i, j], (o, c, i, j)))
    elif op == "ConvTranspose":  # [I, O/g, kh, kw]: 4 consecutive input channels per (o, kh, kw)
        i_n, o_n, kh_n, kw_n = w.shape
        for o in range(o_n):
            for i in range(kh_n):
                for j in range(kw_n):
                    for c in range(0, i_n, 4):
                        assert (c // (i_n // group)) == ((c + 3) // (i_n // group)), "group crossed"
                        out.append((w[c:c + 4, o, i, j], (c, o, i, j)))
    elif op == "Gemm" and trans_b:  # B [N, K]
        n_n, k_n = w.shape
        for n in range(n_n):
            for k in range(0, k_n, 4):
                out.append((w[n, k:k + 4], (n, k)))
    else:  # Gemm transB=0 or MatMul: B [K, N], groups along K per column
        k_n, n_n = w.shape
        for n in range(n_n):
            for k in range(0, k_n, 4):
                out.append((w[k:k + 4, n], (k, n)))
    return out


def check_2to4(before: np.ndarray, after: np.ndarray, op: str, **kw) -> None:
    """Assert every group has <= 2 nonzeros and keeps exactly the 2 largest magnitudes."""
    for (g_before, where), (g_after, _) in zip(groups_2to4(before, op, **kw), groups_2to4(after, op, **kw)):
        assert g_before.size == 4, f"group at {where} has {g_before.size} elements"
        assert np.count_nonzero(g_after) <= 2, f"{op} group at {where} has {np.count_nonzero(g_after)} nonzeros"
        top2 = sorted(np.abs(g_before))[-2:]
        assert sorted(np.abs(g_after[g_after != 0])) == pytest.approx(top2), f"{op} group at {where}"
        kept = g_after != 0
        assert np.array_equal(g_after[kept], g_before[kept]), "kept weights must be unchanged"


@pytest.fixture(scope="session")
def two_four_run(mixed_model):
    return _run(["2to4"], {}, mixed_model)


ELIGIBLE = {"w_conv": ("Conv", {}), "w_gconv": ("Conv", {}), "w_deconv": ("ConvTranspose", {"group": 1}),
            "w_fc1": ("Gemm", {"trans_b": 1}), "w_fc2": ("Gemm", {"trans_b": 0}), "w_mm": ("MatMul", {})}


def test_2to4_every_eligible_weight_satisfies_the_pattern(mixed_model, two_four_run):
    model, report = two_four_run
    before, after = _weights(mixed_model), _weights(model)
    for name, (op, kw) in ELIGIBLE.items():
        check_2to4(before[name], after[name], op, **kw)
        assert np.mean(after[name] == 0) == pytest.approx(0.5), name
    # The verification was lossy and measured.
    rec = report.passes[0]
    assert not rec.exact and rec.verification is not None and rec.verification.max_rel > 0


def test_2to4_checker_catches_flattened_kernel_grouping():
    """The checker is not vacuous: onnxsim-style grouping over the flattened kernel fails it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    flat = w.reshape(4, -1).copy()  # groups of 4 along [C*kh*kw], mixing kernel positions
    for o in range(4):
        for s in range(0, flat.shape[1] - 3, 4):
            g = flat[o, s:s + 4]
            g[np.argsort(np.abs(g))[:2]] = 0
    with pytest.raises(AssertionError):
        check_2to4(w, flat.reshape(w.shape), "Conv")


def test_2to4_skips_and_reports_non_multiple_of_4(mixed_model, two_four_run):
    model, report = two_four_run
    skipped = {s.what: s.why for s in report.passes[0].result.skipped}
    assert "odd_conv" in skipped and "multiple of 4" in skipped["odd_conv"]
    assert np.array_equal(_weights(model)["w_odd"], _weights(mixed_model)["w_odd"])


def test_2to4_selection_options(mixed_model):
    model, report = _run(["2to4"], {"2to4": {"include": "fc|mm", "exclude": "fc2", "min-size": 300}},
                         mixed_model)
    after, before = _weights(model), _weights(mixed_model)
    assert np.mean(after["w_fc1"] == 0) == pytest.approx(0.5)
    for untouched in ("w_conv", "w_fc2", "w_mm"):  # w_mm has 288 < 300 elements
        assert np.array_equal(after[untouched], before[untouched]), untouched
    assert any(s.what == "mm" and "min-size" in s.why for s in report.passes[0].result.skipped)
    model, report = _run(["2to4"], {"2to4": {"skip-first-last": "true"}}, mixed_model)
    after = _weights(model)
    assert np.array_equal(after["w_conv"], before["w_conv"]) and np.array_equal(after["w_mm"], before["w_mm"])
    assert np.mean(after["w_gconv"] == 0) == pytest.approx(0.5)


def test_2to4_grouped_conv_transpose_respects_groups():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)  # I=8, groups=2 -> 4 per group
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="dc", group=2)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [numpy_helper.from_array(w, "w")])
    model, report = _run(["2to4"], {}, helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    check_2to4(w, _weights(model)["w"], "ConvTranspose", group=2)


# ---------------------------------------------------------------- sparsity

def _zeros(a: np.ndarray) -> int:
    return int(np.count_nonzero(a == 0))


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_sparsity_per_layer_ratio(mixed_model, ratio):
    model, report = _run(["sparsity"], {"sparsity": {"ratio": ratio}}, mixed_model)
    before, after = _weights(mixed_model), _weights(model)
    for name in ("w_conv", "w_gconv", "w_odd", "w_deconv", "w_fc1", "w_fc2", "w_mm"):
        assert _zeros(after[name]) == round(ratio * after[name].size), name
        kept, gone = np.abs(after[name][after[name] != 0]), np.abs(before[name][after[name] == 0])
        assert kept.min() >= gone.max(), f"{name}: a pruned weight is larger than a kept one"
    assert report.passes[0].result.details["sparsity"] == pytest.approx(ratio, abs=1e-3)


def test_sparsity_global_ratio_and_threshold(mixed_model):
    model, report = _run(["sparsity"], {"sparsity": {"ratio": 0.6, "global": "true"}}, mixed_model)
    before, after = _weights(mixed_model), _weights(model)
    names = ("w_conv", "w_gconv", "w_odd", "w_deconv", "w_fc1", "w_fc2", "w_mm")
    total = sum(after[n].size for n in names)
    assert sum(_zeros(after[n]) for n in names) == round(0.6 * total)
    kept = np.concatenate([np.abs(after[n][after[n] != 0]) for n in names])
    gone = np.concatenate([np.abs(before[n][after[n] == 0]) for n in names])
    assert kept.min() >= gone.max()  # one threshold for all layers
    per_layer = {n: np.mean(after[n] == 0) for n in names}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01  # not the same ratio everywhere


def test_sparsity_plan_file(mixed_model, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"fc1": 0.9, "w_mm": 0.25}))
    model, _ = _run(["sparsity"], {"sparsity": {"ratio": 0.5, "plan": str(plan)}}, mixed_model)
    after = _weights(model)
    assert _zeros(after["w_fc1"]) == round(0.9 * after["w_fc1"].size)
    assert _zeros(after["w_mm"]) == round(0.25 * after["w_mm"].size)
    assert _zeros(after["w_conv"]) == round(0.5 * after["w_conv"].size)
    plan.write_text(json.dumps({"nope": 0.5}))
    with pytest.raises(OptionError, match="nope"):
        _run(["sparsity"], {"sparsity": {"plan": str(plan)}}, mixed_model)


def test_sparsity_bad_ratio_is_an_option_error():
    with pytest.raises(OptionError, match="ratio"):
        build_passes(["sparsity"], {"sparsity": {"ratio": "1.5"}})


# ---------------------------------------------------------------- csr storage

def test_sparse_proto_round_trip_and_coordinate_indices():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    a[rng.random(a.shape) < 0.7] = 0
    sp = to_sparse_proto("a", a)
    onnx.checker.check_sparse_tensor(sp)
    assert np.array_equal(from_sparse_proto(sp), a) and from_sparse_proto(sp).dtype == np.float32
    # A coordinate-format tensor written by someone else decodes too (hand-made, [NNZ, rank]).
    vals = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "c")
    idx = numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), "c_idx")
    dense = from_sparse_proto(helper.make_sparse_tensor(vals, idx, [3, 2]))
    assert np.array_equal(dense, np.array([[0, 1.5], [0, 0], [-2.0, 0]], np.float32))


@pytest.fixture(scope="session")
def csr_run(mixed_model):
    pruned, _ = _run(["sparsity"], {"sparsity": {"ratio": 0.9, "exclude": "fc2"}}, mixed_model)
    out, report = _run(["csr"], {"csr": {"threshold": 0.8}}, pruned)
    return pruned, out, report


def test_csr_storage_round_trip(csr_run, tmp_path):
    pruned, out, report = csr_run
    sparse_names = {s.values.name for s in out.graph.sparse_initializer}
    assert sparse_names == {"w_conv", "w_gconv", "w_odd", "w_deconv", "w_fc1", "w_mm"}
    assert "w_fc2" in {t.name for t in out.graph.initializer}  # 0% sparse: below threshold
    assert any(s.what == "fc2" and "threshold" in s.why for s in report.passes[0].result.skipped)
    assert report.passes[0].exact and report.passes[0].verification.max_rel == 0.0
    dense_path, sparse_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    onnx.save(pruned, dense_path)
    onnx.save(out, sparse_path)
    assert sparse_path.stat().st_size < 0.5 * dense_path.stat().st_size
    # A stock ONNX Runtime session (no prunec code) loads it and computes the same outputs.
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    y_dense = ort.InferenceSession(str(dense_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_sparse = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(y_dense, y_sparse)
    assert np.array_equal(_weights(out)["w_fc1"], _weights(pruned)["w_fc1"])


def test_csr_90_percent_file_ratio_target():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
                          [numpy_helper.from_array(w, "w")])
    dense = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = _run(["sparsity", "csr"], {"sparsity": {"ratio": 0.9}}, dense)
    assert out.ByteSize() <= 0.3 * dense.ByteSize()


def test_csr_scipy_kernel_is_chosen_by_measurement():
    pytest.importorskip("onnxruntime_extensions")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 1024)).astype(np.float32)  # Gemm transB=1: N=64, K=1024
    b = rng.standard_normal(64).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, beta=0.5)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    pruned, _ = _run(["sparsity"], {"sparsity": {"ratio": 0.95}}, model)
    out, report = _run(["csr"], {"csr": {"kernel": "scipy", "runs": 3}}, pruned)
    rec = report.passes[0]
    (t,) = rec.result.details["timings"]
    assert (t["chosen"] == "sparse") == (t["sparse_ms"] < 0.9 * t["dense_ms"])  # default margin 0.1
    custom = [n for n in out.graph.node if n.domain == "ai.onnx.contrib"]
    assert bool(custom) == (t["chosen"] == "sparse")
    assert rec.verification.max_rel <= 1e-4  # the manager verified it as exact either way
    # Whatever was chosen, the output is X @ W^T + 0.5 * b (numpy oracle on the pruned weight).
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    wp = _weights(pruned)["w"]
    from prunec.runtime.session import make_session
    got = make_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ wp.T + 0.5 * b, rtol=1e-4, atol=1e-4)
    # The op on a batch of rows with leading dims, against numpy.
    from prunec.runtime.sparse_ops import csr_matmul
    import scipy.sparse as sps
    m = sps.csr_matrix(wp)
    x3 = rng.standard_normal((2, 3, 1024)).astype(np.float32)
    y3 = csr_matmul(x3, m.data.astype(np.float32), m.indices.astype(np.int32), m.indptr.astype(np.int32))
    np.testing.assert_allclose(y3, x3 @ wp.T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CLI

def test_cli_sparsity_csr(mixed_model, tmp_path):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(mixed_model, src)
    res = CliRunner().invoke(cli, ["run", str(src), "--passes", "sparsity,csr", "-O", "sparsity.ratio=0.9",
                                   "-o", str(out), "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert "sparse weights" in res.output and "model file" in res.output
    m = onnx.load(out)
    assert len(m.graph.sparse_initializer) == 7
    prof = json.loads(rep.read_text())["sparse_profile"]
    assert prof["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert prof["file_bytes_sparse"] < prof["file_bytes_dense"]
    assert "no faster than dense" in prof["verdict"]  # storage only: dense kernels run


def test_cli_bad_option_fails_cleanly(mixed_model, tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(mixed_model, src)
    for bad in (["-O", "sparsity.ratio=1.5"], ["-O", "csr.kernel=cuda"], ["-O", "sparsity.include=("]):
        res = CliRunner().invoke(cli, ["run", str(src), "--passes", "sparsity,csr", *bad, "-o", str(out)])
        assert res.exit_code == 2, (bad, res.output)
        assert res.output.count("\n") == 1 and res.output.startswith("prunec: error:"), res.output
        assert not out.exists()


def test_session_from_a_file_registers_the_sparse_op(tmp_path):
    """A saved csr.kernel=scipy model opens through make_session from its path (as the profiler does)."""
    pytest.importorskip("onnxruntime_extensions")
    from prunec.passes.csr import _key, _single_layer_model
    from prunec.runtime.session import make_session
    import scipy.sparse as sps

    rng = np.random.default_rng(6)
    w = rng.standard_normal((16, 8)).astype(np.float32) * (rng.random((16, 8)) < 0.2)  # W [K=16, N=8]
    m = sps.csr_matrix(w.T)
    arrays = (m.data.astype(np.float32), m.indices.astype(np.int32), m.indptr.astype(np.int32))
    path = tmp_path / "op.onnx"
    onnx.save(_single_layer_model(None, arrays + (_key(arrays),), 2), path)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(make_session(str(path)).run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
