"""The masked-original proof of channel pruning, and where a failed proof first goes wrong.

Removing channel c deletes it from every tensor that carries it. The only places where c could
still influence a kept value are where channels are *mixed*: the weight columns of the layers
that read c (consumer weight sites: Conv, ConvTranspose, Gemm, MatMul) and the sums over channels
of two activations (attention's Q·Kᵀ and A·V, recorded by the walker as `Contraction`s). So the
original model with c zeroed in every consumer's weight slice and masked (×0) at every
contraction must compute exactly what the pruned model computes, at every kept position.
`masked_reference` builds that model from the same analysis the removal used; the pass manager
requires the pruned model to match it within the exact tolerance. A mismatch is a bug in a rule,
never an accuracy question, and `first_difference` names the first tensor where it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept
from prunec.graph.ir import copy_graph


@dataclass
class Reference:
    """A model a pass's result must equal within the exact tolerance, and how to compare inside.

    `graph` is the reference once `build()` has applied its pending `edits` (deferred, so that a
    run without verification pays only for the cheap graph copy); `kept` maps tensor names to the
    indices (per channel axis) of the reference's values that the result keeps, so inner tensors
    can be compared when the proof fails; `what` names the reference in messages."""

    graph: gs.Graph
    what: str
    kept: Kept = field(default_factory=dict)
    edits: list[Callable[[gs.Graph], None]] = field(default_factory=list)

    def build(self) -> gs.Graph:
        """The reference graph with every pending edit applied."""
        for edit in self.edits:
            edit(self.graph)
        self.edits = []
        return self.graph


def masked_reference(analysis, removed_classes: set[int], kept: Kept | None = None) -> Reference:
    """The analysed graph with every removed class zeroed where it is read.

    Call it after selecting the classes and before `apply_removal`, which edits the analysed
    graph in place: the copy then shares no mutable state with the graph that is pruned next
    (weight arrays are shared until replaced, and nothing edits them in place), and any change
    made to kept weights before this call (bias compensation, refits) is in both models.
    """
    from prunec.graph.channels import kept_indices, removed_atoms

    removed = removed_atoms(analysis, removed_classes)
    graph = copy_graph(analysis.graph)  # new nodes and tensors, same weight arrays
    zero: dict[str, list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
    for s in analysis.sites:
        if s.role != "consumer":
            continue  # producer rows and attached per-channel parameters only reach their channel
        drop = np.nonzero(removed[s.atoms])[0]
        if len(drop):
            zero.setdefault(s.tensor.name, []).append((s.axis, drop, _zero_point(s)))
    position = {id(n): i for i, n in enumerate(analysis.graph.nodes)}
    masks = [(position[id(c.node)], c, ~removed[c.atoms]) for c in analysis.contractions
             if removed[c.atoms].any()]
    edits: list[Callable[[gs.Graph], None]] = [lambda g: _zero_slices(g, zero)]
    if masks:
        edits.append(lambda g: _mask_contractions(g, masks))
    if kept is None:
        kept = kept_indices(analysis, removed_classes)
    return Reference(graph, "masked original", kept, edits)


def _zero_point(site) -> np.ndarray | None:
    """What 'zero' is in a quantized weight: its zero point, the input two slots after it in
    every quantized op (DequantizeLinear x, x_scale, x_zero_point; QLinearConv/QLinearMatMul/
    QGemm w, w_scale, w_zero_point; ConvInteger/MatMulInteger w, ..., w_zero_point). None for
    float weights (and an absent zero point means 0)."""
    if np.dtype(site.tensor.dtype).kind == "f":
        return None
    idx = next((i for i, t in enumerate(site.node.inputs) if t is site.tensor), None)
    zp = site.node.inputs[idx + 2] if idx is not None and len(site.node.inputs) > idx + 2 else None
    if zp is None or not zp.name or not isinstance(zp, gs.Constant):
        return None
    return np.asarray(zp.values)


def _zero_slices(graph: gs.Graph, zero: dict[str, list[tuple[int, np.ndarray, np.ndarray | None]]]) -> None:
    """Set the given index sets along the given axes of the named constants to zero, or to the
    zero point of a quantized weight (broadcast along its per-channel axis), on copies."""
    tensors = graph.tensors()
    for name, cuts in zero.items():
        t = tensors[name]
        v = np.array(np.asarray(t.values), copy=True)
        for axis, drop, zp in cuts:
            index = [slice(None)] * v.ndim
            index[axis] = drop
            v[tuple(index)] = _broadcast_zero(zp, v, axis, len(drop))
        t.values = v


def _broadcast_zero(zp: np.ndarray | None, v: np.ndarray, axis: int, n: int):
    """The zero point shaped for `v[..., drop along axis, ...]`: a scalar, or per channel along
    the first other axis of its length (a weight's output axis)."""
    if zp is None or zp.size == 1:
        return 0 if zp is None else zp.reshape(()).astype(v.dtype)
    per = next(a for a in range(v.ndim) if a != axis and v.shape[a] == zp.size)
    shape = [1] * v.ndim
    shape[per] = zp.size
    target = list(v.shape)
    target[axis] = n
    return np.broadcast_to(zp.astype(v.dtype).reshape(shape), target)


def _mask_contractions(graph: gs.Graph, masks: list) -> None:
    """Multiply each contraction's operand by a 0/1 mask over its channel axes; the operand is
    rewired for that node only (other readers keep the unmasked tensor)."""
    dtypes = _dtypes(graph)
    for k, (pos, c, keep) in enumerate(masks):
        node = graph.nodes[pos]
        x = node.inputs[c.index]
        order = np.argsort(c.axes)
        mask = np.transpose(keep, order) if len(c.axes) > 1 else keep
        view = [1] * c.rank
        for ax, n in zip(sorted(c.axes), mask.shape):
            view[ax] = n
        dtype = dtypes.get(x.name, np.dtype(np.float32))
        const = gs.Constant(f"{x.name}_proof_mask{k}", mask.reshape(view).astype(dtype))
        y = gs.Variable(f"{x.name}_proof_masked{k}", dtype=dtype)
        graph.nodes.append(gs.Node("Mul", f"{node.name}_proof_mask{k}", inputs=[x, const], outputs=[y]))
        node.inputs[c.index] = y


def _dtypes(graph: gs.Graph) -> dict[str, np.dtype]:
    """Element types of every tensor, by ONNX type inference on a weight-free export."""
    from prunec.graph.fold import _export_skeleton
    from prunec.graph.shapes import infer_shapes

    model = infer_shapes(_export_skeleton(graph))
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        et = vi.type.tensor_type.elem_type
        if et:
            out[vi.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et))
    return out


