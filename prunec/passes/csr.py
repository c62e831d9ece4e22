"""`csr`: store sparse weights sparsely, and run them sparsely only where that is measured faster.

Storage (`kernel=dense`, the default): every selected weight whose fraction of zeros is at
least `threshold` becomes an ONNX `sparse_initializer` (the standard COO form; see
prunec/graph/sparse.py), so the file shrinks. Any stock ONNX Runtime loads it, but it turns
sparse initializers back into dense tensors at load, so *execution is dense and no faster*.
Values are stored exactly, so the pass is exact and the manager checks outputs are unchanged.

Execution (`kernel=scipy`, opt-in): Gemm/MatMul layers with a 2-D weight are timed in isolation,
dense against prunec's scipy CSR custom op (prunec/runtime/sparse_ops.py, needs
onnxruntime-extensions), at the layer's real input shape, interleaved in one process on the
same threads. A layer is rewritten to the custom op only if it was faster by `margin`; every other layer
keeps the dense kernel (with sparse storage). The timings are in the pass details.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import OptionError, ProviderError
from prunec.graph.ir import NameGen
from prunec.graph.shapes import infer_shapes, tensor_shapes
from prunec.graph.sparse import PrunecSparseValues, is_sparse_constant, sparsity, to_sparse_proto
from prunec.passes.base import Pass, PassContext, PassResult, Skip, option, register
from prunec.runtime.inputs import resolve_input_shapes
from prunec.passes.weights import SelectionOptions, WeightLayer, select_layers


#: After one probe round, a sparse kernel this many times slower than dense is not timed further.
PROBE_LOSS = 3.0


@dataclass
class LayerTiming:
    """Measured latency of one layer alone, dense kernel vs sparse kernel, and the choice made."""

    layer: str
    m: int
    k: int
    n: int
    dense_ms: float
    sparse_ms: float
    chosen: str
    #: timed runs per kernel (1: the probe round showed the sparse kernel far slower)
    runs: int = 0
    #: name of the custom-op node that replaced the layer, if it did
    node: str = ""


def _to_csr(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (data, indices int32, indptr int32) of W^T [N, K] from W [K, N]."""
    import scipy.sparse as sp

    m = sp.csr_matrix(np.ascontiguousarray(w_kn.T))
    m.sort_indices()
    return m.data.astype(np.float32), m.indices.astype(np.int32), m.indptr.astype(np.int32)


def _matmul_weight(layer: WeightLayer) -> tuple[np.ndarray | None, str | None]:
    """The layer's weight as W [K, N] for Y = X @ W, or (None, why the sparse kernel can't run it)."""
    node, w = layer.node, np.asarray(layer.weight.values)
    if w.dtype != np.float32:
        return None, f"sparse kernel is float32 only (weight is {w.dtype})"
    if w.ndim != 2:
        return None, f"sparse kernel needs a 2-D weight (got rank {w.ndim})"
    if node.op == "MatMul":
        return w, None
    if node.op != "Gemm":
        return None, f"no sparse kernel for {node.op} (Gemm/MatMul only)"
    if node.attrs.get("transA", 0):
        return None, "Gemm with transA=1"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return None, "Gemm bias is not a constant"
    alpha = float(node.attrs.get("alpha", 1.0))
    w = w.T if node.attrs.get("transB", 0) else w
    return (w * np.float32(alpha)).astype(np.float32), None


