"""Measure a sparse model against its dense reference: sparsity, bytes, latency, output error.

Latency is measured end to end on one provider and thread count, dense and sparse sessions
called in turn (interleaved) on the same random inputs, so machine noise hits both alike.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from prunec.graph.sparse import from_sparse_proto
from prunec.graph.verify import deviation
from prunec.report.sparse import SparseLayer, SparseProfile
from prunec.runtime import sparse_ops
from prunec.runtime.inputs import random_inputs, resolve_input_shapes
from prunec.runtime.session import make_session, resolve_provider
from prunec.runtime.timing import interleaved_ms

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _layers(model: onnx.ModelProto, timings: dict[str, dict]) -> list[SparseLayer]:
    dense = {t.name: t for t in model.graph.initializer}
    sparse = {s.values.name: s for s in model.graph.sparse_initializer}
    by_node = {t["node"]: t for t in timings.values() if t.get("node")}
    out = []
    for n in model.graph.node:
        if n.op_type in _WEIGHT_OPS and len(n.input) > 1 and (n.input[1] in dense or n.input[1] in sparse):
            w = n.input[1]
            if w in sparse:
                arr, stored, storage = from_sparse_proto(sparse[w]), sparse[w].ByteSize(), "sparse initializer"
            else:
                arr = numpy_helper.to_array(dense[w])
                stored, storage = dense[w].ByteSize(), "dense initializer"
            out.append(SparseLayer(n.name, n.op_type, w, tuple(arr.shape), float(np.mean(arr == 0)),
                                   arr.nbytes, stored, storage, "dense"))
        elif n.domain == sparse_ops.DOMAIN and n.op_type == sparse_ops.OP_TYPE:
            t = by_node.get(n.name, {})
            data = numpy_helper.to_array(dense[n.input[1]])
            k, cols = t.get("k", 0), t.get("n", 0)
            size = k * cols
            stored = sum(dense[x].ByteSize() for x in n.input[1:4])
            out.append(SparseLayer(t.get("layer", n.name), n.op_type, n.input[1], (k, cols),
                                   1 - data.size / size if size else float("nan"), size * 4, stored,
                                   "csr custom op", "sparse", t.get("dense_ms"), t.get("sparse_ms")))
    for layer in out:
        t = timings.get(layer.name)
        if t and layer.dense_ms is None:
            layer.dense_ms, layer.sparse_ms = t.get("dense_ms"), t.get("sparse_ms")
    return out


def profile_sparse(reference: onnx.ModelProto, model: onnx.ModelProto, *, provider: str = "cpu",
                   threads: int | None = None, input_shapes: dict | None = None, runs: int = 10,
                   seed: int = 0, layer_timings: list[dict] | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> SparseProfile:
    """Profile `model` (sparse) against `reference` (dense); runs=0 skips the latency measurement."""
    timings = {t["layer"]: t for t in layer_timings or []}
    layers = _layers(model, timings)
    counted = [layer for layer in layers if np.isfinite(layer.sparsity)]
    total = sum(int(np.prod(layer.shape)) for layer in counted)
    zeros = sum(layer.sparsity * int(np.prod(layer.shape)) for layer in counted)
    shapes = resolve_input_shapes(reference, input_shapes)
    prof = SparseProfile(layers=layers, sparsity=zeros / total if total else 0.0,
                         file_bytes_dense=reference.ByteSize(), file_bytes_sparse=model.ByteSize(),
                         provider=resolve_provider(provider), threads=threads, input_shapes=shapes,
                         runs=runs)
    feeds = random_inputs(reference, shapes, seed=seed, feeds=feeds)
    # No spin-waiting: interleaved sessions would otherwise steal each other's cores.
    sd = make_session(reference, provider=provider, threads=threads, spin=False)
    ss = make_session(model, provider=provider, threads=threads, spin=False)
    ref_out, got_out = sd.run(None, feeds), ss.run(None, feeds)
    prof.max_rel_deviation = max((deviation(r, g).rel for r, g in zip(ref_out, got_out)), default=0.0)
    if runs > 0:
        ms = interleaved_ms({"dense": lambda: sd.run(None, feeds),
                             "sparse": lambda: ss.run(None, feeds)}, runs=runs)
        prof.latency_dense_ms, prof.latency_sparse_ms = ms["dense"], ms["sparse"]
    return prof


def adopt_latency(prof: SparseProfile, compare: dict) -> SparseProfile:
    """Take the latency of the first batch size from a `prunec profile` comparison (its JSON dict)."""
    before, after = compare["before"], compare["after"]
    b, a = before["latency"][0], after["latency"][0]
    prof.latency_dense_ms, prof.latency_sparse_ms = b["p50_ms"], a["p50_ms"]
    prof.provider, prof.threads, prof.runs = before["provider"], before.get("threads"), b["runs"]
    shapes = before.get("settings", {}).get("input_shapes", {}).get(str(b["batch"]))
    if shapes:
        prof.input_shapes = {k: tuple(v) for k, v in shapes.items()}
    return prof