# ----------------------------------------------------------------------------------------------
# Localizing a failed proof


def with_inner_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose graph outputs also list every inner float tensor that type
    inference can type, in graph order; returns the copy and the added names."""
    from prunec.graph.shapes import infer_shapes

    inferred = infer_shapes(model)
    types = {vi.name: vi.type for vi in inferred.graph.value_info}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    added = []
    for node in m.graph.node:
        for name in node.output:
            tp = types.get(name)
            if not name or name in have or tp is None or not tp.HasField("tensor_type"):
                continue
            if tp.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
                continue
            vi = onnx.ValueInfoProto()
            vi.name = name
            vi.type.tensor_type.elem_type = tp.tensor_type.elem_type
            m.graph.output.append(vi)
            have.add(name)
            added.append(name)
    return m, added


def _proto(model) -> onnx.ModelProto:
    """The protobuf of a model, or of a store's model its skeleton (no weight data)."""
    return getattr(model, "skeleton", model)


def _with_inner_outputs(model, name: str):
    """`with_inner_outputs` of a ModelProto, or of a store's model (then written beside it in the
    store, so it opens with the same weights): (what a session opens, added output names)."""
    m, names = with_inner_outputs(_proto(model))
    if m is not _proto(model) and hasattr(model, "store"):
        return model.store.add(m, name).path, names
    return m, names