@register
class Csr(Pass):
    name = "csr"
    summary = ("Store weights at/above a sparsity threshold as ONNX sparse initializers (smaller "
               "file; ONNX Runtime still runs them dense); opt-in measured sparse kernel.")
    exact = True

    @dataclass
    class Options(SelectionOptions):
        threshold: float = option(0.5, "Store a weight sparse when at least this fraction of it is zero.")
        kernel: Literal["dense", "scipy"] = option(
            "dense", "dense: sparse storage only, loads in stock ONNX Runtime. scipy: also time the "
                     "scipy CSR custom op per Gemm/MatMul and use it where measured faster "
                     "(needs onnxruntime-extensions to run the output).")
        runs: int = option(20, "Timed runs per layer and kernel when kernel=scipy.")
        margin: float = option(0.1, "kernel=scipy: use the sparse kernel only if its median time is "
                                    "at least this fraction below dense (guards against noise).")
        threads: int = option(0, "Intra-op threads for the timings (0: ONNX Runtime's default).")

        def validate(self) -> None:
            if not 0 <= self.threshold <= 1:
                raise OptionError(f"csr.threshold must be in [0, 1], got {self.threshold}")
            if not 0 <= self.margin < 1:
                raise OptionError(f"csr.margin must be in [0, 1), got {self.margin}")
            if self.runs < 1:
                raise OptionError(f"csr.runs must be at least 1, got {self.runs}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        layers, skipped = select_layers(graph, o, self.name)
        by_weight: dict[str, list[WeightLayer]] = {}
        for layer in layers:
            by_weight.setdefault(layer.weight.name, []).append(layer)
        stored: dict[str, dict] = {}
        candidates: list[WeightLayer] = []
        for wname, group in by_weight.items():
            w = group[0].weight
            arr = np.asarray(w.values)
            s = sparsity(arr)
            if s < o.threshold:
                skipped.extend(Skip(layer.name, f"sparsity {s:.1%} < threshold {o.threshold:.0%}; "
                                                "kept dense") for layer in group)
                continue
            dense_bytes = arr.nbytes
            if not is_sparse_constant(w):
                w._values = PrunecSparseValues(to_sparse_proto(wname, arr))
            stored[wname] = {"layers": [layer.name for layer in group], "sparsity": s,
                             "shape": list(arr.shape), "dense_bytes": dense_bytes,
                             "sparse_bytes": w._values.tensor.ByteSize()}
            if len(group) == 1:
                candidates.append(group[0])
        timings: list[LayerTiming] = []
        if o.kernel == "scipy":
            timings = self._sparse_kernels(graph, ctx, candidates, skipped)
        dense_total = sum(v["dense_bytes"] for v in stored.values())
        sparse_total = sum(v["sparse_bytes"] for v in stored.values())
        return PassResult(
            changed=bool(stored),
            details={"stored_sparse": len(stored), "weights": stored, "dense_bytes": dense_total,
                     "sparse_bytes": sparse_total, "kernel": o.kernel,
                     "sparse_kernel_layers": [t.layer for t in timings if t.chosen == "sparse"],
                     "timings": [vars(t) for t in timings]},
            skipped=skipped)

    def _sparse_kernels(self, graph: gs.Graph, ctx: PassContext, candidates: list[WeightLayer],
                        skipped: list[Skip]) -> list[LayerTiming]:
        from prunec.runtime import sparse_ops

        if not sparse_ops.available():
            raise ProviderError("csr.kernel=scipy needs onnxruntime-extensions "
                                "(pip install onnxruntime-extensions)")
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        # Time at the shapes the model will run at (a symbolic batch resolves to 1, as in costs).
        inferred = infer_shapes(model, resolve_input_shapes(model, ctx.input_shapes or None))
        shapes = tensor_shapes(inferred)
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in
                list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
        names = NameGen(graph)
        timings = []
        for layer in candidates:
            w_kn, why = _matmul_weight(layer)
            x = layer.node.inputs[0]
            xshape = shapes.get(x.name)
            if w_kn is None:
                skipped.append(Skip(layer.name, why))
                continue
            if (not xshape or any(not isinstance(d, int) for d in xshape)
                    or elem.get(x.name) != onnx.TensorProto.FLOAT):
                skipped.append(Skip(layer.name, "input shape unknown or input not float32; "
                                                "cannot time the sparse kernel"))
                continue
            m = int(np.prod(xshape[:-1]))
            data, indices, indptr = _to_csr(w_kn)
            dense_ms, sparse_ms, runs = self._time(layer.name, w_kn, (data, indices, indptr), m, ctx.seed)
            chosen = "sparse" if sparse_ms < dense_ms * (1 - self.options.margin) else "dense"
            timing = LayerTiming(layer.name, m, *w_kn.shape, dense_ms, sparse_ms, chosen, runs)
            if chosen == "sparse":
                timing.node = self._rewrite(graph, layer, names, data, indices, indptr)
            timings.append(timing)
        return timings

    def _time(self, name: str, w_kn: np.ndarray, csr: tuple, m: int, seed: int) -> tuple[float, float, int]:
        """Median ms of the layer alone, dense and sparse, and how many timed runs that took."""
        from prunec.runtime.session import make_session
        from prunec.runtime.timing import interleaved_ms

        k, n = w_kn.shape
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((m, k)).astype(np.float32)
        # No spin-waiting: the idle pool of one session would steal cores from the other's turn.
        threads = self.options.threads or None
        dense = make_session(_single_layer_model(w_kn, None, m), threads=threads, spin=False)
        sparse = make_session(_single_layer_model(None, csr + (_key(csr),), m), threads=threads, spin=False)
        runners = {"dense": lambda: dense.run(None, {"x": x}), "sparse": lambda: sparse.run(None, {"x": x})}
        # One probe round first: a kernel several times slower than dense cannot win, and timing it
        # `runs` times would only cost time (a wrong "dense" here keeps the safe choice).
        ms = interleaved_ms(runners, runs=1, warmup=1)
        if ms["sparse"] >= PROBE_LOSS * ms["dense"]:
            return ms["dense"], ms["sparse"], 1
        ms = interleaved_ms(runners, runs=self.options.runs)
        return ms["dense"], ms["sparse"], self.options.runs

    @staticmethod
    def _rewrite(graph: gs.Graph, layer: WeightLayer, names: NameGen, data, indices, indptr) -> str:
        """Replace the layer by the custom op (plus an Add for a Gemm bias); return the op's name."""
        from prunec.runtime import sparse_ops

        node = layer.node
        base = node.name or layer.weight.name
        consts = [gs.Constant(names(f"{base}_csr_data"), data),
                  gs.Constant(names(f"{base}_csr_indices"), indices),
                  gs.Constant(names(f"{base}_csr_indptr"), indptr)]
        y = node.outputs[0]
        bias = None
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            c = np.asarray(node.inputs[2].values) if isinstance(node.inputs[2], gs.Constant) else None
            if c is not None:
                bias = gs.Constant(names(f"{base}_csr_bias"),
                                   (c * np.float32(node.attrs.get("beta", 1.0))).astype(np.float32))
        out = y if bias is None else gs.Variable(names(f"{base}_csr_out"), dtype=np.float32)
        new = gs.Node(sparse_ops.OP_TYPE, name=names(f"{base}_csr"), domain=sparse_ops.DOMAIN,
                      attrs={"key": _key((data, indices, indptr))},
                      inputs=[node.inputs[0]] + consts, outputs=[out])
        graph.nodes.append(new)
        if bias is not None:
            graph.nodes.append(gs.Node("Add", name=names(f"{base}_csr_bias_add"),
                                       inputs=[out, bias], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()  # graphsurgeon adds the custom domain to the opset imports on export
        return new.name


def _key(csr: tuple) -> str:
    h = hashlib.sha256()
    for a in csr[:3]:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _single_layer_model(w_kn: np.ndarray | None, csr: tuple | None, m: int | str) -> onnx.ModelProto:
    """Y = X @ W for timing: dense MatMul, or the sparse custom op on (data, indices, indptr, key)."""
    from onnx import TensorProto, helper, numpy_helper

    from prunec.runtime import sparse_ops

    opsets = [helper.make_opsetid("", 17)]
    if w_kn is not None:
        k, n = w_kn.shape
        inits = [numpy_helper.from_array(np.ascontiguousarray(w_kn), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        data, indices, indptr, key = csr
        n = indptr.size - 1
        k = None
        inits = [numpy_helper.from_array(data, "d"), numpy_helper.from_array(indices, "i"),
                 numpy_helper.from_array(indptr, "p")]
        nodes = [helper.make_node(sparse_ops.OP_TYPE, ["x", "d", "i", "p"], ["y"],
                                  domain=sparse_ops.DOMAIN, key=key)]
        opsets.append(helper.make_opsetid(sparse_ops.DOMAIN, 1))
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(g, opset_imports=opsets)
