"""The zero-channel oracle across exporters: every zoo architecture exported by torch's legacy
exporter (opsets 13 and 18) and its dynamo exporter (opsets 18 and 20), pruned, must match the
narrow export of the same exporter exactly; and hand-built graphs in tf2onnx's and paddle2onnx's
styles prune to the expected weight shapes with unchanged outputs.

The full matrix (17 architectures x 4 exports, about 3 minutes on 2 cores, mostly the dynamo
exporter) runs with PRUNEC_FULL_MATRIX=1; by default a representative subset runs: every
architecture once with the legacy exporter at opset 13, and the dynamo exporter on the models
whose graphs it writes differently (shuffle, channels-last MLP, split/concat head, SE, concat).
"""

from __future__ import annotations

import os

import exporters
import numpy as np
import onnx
import pytest
import zoo
from onnx import numpy_helper
from test_channels_oracle import check_pruned, prune

FULL = os.environ.get("PRUNEC_FULL_MATRIX") == "1"
DYNAMO_SUBSET = {("shufflenet_v2", 18), ("convnext", 18), ("yolo", 20), ("mobilenet_v3", 18),
                 ("inception", 20)}


#: Known gaps, kept visible (strict: the test fails once they are fixed). At opset 13 torch's
#: legacy exporter writes chunk() as Slices whose bounds come from Shape() of the previous
#: shuffle's Reshape, whose target is Concat(Unsqueeze(Gather(Shape(x), 0)), ...): ONNX shape
#: inference gives that Reshape no shape, so the next shuffle's groups freeze (safe, not optimal).
KNOWN_GAPS = {("shufflenet_v2", "legacy", 13): "shuffle Reshape target computed at run time (opset 13)"}


def _cases():
    for name in zoo.ZOO:
        for exporter, opset in exporters.EXPORTS:
            if FULL or (exporter, opset) == ("legacy", 13) or \
                    (exporter == "dynamo" and (name, opset) in DYNAMO_SUBSET):
                gap = KNOWN_GAPS.get((name, exporter, opset))
                marks = [pytest.mark.xfail(reason=gap, strict=True)] if gap else []
                yield pytest.param(name, exporter, opset, id=f"{name}-{exporter}{opset}", marks=marks)


@pytest.fixture(scope="session")
def matrix_export():
    """(wide, narrow) per (architecture, exporter, opset), exported once per session."""
    return exporters.oracle_pair


@pytest.mark.parametrize("name,exporter,opset", list(_cases()))
def test_oracle_across_exporters(name, exporter, opset, matrix_export):
    wide, narrow = matrix_export(name, exporter, opset)
    declared = {i.domain: i.version for i in wide.opset_import}
    assert declared.get("", declared.get("ai.onnx")) == opset
    check_pruned(wide, narrow, prune(wide), zoo.ZOO[name].hw)


@pytest.mark.parametrize("style", ["tf2onnx_style", "paddle2onnx_style"])
def test_converter_styles_prune_to_the_zeroed_channels(style):
    model, expected = getattr(exporters, style)()
    got = prune(model)
    onnx.checker.check_model(got, full_check=True)
    weights = {t.name: numpy_helper.to_array(t).shape for t in got.graph.initializer}
    for name, shape in expected.items():
        assert weights.get(name) == shape, (name, weights.get(name))
    import onnxruntime as ort
    inp = model.graph.input[0]
    shape = [d.dim_value or 3 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {inp.name: x})
    out = ort.InferenceSession(got.SerializeToString()).run(None, {inp.name: x})
    assert zoo.rel_err(ref, out) <= 1e-4