def first_difference(candidate, reference, kept: Kept,
                     feeds: dict[str, np.ndarray], rtol: float, *, atol: float = 0.0,
                     cos_tol: float = 0.0, provider: str = "cpu") -> str | None:
    """Name the first inner tensor (graph order of `candidate`) whose values differ from the
    reference's at the kept channel positions (judged as the verifier judges outputs), with the
    node that computed it; None if every comparable tensor agrees. Runs both models (ModelProtos
    or a store's models) once with every inner tensor as an output."""
    from prunec.graph.verify import VERIFY_OPTIMIZATION, deviation
    from prunec.runtime.session import make_session, run_session

    cand, names = _with_inner_outputs(candidate, "candidate-inner")
    ref, _ = _with_inner_outputs(reference, "reference-inner")
    candidate, reference = _proto(candidate), _proto(reference)
    ref_names = {n for node in reference.graph.node for n in node.output}
    got = run_session(make_session(cand, provider=provider, threads=1, optimization=VERIFY_OPTIMIZATION), feeds)
    want = run_session(make_session(ref, provider=provider, threads=1, optimization=VERIFY_OPTIMIZATION), feeds)
    producer = {o: n for n in candidate.graph.node for o in n.output}
    for name in names:
        if name not in ref_names or name not in want:
            continue
        r = want[name]
        for ax, idx in kept.get(name, {}).items():
            if ax < r.ndim and r.shape[ax] != len(idx):
                r = np.take(r, idx, axis=ax)
        g = got[name]
        node = producer.get(name)
        where = f"{name!r} (output of {node.op_type} {node.name!r})" if node is not None else repr(name)
        if r.shape != g.shape:
            return f"{where}: shape {list(g.shape)}, the masked original keeps {list(r.shape)}"
        if not np.all(np.isfinite(r)) or r.size == 0:
            continue
        d = deviation(r, g)
        if not (d.rel <= rtol or d.max_abs <= atol or (d.rel <= 10 * rtol and 1 - d.cosine <= cos_tol)):
            return f"{where}: relative difference {d.rel:.3g} (max abs {d.max_abs:.3g})"
    return None


# ----------------------------------------------------------------------------------------------
# Weight-masking passes


def prove_masks(before: onnx.ModelProto, after: onnx.ModelProto, written: set[str], *,
                input_shapes: dict | None = None) -> int:
    """Prove a weight-masking rewrite (`sparsity`, `2to4`): every initializer named in `written`
    is its old value times a 0/1 mask (same shape and dtype; each entry kept or zeroed), and the
    graph diff of the two models shows nothing else changed: no node but in the values of those
    weights, no other initializer, no input or output. Returns how many weights were proven;
    raises VerificationError naming the first violation."""
    from onnx import numpy_helper

    from prunec.errors import VerificationError
    from prunec.graph.diff import diff_models

    d = diff_models(before, after, input_shapes=input_shapes)
    problems = [f"graph {x.kind} {x.name!r} changed" for x in d.io if x.status != "unchanged"]
    for n in d.changed_nodes:
        extra = set(n.changes) - {"weight_values"}
        outside = [w.after.name for w in n.weights if w.after is not None and w.after.name not in written]
        if n.status != "changed" or extra or outside:
            problems.append(f"node {n.name!r} ({n.op_type}) changed: "
                            f"{', '.join(sorted(extra) or ['weights ' + ', '.join(outside)])}")
    for i in d.initializers:
        if i.status == "unchanged":
            continue
        if i.status != "changed" or i.name not in written or set(i.changes) - {"values", "sparsity"}:
            problems.append(f"initializer {i.name!r} {i.status} ({', '.join(i.changes)}), "
                            "outside what the pass declared it writes")
    if problems:
        raise VerificationError(f"the rewrite changed more than its declared weights: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                                details={"check": "footprint", "problems": problems})
    old = {t.name: t for t in before.graph.initializer}
    new = {t.name: t for t in after.graph.initializer}
    proven = 0
    for name in sorted(written):
        if name not in old or name not in new:
            raise VerificationError(f"weight {name!r}, declared written by the pass, is not an "
                                    "initializer of both models", details={"check": "masks", "weight": name})
        a, b = numpy_helper.to_array(old[name]), numpy_helper.to_array(new[name])
        kept_or_zero = (b == a) | (b == 0)
        if a.shape != b.shape or a.dtype != b.dtype or not np.all(kept_or_zero):
            bad = int(np.size(b) - np.count_nonzero(kept_or_zero)) if a.shape == b.shape else -1
            raise VerificationError(
                f"weight {name!r} is not the original times a 0/1 mask"
                + (f": {bad} entries changed to other values" if bad >= 0 else ": shape or dtype changed"),
                details={"check": "masks", "weight": name, "changed_entries": bad})
        proven += 1
    return proven
