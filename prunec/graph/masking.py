"""Channel removal simulated by masking: removed channels zeroed where they are read.

Removing a class deletes its producer rows, attached per-channel parameters and reader columns.
Every op between a producer and its readers acts on each channel alone (ops that mix channels
freeze them), so the only places a channel reaches other channels are its *readers*: the
consumer weight sites of the channel analysis (Conv/Gemm/MatMul input columns) and the
contractions the walker records (attention's Q·Kᵀ and A·V, Einsum sums over channels). Zeroing
the removed channels there (a weight slice set to zero, or to a quantized weight's zero point; a
0/1 mask Mul on the contracted operand) gives the outputs of the real removal, up to float
rounding, at the original widths: the masked original of `prunec.graph.proof`, whose zero rules
this module shares.

`parametrized_graph` turns the masked places into graph inputs, so one ONNX Runtime session runs
any removal by feeding masked weights and masks (sensitivity trials). Removing hidden width
changes normalization statistics, which no mask reproduces (`maskable` says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Contraction
from prunec.graph.channels import ChannelAnalysis, removed_atoms
# The proof's own zero rule, so a trial and the proof can never disagree on what "zero" is.
from prunec.graph.proof import _broadcast_zero, _zero_point

#: Prefix of the mask inputs that `parametrized_graph` adds before contractions.
MASK_PREFIX = "prunec_mask__"

#: Prefix of the bias inputs `parametrized_graph` gives compensated readers.
BIAS_PREFIX = "prunec_bias__"

#: A contraction's key: (node name, input index).
ContractionKey = tuple[str, int]


@dataclass
class Masks:
    """Where a removal zeroes what, at the original widths.

    `weights`: constant name -> [(axis, keep)] with `keep` a bool vector along `axis` (every
    consumer site of that constant). `contractions`: (node name, input index) -> a 0/1 array
    broadcastable to that operand (zeros at removed positions of its channel axes)."""

    weights: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    contractions: dict[ContractionKey, np.ndarray] = field(default_factory=dict)
    #: Reader node name -> change of its effective bias ([cout], pre-removal channels): the
    #: compensation the pass folds in for removed channels that hold one value.
    biases: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def readers(self) -> set:
        """The constants and contractions this removal touches."""
        return set(self.weights) | set(self.contractions)

    @property
    def contraction_nodes(self) -> set[str]:
        """Names of the nodes whose contracted operands this removal masks."""
        return {name for name, _ in self.contractions}


@dataclass
class Readers:
    """Every place an analysed graph reads channels: consumer weight sites by constant name (with
    the value that means zero there: 0, or a quantized weight's zero point), and the walker's
    contractions by (node name, input index)."""

    weights: dict[str, list] = field(default_factory=dict)
    zero_points: dict[str, np.ndarray | None] = field(default_factory=dict)
    contractions: dict[ContractionKey, Contraction] = field(default_factory=dict)


def find_readers(analysis: ChannelAnalysis) -> Readers:
    """The readers of `analysis`."""
    out = Readers()
    for s in analysis.sites:
        if s.role == "consumer":
            out.weights.setdefault(s.tensor.name, []).append(s)
            if s.tensor.name not in out.zero_points or out.zero_points[s.tensor.name] is None:
                out.zero_points[s.tensor.name] = _zero_point(s)
    for c in analysis.contractions:
        out.contractions[(c.node.name, c.index)] = c
    return out


def maskable(analysis: ChannelAnalysis, removed_classes: set[int]) -> bool:
    """Whether masking reproduces this removal: not when it shrinks the channels a normalization
    takes its statistics over (hidden width), which changes kept values everywhere."""
    from prunec.graph.channels import statistics_notes

    return not (removed_classes and statistics_notes(analysis, removed_classes))


def _contraction_mask(c: Contraction, keep: np.ndarray) -> np.ndarray:
    """`keep` (over the contraction's channel axes, in label order) shaped for its operand: the
    labeled axes in increasing order, 1 elsewhere (as `graph.proof` masks them)."""
    mask = np.transpose(keep, np.argsort(c.axes)) if len(c.axes) > 1 else keep
    view = [1] * c.rank
    for ax, n in zip(sorted(c.axes), mask.shape):
        view[ax] = n
    return mask.reshape(view)


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
    for key, c in readers.contractions.items():
        keep = ~gone[c.atoms]
        if not keep.all():
            out.contractions[key] = _contraction_mask(c, keep)
    return out


def masked_values(values: np.ndarray, per_axis: list[tuple[int, np.ndarray]],
                  zero_point: np.ndarray | None = None) -> np.ndarray:
    """A copy of `values` with the positions not kept along each axis set to zero (a quantized
    weight's `zero_point`, broadcast along its per-channel axis)."""
    v = np.array(values, copy=True)
    for axis, keep in per_axis:
        index = [slice(None)] * v.ndim
        drop = np.nonzero(~keep)[0]
        index[axis] = drop
        v[tuple(index)] = _broadcast_zero(zero_point, v, axis, len(drop))
    return v


def _float_dtype(t: gs.Tensor) -> np.dtype:
    try:
        dt = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    except TypeError:
        dt = np.dtype(np.float32)
    return dt if dt.kind == "f" else np.dtype(np.float32)


@dataclass
class Parametrized:
    """A graph whose reader weights and contraction masks are inputs: feed `feeds(masks)`."""

    graph: gs.Graph
    #: constant name -> its original values (fed unmasked when a removal does not touch it).
    weights: dict[str, np.ndarray]
    #: constant name -> the zero of a quantized weight (None: 0).
    zero_points: dict[str, np.ndarray | None]
    #: contraction key -> (mask input name, all-ones mask).
    masks: dict[ContractionKey, tuple[str, np.ndarray]]
    #: reader node name -> (bias input name, its original effective bias).
    biases: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def feeds(self, masks: Masks) -> dict[str, np.ndarray]:
        """Inputs for one removal: masked copies where it zeroes, the originals elsewhere."""
        out = {}
        for node, (inp, base) in self.biases.items():
            delta = masks.biases.get(node)
            out[inp] = base if delta is None else (base.astype(np.float64) + delta).astype(base.dtype)
        for name, v in self.weights.items():
            per = masks.weights.get(name)
            out[name] = masked_values(v, per, self.zero_points.get(name)) if per else v
        for key, (inp, ones) in self.masks.items():
            keep = masks.contractions.get(key)
            out[inp] = ones if keep is None else np.broadcast_to(keep, ones.shape).astype(ones.dtype)
        return out


def parametrized_graph(analysis: ChannelAnalysis, readers: Readers, weights: set[str],
                       contractions: set[ContractionKey], dtypes: dict[str, np.dtype] | None = None,
                       biases: set[str] = frozenset()) -> Parametrized:
    """A copy of the analysed graph where the constants named in `weights` are graph inputs and
    each contraction in `contractions` reads its operand through a mask input (that node only;
    other readers of the operand keep it unmasked); the layers named in `biases` read their
    effective bias from an input (`bias_input`). `dtypes` (inferred element types by tensor
    name) types the masks; without it the graph's own types are used."""
    g = analysis.graph.copy()
    nodes = {n.name: n for n in g.nodes}
    bias_inputs = {name: bias_input(g, nodes[name]) for name in sorted(biases)}
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
    masks = {}
    for key in sorted(contractions):
        name, index = key
        node, c = nodes[name], readers.contractions[key]
        x = node.inputs[index]
        dtype = np.dtype(dtypes[x.name]) if dtypes and x.name in dtypes else _float_dtype(x)
        shape = list(_contraction_mask(c, np.ones(c.atoms.shape, dtype=bool)).shape)
        inp = gs.Variable(f"{MASK_PREFIX}{name}__{index}", dtype=dtype, shape=shape)
        g.inputs.append(inp)
        y = gs.Variable(f"{MASK_PREFIX}{name}__{index}__masked", dtype=dtype)
        g.nodes.append(gs.Node("Mul", f"{MASK_PREFIX}{name}__{index}__mul", inputs=[x, inp], outputs=[y]))
        node.inputs[index] = y
        masks[key] = (inp.name, np.ones(shape, dtype=dtype))
    g.toposort()
    return Parametrized(g, values, {n: readers.zero_points.get(n) for n in values}, masks, bias_inputs)


def biasable(graph: gs.Graph, name: str) -> bool:
    """Whether `bias_input` can feed the bias of the layer `name` (a Conv, Gemm or MatMul whose
    weight is a constant: see `graph.linear.linear_layer`)."""
    from prunec.graph.linear import NotLinear, linear_layer

    node = next((n for n in graph.nodes if n.name == name), None)
    if node is None:
        return False
    try:
        linear_layer(node, graph)
    except NotLinear:
        return False
    return True


def bias_input(graph: gs.Graph, node: gs.Node) -> tuple[str, np.ndarray]:
    """Make the effective bias of the linear layer `node` a graph input ([cout], the weight's
    dtype; a Gemm's beta folded in, a bias-less MatMul given an Add): (input name, its value)."""
    from prunec.graph.linear import linear_layer

    layer = linear_layer(node, graph)
    dtype = np.asarray(layer.node.inputs[1].values).dtype
    base = np.asarray(layer.bias(), dtype=np.float64).reshape(-1).astype(dtype)
    inp = gs.Variable(f"{BIAS_PREFIX}{node.name}", dtype=dtype, shape=[layer.cout])
    if layer.kind in ("conv", "gemm"):
        if layer.kind == "gemm":
            node.attrs["beta"] = 1.0
        if len(node.inputs) > 2:
            node.inputs[2] = inp
        else:
            node.inputs.append(inp)
    elif layer.bias_node is not None:
        add = layer.bias_node
        k = next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant))
        add.inputs[k] = inp
    else:
        y = node.outputs[0]
        mid = gs.Variable(f"{BIAS_PREFIX}{node.name}__nobias", dtype=y.dtype)
        node.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", f"{BIAS_PREFIX}{node.name}__add", inputs=[mid, inp], outputs=[y]))
    graph.inputs.append(inp)
    return inp.name, base


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
    for s in analysis.sites:
        # A weight read through an element-wise view (DequantizeLinear(quantized constant)):
        # the layer sees the view's output, which has the constant's new dims.
        if (s.tensor.name in consts and s.node.op in _SAME_SHAPE_VIEWS and s.node.inputs
                and s.node.inputs[0] is s.tensor and s.node.outputs):
            new_shapes[s.node.outputs[0].name] = consts[s.tensor.name]
    return new_shapes, consts


#: Ops through which a weight reaches its layer with its shape unchanged.
_SAME_SHAPE_VIEWS = ("DequantizeLinear", "QuantizeLinear", "Identity", "Cast")
