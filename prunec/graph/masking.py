"""Channel removal simulated by masking: removed channels zeroed where they are read.

Removing a class deletes its producer rows, attached per-channel parameters and reader columns.
Every op between a producer and its readers acts on each channel alone (ops that mix channels
freeze them), so the only places a channel reaches other channels are its *readers*: the
consumer weight sites of the channel analysis (Conv/Gemm/MatMul input columns) and the
contracted axis of an activation x activation MatMul. Zeroing the removed channels there (a
weight slice set to 0; a 0/1 mask Mul on the MatMul's first operand) gives the outputs of the
real removal, up to float rounding, at the original widths.

Two uses: `masked_model` writes the masked original as a plain model (the reference a removal is
proved against), and `parametrized_graph` turns the masked places into graph inputs, so one ONNX
Runtime session runs any removal by feeding masked weights and masks (sensitivity trials).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.graph.channels import ChannelAnalysis

#: Prefix of the mask inputs that `parametrized_graph` adds before activation MatMuls.
MASK_PREFIX = "prunec_mask__"


@dataclass
class Masks:
    """Where a removal zeroes what, at the original widths.

    `weights`: constant name -> [(axis, keep)] with `keep` a bool vector along `axis` (every
    consumer site of that constant). `contractions`: activation x activation MatMul node name ->
    a 0/1 array broadcastable to its first operand (zeros at removed positions of the contracted
    axis)."""

    weights: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    contractions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def readers(self) -> set[str]:
        """Names of the constants and MatMul nodes this removal touches."""
        return set(self.weights) | set(self.contractions)


def removed_atoms(analysis: ChannelAnalysis, removed_classes: set[int]) -> np.ndarray:
    """Bool per atom: is its class removed."""
    return np.isin(analysis.roots, np.fromiter(removed_classes, dtype=np.int64, count=len(removed_classes)))


@dataclass
class Readers:
    """Every place an analysed graph reads channels: consumer weight sites by constant name, and
    activation x activation MatMuls whose first operand carries channels on the contracted axis,
    by node name, with the mask shape for that operand (1 except on its labeled axes)."""

    weights: dict[str, list] = field(default_factory=dict)
    contractions: dict[str, tuple[int, ...]] = field(default_factory=dict)


def find_readers(analysis: ChannelAnalysis, shapes: dict[str, tuple]) -> Readers:
    """The readers of `analysis` (`shapes`: tensor ranks, e.g. from `graph.fold.graph_shapes`)."""
    out = Readers()
    for s in analysis.sites:
        if s.role == "consumer":
            out.weights.setdefault(s.tensor.name, []).append(s)
    for node in analysis.graph.nodes:
        if node.op != "MatMul" or any(isinstance(t, gs.Constant) for t in node.inputs[:2]):
            continue
        lab = analysis.labels.get(node.inputs[0].name)
        dims = shapes.get(node.inputs[0].name)
        if lab is None or dims is None or len(dims) - 1 not in lab.axes:
            continue
        shape = [1] * len(dims)
        for ax, n in zip(lab.axes, lab.atoms.shape):
            shape[ax] = int(n)
        out.contractions[node.name] = tuple(shape)
    return out


def masks_for(analysis: ChannelAnalysis, readers: Readers, removed_classes: set[int]) -> Masks:
    """What removing `removed_classes` zeroes at the readers (only places with a zero)."""
    gone = removed_atoms(analysis, removed_classes)
    out = Masks()
    for name, sites in readers.weights.items():
        per: list[tuple[int, np.ndarray]] = []
        for s in sites:
            keep = ~gone[s.atoms]
            if not keep.all() and not any(a == s.axis and np.array_equal(k, keep) for a, k in per):
                per.append((s.axis, keep))
        if per:
            out.weights[name] = per
    if readers.contractions:
        nodes = {n.name: n for n in analysis.graph.nodes}
        for name, shape in readers.contractions.items():
            lab = analysis.labels[nodes[name].inputs[0].name]
            keep = ~gone[lab.atoms]
            if keep.all():
                continue
            # Label axes in increasing order, then the size-1 axes in between.
            keep = np.transpose(keep, np.argsort(lab.axes)) if keep.ndim > 1 else keep
            out.contractions[name] = keep.reshape(shape)
    return out


def masked_values(values: np.ndarray, per_axis: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """A copy of `values` with the positions not kept along each axis set to zero."""
    v = np.array(values, copy=True)
    for axis, keep in per_axis:
        index = [slice(None)] * v.ndim
        index[axis] = ~keep
        v[tuple(index)] = 0
    return v


def _insert_mask(graph: gs.Graph, node: gs.Node, mask: gs.Tensor) -> None:
    """Multiply the first operand of `node` by `mask` just before `node` reads it."""
    a = node.inputs[0]
    out = gs.Variable(f"{MASK_PREFIX}{node.name}__masked", dtype=a.dtype)
    graph.nodes.append(gs.Node("Mul", f"{MASK_PREFIX}{node.name}__mul", inputs=[a, mask], outputs=[out]))
    node.inputs[0] = out


def masked_model(analysis: ChannelAnalysis, shapes: dict[str, tuple], removed_classes: set[int]
                 ) -> onnx.ModelProto:
    """The analysed graph with `removed_classes` zeroed at their readers, as a model (the graph
    itself is not modified): equal to the pruned model up to float rounding."""
    masks = masks_for(analysis, find_readers(analysis, shapes), removed_classes)
    g = analysis.graph.copy()
    tensors = g.tensors()
    for name, per in masks.weights.items():
        t = tensors[name]
        t.values = masked_values(np.asarray(t.values), per)
    nodes = {n.name: n for n in g.nodes}
    for name, keep in masks.contractions.items():
        node = nodes[name]
        dtype = _float_dtype(node.inputs[0])
        _insert_mask(g, node, gs.Constant(f"{MASK_PREFIX}{name}", keep.astype(dtype)))
    g.toposort()
    return _export(g)


def _float_dtype(t: gs.Tensor) -> np.dtype:
    try:
        dt = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    except TypeError:
        dt = np.dtype(np.float32)
    return dt if dt.kind == "f" else np.dtype(np.float32)


def _export(g: gs.Graph) -> onnx.ModelProto:
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = min(m.ir_version, 10)  # what this onnxruntime accepts
    return m


@dataclass
class Parametrized:
    """A graph whose reader weights and contraction masks are inputs: feed `feeds(masks)`."""

    graph: gs.Graph
    #: constant name -> its original values (fed unmasked when a removal does not touch it).
    weights: dict[str, np.ndarray]
    #: MatMul node name -> (mask input name, all-ones mask).
    masks: dict[str, tuple[str, np.ndarray]]

    def feeds(self, masks: Masks) -> dict[str, np.ndarray]:
        """Inputs for one removal: masked copies where it zeroes, the originals elsewhere."""
        out = {}
        for name, v in self.weights.items():
            per = masks.weights.get(name)
            out[name] = masked_values(v, per) if per else v
        for node_name, (inp, ones) in self.masks.items():
            keep = masks.contractions.get(node_name)
            out[inp] = ones if keep is None else np.broadcast_to(keep, ones.shape).astype(ones.dtype)
        return out


def parametrized_graph(analysis: ChannelAnalysis, readers: Readers, weights: set[str],
                       contractions: set[str]) -> Parametrized:
    """A copy of the analysed graph where the constants named in `weights` are graph inputs and
    each MatMul named in `contractions` reads its first operand through a mask input."""
    g = analysis.graph.copy()
    tensors = g.tensors()
    values = {}
    for name in sorted(weights):
        t = tensors[name]
        values[name] = np.asarray(t.values)
        v = gs.Variable(name, dtype=values[name].dtype, shape=list(values[name].shape))
        for reader in list(t.outputs):
            for i, x in enumerate(reader.inputs):
                if x is t:
                    reader.inputs[i] = v
        g.inputs.append(v)
    nodes = {n.name: n for n in g.nodes}
    masks = {}
    for name in sorted(contractions):
        node = nodes[name]
        shape = list(readers.contractions[name])
        dtype = _float_dtype(node.inputs[0])
        inp = gs.Variable(f"{MASK_PREFIX}{name}", dtype=dtype, shape=shape)
        g.inputs.append(inp)
        _insert_mask(g, node, inp)
        masks[name] = (inp.name, np.ones(shape, dtype=dtype))
    g.toposort()
    return Parametrized(g, values, masks)


def removal_shapes(analysis: ChannelAnalysis, shapes: dict[str, tuple], removed_classes: set[int]
                   ) -> tuple[dict[str, tuple], dict[str, tuple[int, ...]]]:
    """Tensor shapes and constant dims after removing `removed_classes`, without removing them:
    every labeled axis keeps the indices `apply_removal` keeps, every weight site its kept slices.
    With `graph.costs.totals_at` this prices a removal exactly as counting the pruned model would."""
    gone = removed_atoms(analysis, removed_classes)
    new_shapes = dict(shapes)
    if gone.any():
        for name, lab in analysis.labels.items():
            dims = shapes.get(name)
            if dims is None:
                continue
            keep = ~gone[lab.atoms]
            if keep.all():
                continue
            dims = list(dims)
            for k, ax in enumerate(lab.axes):
                other = tuple(i for i in range(keep.ndim) if i != k)
                dims[ax] = int(np.count_nonzero(keep.any(axis=other) if other else keep))
            new_shapes[name] = tuple(dims)
    consts: dict[str, tuple[int, ...]] = {}
    for s in analysis.sites:
        keep = ~gone[s.atoms]
        if keep.all():
            continue
        dims = list(consts.get(s.tensor.name, tuple(s.tensor.shape)))
        dims[s.axis] = int(np.count_nonzero(keep))
        consts[s.tensor.name] = tuple(dims)
    new_shapes.update(consts)
    return new_shapes, consts
