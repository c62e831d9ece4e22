"""Verification after each pass: exact passes must match, lossy ones must keep the interface and
stay finite, and a failure names the pass, aborts the run and writes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import prunec.passes.base as base
from models import conv_relu_model, files_in
from prunec.errors import VerificationError
from prunec.graph.verify import Verifier, check_interface, deviation
from prunec.passes import PassManager, PassResult, get_pass


class Perturb(base.Pass):
    """Scales the first Conv weight by `factor` (a stand-in for a lossy rewrite)."""

    name = "perturb"
    summary = "test pass"
    exact = True

    @dataclass
    class Options:
        factor: float = base.option(1.01, "weight scale")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        conv = next(n for n in graph.nodes if n.op == "Conv")
        w = conv.inputs[1]
        conv.inputs[1] = gs.Constant(w.name + "_p", (w.values * self.options.factor).astype(np.float32))
        return PassResult(changed=True)


class LossyPerturb(Perturb):
    name = "lossy-perturb"
    exact = False


class FixBatch(base.Pass):
    """Makes the symbolic batch dimension of every input fixed."""

    name = "fix-batch"
    summary = "test pass"

    def run(self, graph, ctx) -> PassResult:
        for t in graph.inputs:
            t.shape = [1] + list(t.shape[1:])
        return PassResult(changed=True)


class RenameOutput(base.Pass):
    name = "rename-output"
    summary = "test pass"
    exact = False

    def run(self, graph, ctx) -> PassResult:
        graph.outputs[0].name = "renamed"
        return PassResult(changed=True)


class ChangeOutputDtype(base.Pass):
    name = "to-double"
    summary = "test pass"
    exact = False

    def run(self, graph, ctx) -> PassResult:
        y = graph.outputs[0]
        old = gs.Variable(y.name + "_f", dtype=np.float32)
        y.inputs[0].outputs[0] = old
        graph.nodes.append(gs.Node("Cast", inputs=[old], outputs=[y], attrs={"to": onnx.TensorProto.DOUBLE}))
        y.dtype = np.float64
        return PassResult(changed=True)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_relu_model()


def test_deviation_by_hand():
    d = deviation(np.array([3.0, -4.0]), np.array([3.0, -4.5]))
    assert d.max_abs == pytest.approx(0.5)
    assert d.rel == pytest.approx(0.5 / 4.0)
    assert d.cosine == pytest.approx((9 + 18) / (5 * math.sqrt(9 + 20.25)))
    same = deviation(np.zeros(3), np.zeros(3))
    assert (same.max_abs, same.rel, same.cosine) == (0.0, 0.0, 1.0)


def test_exact_pass_mismatch_names_the_pass(model):
    with pytest.raises(VerificationError) as e:
        PassManager([Perturb()]).run(model)
    msg = str(e.value)
    assert msg.startswith("pass 'perturb' produced a model that fails verification: output 'y' differs")
    assert "\n" not in msg


def test_exact_pass_within_tolerance(model):
    # 1e-6 relative change: within the default 1e-4 tolerance.
    new, report = PassManager([Perturb(Perturb.Options(factor=1 + 1e-6))]).run(model)
    assert report.passes[0].verification.max_rel < 1e-4


def test_tolerance_is_configurable(model):
    p = Perturb(Perturb.Options(factor=1.001))
    PassManager([p], rtol=1e-2).run(model)
    with pytest.raises(VerificationError):
        PassManager([p], rtol=1e-5).run(model)


def test_lossy_pass_deviation_is_measured_not_failed(model):
    new, report = PassManager([LossyPerturb(LossyPerturb.Options(factor=1.5))]).run(model)
    v = report.passes[0].verification
    assert not v.exact and v.max_rel > 0.1
    assert report.final_deviation["y"]["rel"] == pytest.approx(v.max_rel)


def test_lossy_pass_non_finite_fails(model):
    with pytest.raises(VerificationError, match="lossy-perturb.*non-finite"):
        PassManager([LossyPerturb(LossyPerturb.Options(factor=float("inf")))]).run(model)


def test_symbolic_dim_becoming_fixed_fails(model):
    with pytest.raises(VerificationError) as e:
        PassManager([FixBatch()]).run(model)
    assert "fix-batch" in str(e.value) and "graph input 'x' changed shape" in str(e.value)


def test_renamed_output_fails(model):
    with pytest.raises(VerificationError, match=r"rename-output.*graph outputs changed: \['y'\] -> \['renamed'\]"):
        PassManager([RenameOutput()]).run(model)


def test_output_dtype_change_fails(model):
    with pytest.raises(VerificationError, match="to-double.*changed dtype FLOAT -> DOUBLE"):
        PassManager([ChangeOutputDtype()]).run(model)


def test_check_interface_accepts_same_model(model):
    check_interface(model, model)


def test_verifier_reference_advances_only_when_asked(model):
    v = Verifier(model)
    first = v.reference_outputs["y"].copy()
    doubled = onnx.ModelProto()
    doubled.CopyFrom(model)
    w = doubled.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 2, w.name))
    v.verify(doubled, exact=False, advance=False)
    np.testing.assert_array_equal(v.reference_outputs["y"], first)
    with pytest.raises(VerificationError):
        v.verify(doubled, exact=True, advance=False)
    v.verify(doubled, exact=False)
    assert not np.array_equal(v.reference_outputs["y"], first)
    v.verify(doubled, exact=True)  # now the reference


def test_cli_failed_verification_writes_nothing(prunec_cli, tmp_path, model, monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "perturb", Perturb)
    assert get_pass("perturb") is Perturb
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    res = prunec_cli("run", p, "--passes", "cleanup,perturb", "-o", tmp_path / "o.onnx",
                     "--report", tmp_path / "r.json")
    assert res.exit_code == 4
    line = prunec_cli.one_line_error(res)
    assert "pass 'perturb' produced a model that fails verification" in line
    assert files_in(tmp_path) == {"m.onnx"}
    # A change within tolerance goes through.
    res = prunec_cli("run", p, "--passes", "perturb", "-O", "perturb.factor=1.00001", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 0, res.output
