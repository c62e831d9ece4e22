"""Channel dependency analysis: which channels must be removed together, and where they live.

Every output channel of a *producer* (Conv/ConvTranspose/Gemm/MatMul with a constant weight)
is an **atom**. Walking the graph in topological order, each tensor gets a `Label`: the atom
carried by every position of its channel axes. One rule per op family says how labels flow
through that op (see `RULES`); element-wise joins *union* atoms, Concat/Split/Slice/Reshape/
Transpose are list operations on labels, and anything without a rule **freezes** the atoms it
touches. Union-find classes are the removable channels; every constant slice that a class
touches is a `WeightSite`, and the few attributes/shape constants that encode channel counts
are fixed up by the op's rule after removal.

A wrong graph is never an acceptable outcome; a frozen class is. The analysis reads the graph
and never mutates it; `apply_removal` does the rewrite.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.graph.fold import const_value, graph_shapes


# ----------------------------------------------------------------------------------------------
# Core data structures


class UnionFind:
    """Union-find over integer atoms, growable."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Label:
    """Atoms along a tensor's channel axes: `atoms[i, j, ...]` is the atom at index i of axes[0]..."""

    axes: tuple[int, ...]
    atoms: np.ndarray

    @property
    def single(self) -> bool:
        return len(self.axes) == 1


@dataclass
class WeightSite:
    """A constant whose slices along `axis` belong to `atoms[i]` (one atom per index)."""

    node: gs.Node
    tensor: gs.Constant
    axis: int
    atoms: np.ndarray
    role: str  # "producer", "consumer" or "attached"


@dataclass
class ChannelGroup:
    """Channels removable together: `size` classes, each a set of atoms across producers."""

    id: str
    producers: list[str]
    classes: list[int]  # union-find roots
    depth: int
    frozen: str | None = None
    layers: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass
class ChannelAnalysis:
    """The result of `analyze_channels`: groups, plus what is needed to score and remove them."""

    graph: gs.Graph
    groups: list[ChannelGroup]
    sites: list[WeightSite]
    uf: UnionFind
    labels: dict[str, Label]
    frozen_atoms: dict[int, str]
    fixups: list[tuple[gs.Node, Callable]]
    #: Class (union-find root) of every atom.
    roots: np.ndarray
    #: Index into `producer_names` of every atom's producer node, -1 for placeholder atoms.
    atom_producer: np.ndarray
    producer_names: list[str]

    def group(self, gid: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def channels_per_class(self, g: ChannelGroup) -> int:
        """Channels one class of `g` removes from its first producer (>1 for grouped convs)."""
        p0 = self.producer_names.index(g.producers[0])
        return int(np.count_nonzero((self.atom_producer == p0) & (self.roots == g.classes[0])))



# ----------------------------------------------------------------------------------------------
# The walk


class _Walker:
    """Holds state while rules run over the graph in topological order."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple]):
        self.graph = graph
        self.shapes = shapes
        self.uf = UnionFind()
        self.labels: dict[str, Label] = {}
        self.sites: list[WeightSite] = []
        self.frozen: dict[int, str] = {}
        self.fixups: list[tuple[gs.Node, Callable]] = []
        self.producer_ranges: list[tuple[int, int, str]] = []

    # -- helpers used by rules
    def shape(self, t: gs.Tensor) -> tuple | None:
        s = self.shapes.get(t.name)
        if s is None and isinstance(t, gs.Constant):
            s = tuple(t.values.shape)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return tuple(s)

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shapes.get(t.name)
        if s is None and isinstance(t, gs.Constant):
            return t.values.ndim
        return None if s is None else len(s)

    def label(self, t: gs.Tensor) -> Label | None:
        return self.labels.get(t.name) if t is not None and t.name else None

    def set(self, t: gs.Tensor, lab: Label | None) -> None:
        if lab is not None and t.name:
            self.labels[t.name] = lab

    def fresh(self, node: gs.Node, n: int) -> np.ndarray:
        atoms = self.uf.make(n)
        self.producer_ranges.append((int(atoms[0]) if n else 0, n, node.name))
        return atoms

    def freeze(self, lab: Label | None, why: str) -> None:
        if lab is None:
            return
        for a in np.unique(lab.atoms):
            self.frozen.setdefault(int(a), why)

    def freeze_node(self, node: gs.Node, why: str | None = None) -> None:
        why = why or f"{node.op} {node.name!r} has no channel rule"
        for t in node.inputs:
            self.freeze(self.label(t), why)

    def union_labels(self, a: Label, b: Label) -> None:
        for x, y in zip(a.atoms.ravel(), b.atoms.ravel()):
            self.uf.union(int(x), int(y))

    def site(self, node, tensor, axis, atoms, role) -> None:
        self.sites.append(WeightSite(node, tensor, axis, np.asarray(atoms, dtype=np.int64), role))


Rule = Callable[[_Walker, gs.Node], None]
#: Kept indices after removal: tensor name -> channel axis -> indices kept along it.
Kept = dict[str, dict[int, np.ndarray]]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    """Register a channel rule for one op family."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------
# Rules. Each sees the node, reads input labels, writes output labels, records sites/unions.


class _Shape:
    """Shape of a constant weight without loading its values (None-like for non-constants)."""

    def __new__(cls, t: gs.Tensor):
        if not isinstance(t, gs.Constant):
            return None
        obj = super().__new__(cls)
        obj.shape = tuple(int(d) for d in t.shape)
        obj.ndim = len(obj.shape)
        return obj


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _reads_and_writes(w: _Walker, node: gs.Node, xl: Label | None, in_axis: int, in_len: int,
                      wt: gs.Constant, k_axis: int, n_axis: int, out_axis: int,
                      bias: gs.Constant | None = None) -> np.ndarray:
    """A weight layer reading channels along weight axis `k_axis` and writing fresh ones along
    `n_axis`: record the consumer and producer sites and label the output. Returns its atoms."""
    if xl is not None and (xl.axes != (in_axis,) or xl.atoms.shape[0] != in_len):
        w.freeze(xl, f"{node.op} {node.name!r} reads channels on an unexpected axis")
        xl = None
    out = w.fresh(node, int(wt.shape[n_axis]))
    if xl is not None:
        w.site(node, wt, k_axis, xl.atoms, "consumer")
    w.site(node, wt, n_axis, out, "producer")
    if bias is not None:
        w.site(node, bias, 0, out, "producer")
    w.set(node.outputs[0], Label((out_axis,), out))
    return out


@rule("Conv")
def _conv(w: _Walker, node: gs.Node) -> None:
    x, wt = node.inputs[0], node.inputs[1]
    W = _Shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    xl = w.label(x)
    if W is None or (b is not None and not isinstance(b, gs.Constant)):
        w.freeze_node(node, f"Conv {node.name!r} has a non-constant weight or bias")
        return
    g = int(node.attrs.get("group", 1))
    cout, cin_g = W.shape[0], W.shape[1]
    cin = cin_g * g
    if xl is not None and (xl.axes != (1,) or xl.atoms.shape[0] != cin):
        w.freeze(xl, f"Conv {node.name!r} reads channels on an unexpected axis")
        xl = None
    if g > 1 and cin_g == 1 and cout % cin == 0:
        # Depthwise: output channel c*m+j is input channel c's j-th filter; channels pass through.
        mult = cout // cin
        if xl is None:
            # Its channels follow an input we cannot prune, so they cannot be removed either.
            atoms = w.fresh(node, cout)
            w.freeze(Label((1,), atoms), f"depthwise Conv {node.name!r} reads unprunable channels")
        else:
            atoms = np.repeat(xl.atoms, mult)
        lab = Label((1,), atoms)
        w.site(node, wt, 0, atoms, "attached" if xl is not None else "producer")
        if b is not None:
            w.site(node, b, 0, atoms, "attached" if xl is not None else "producer")
        w.set(node.outputs[0], lab)
        if xl is not None:
            def fix(kept: Kept, node=node, mult=mult):
                node.attrs["group"] = int(node.inputs[1].values.shape[0] // mult)
            w.fixups.append((node, fix))
        return
    if g == 1:
        _reads_and_writes(w, node, xl, 1, cin, wt, 1, 0, 1, b)
        return
    # Grouped: every group must keep the same count, so index j is coupled across groups.
    out_atoms = w.fresh(node, cout)
    cout_g = cout // g
    grid = out_atoms.reshape(g, cout_g)
    for j in range(cout_g):
        for k in range(1, g):
            w.uf.union(grid[0, j], grid[k, j])
    if xl is not None:
        ig = xl.atoms.reshape(g, cin_g)
        for j in range(cin_g):
            for k in range(1, g):
                w.uf.union(ig[0, j], ig[k, j])
        w.site(node, wt, 1, ig[0], "consumer")
    w.site(node, wt, 0, out_atoms, "producer")
    if b is not None:
        w.site(node, b, 0, out_atoms, "producer")
    w.set(node.outputs[0], Label((1,), out_atoms))


@rule("ConvTranspose")
def _conv_transpose(w: _Walker, node: gs.Node) -> None:
    x, wt = node.inputs[0], node.inputs[1]
    W = _Shape(wt)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    g = int(node.attrs.get("group", 1))
    xl = w.label(x)
    if W is None or g != 1 or \
            (b is not None and not isinstance(b, gs.Constant)) or "output_shape" in node.attrs:
        w.freeze_node(node, f"ConvTranspose {node.name!r}: only group=1 with constant weights is pruned")
        return
    _reads_and_writes(w, node, xl, 1, W.shape[0], wt, 0, 1, 1, b)


@rule("Gemm")
def _gemm(w: _Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    B = _Shape(bt)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    al = w.label(a)
    if B is None or node.attrs.get("transA", 0) or \
            (c is not None and not isinstance(c, gs.Constant)):
        w.freeze_node(node, f"Gemm {node.name!r}: transA or non-constant weight")
        return
    trans_b = int(node.attrs.get("transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    n = B.shape[n_axis]
    out_atoms = _reads_and_writes(w, node, al, 1, B.shape[k_axis], bt, k_axis, n_axis, 1)
    if c is not None:
        C = np.asarray(c.values)
        if C.ndim >= 1 and C.shape[-1] == n and prod(C.shape[:-1]) == 1:
            w.site(node, c, C.ndim - 1, out_atoms, "producer")
        elif C.size != 1:
            w.freeze(Label((1,), out_atoms), f"Gemm {node.name!r} bias is not per output feature")


@rule("MatMul")
def _matmul(w: _Walker, node: gs.Node) -> None:
    a, bt = node.inputs[0], node.inputs[1]
    al, bl = w.label(a), w.label(bt)
    B = _Shape(bt)
    ra = w.rank(a)
    if B is not None and B.ndim == 2 and ra is not None and ra >= 2:
        if al is not None and (al.axes != (ra - 1,) or al.atoms.shape[0] != B.shape[0]):
            # Channels on a batch/row axis pass through the product unchanged.
            if al.single and al.axes[0] < ra - 1:
                w.set(node.outputs[0], al)
                return
        _reads_and_writes(w, node, al, ra - 1, B.shape[0], bt, 0, 1, ra - 1)
        return
    rb = w.rank(bt)
    if ra is None or rb is None or ra < 2 or rb < 2:
        w.freeze_node(node)
        return
    _matmul_activations(w, node, al, ra, bl, rb)


def _matmul_activations(w: _Walker, node: gs.Node, al: Label | None, ra: int,
                        bl: Label | None, rb: int) -> None:
    """Activation x activation (attention): the contracted axis couples A's atoms with B's.

    Each label axis has a role: a batch axis (aligned to the output, e.g. the heads), the
    contracted K axis, or the operand's own row/column axis. Labels holding K must have the
    same roles on both sides and are united; a label without K flows to the output. Removing a
    class then removes the same head_dim index from Q and K in every head.
    """
    out_rank = max(ra, rb)

    def roles(lab: Label, r: int, k_axis: int, own_axis: int):
        out = []
        for ax in lab.axes:
            if ax == k_axis:
                out.append(("K",))
            elif ax == own_axis:
                out.append(("own", ax + out_rank - r))
            elif ax < r - 2:
                out.append(("batch", ax + out_rank - r))
            else:
                return None
        return out

    ra_roles = roles(al, ra, ra - 1, ra - 2) if al is not None else None
    rb_roles = roles(bl, rb, rb - 2, rb - 1) if bl is not None else None
    why = f"MatMul {node.name!r} multiplies two tensors whose channels prunec cannot align"
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is not None and rl is None:
            w.freeze(lab, why)
    a_k = ra_roles is not None and ("K",) in ra_roles
    b_k = rb_roles is not None and ("K",) in rb_roles
    if a_k or b_k:
        ok = (a_k and b_k and [r for r in ra_roles if r[0] != "own"] == [r for r in rb_roles if r[0] != "own"]
              and not any(r[0] == "own" for r in ra_roles + rb_roles) and al.atoms.shape == bl.atoms.shape)
        if ok:
            w.union_labels(al, bl)
        else:
            if a_k:
                w.freeze(al, why)
            if b_k:
                w.freeze(bl, why)
        return  # labels holding K do not flow to the output (no class removes an output row)
    out: Label | None = None
    for lab, rl in ((al, ra_roles), (bl, rb_roles)):
        if lab is None or rl is None:
            continue
        if out is not None:
            w.freeze(lab, f"MatMul {node.name!r}: both operands carry channels")
            w.freeze(out, f"MatMul {node.name!r}: both operands carry channels")
            out = None
            break
        new_axes = tuple(r[1] for r in rl)
        order = np.argsort(new_axes)
        out = Label(tuple(sorted(new_axes)), np.transpose(lab.atoms, order) if len(new_axes) > 1 else lab.atoms)
    w.set(node.outputs[0], out)


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Mish",
          "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg",
          "Sqrt", "Reciprocal", "Identity", "Cast", "CastLike", "Floor", "Ceil", "Round", "Sin", "Cos",
          "Sign", "Not", "IsNaN", "IsInf", "Clip", "Dropout", "Shrink", "Swish", "QuickGelu",
          "BiasGelu", "FastGelu")


@rule(*_UNARY)
def _unary(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    for t in node.inputs[1:]:
        if w.label(t) is not None:
            w.freeze(w.label(t), f"{node.op} {node.name!r}: channels in a parameter input")
    w.set(node.outputs[0], lab)


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is not None and lab.axes != (1,):
        w.freeze(lab, f"{node.op} {node.name!r} pools over the channel axis")
        return
    w.set(node.outputs[0], lab)


@rule("BatchNormalization", "InstanceNormalization")
def _per_channel_norm(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    if lab.axes != (1,):
        # Normalization is over axis 1, which carries no channels: pass through unchanged.
        w.set(node.outputs[0], lab)
        return
    params = node.inputs[1:5] if node.op == "BatchNormalization" else node.inputs[1:3]
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]) or \
            not all(isinstance(p, gs.Constant) for p in params):
        w.freeze(lab, f"{node.op} {node.name!r}: training mode or non-constant parameters")
        return
    for p in params:
        w.site(node, p, 0, lab.atoms, "attached")
    w.set(node.outputs[0], lab)


@rule("LayerNormalization", "GroupNormalization", "LpNormalization", "Softmax", "LogSoftmax",
      "Hardmax", "MeanVarianceNormalization", "SimplifiedLayerNormalization",
      "SkipLayerNormalization", "RMSNormalization")
def _normalizing(w: _Walker, node: gs.Node) -> None:
    """Ops that mix values across an axis: channels on that axis are frozen, others pass."""
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze_node(node)
        return
    if node.op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                   "SkipLayerNormalization"):
        start = _norm_axis(int(node.attrs.get("axis", -1)), r)
        mixed = set(range(start, r))
    elif node.op == "GroupNormalization":
        mixed = {1}
    elif node.op == "MeanVarianceNormalization":
        mixed = {_norm_axis(a, r) for a in node.attrs.get("axes", [0, 2, 3])}
    else:
        default = -1 if node.op != "LpNormalization" else -1
        mixed = {_norm_axis(int(node.attrs.get("axis", default)), r)}
    if set(lab.axes) & mixed:
        w.freeze(lab, f"{node.op} {node.name!r} normalizes across the channel axis")
        return
    if len(node.inputs) > 1 and any(w.label(t) is not None for t in node.inputs[1:]):
        w.freeze_node(node)
        return
    w.set(node.outputs[0], lab)


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu", "Mod",
                "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                "Where", "BitShift")


@rule(*_ELEMENTWISE)
def _elementwise(w: _Walker, node: gs.Node) -> None:
    out = node.outputs[0]
    r_out = w.rank(out)
    ins = [t for t in node.inputs if t.name]
    labels = [(t, w.label(t)) for t in ins]
    labeled = [(t, lab) for t, lab in labels if lab is not None]
    if not labeled:
        return
    if r_out is None:
        w.freeze_node(node, f"{node.op} {node.name!r}: output rank unknown")
        return
    # Align every labeled input's axes to the output (numpy broadcasting aligns from the right).
    aligned = []
    for t, lab in labeled:
        r = w.rank(t)
        if r is None:
            w.freeze_node(node, f"{node.op} {node.name!r}: input rank unknown")
            return
        aligned.append((t, Label(tuple(a + r_out - r for a in lab.axes), lab.atoms)))
    ref = aligned[0][1]
    for t, lab in aligned[1:]:
        if lab.axes != ref.axes or lab.atoms.shape != ref.atoms.shape:
            for _, l2 in aligned:
                w.freeze(l2, f"{node.op} {node.name!r} joins channels on different axes")
            return
        w.union_labels(ref, lab)
    out_shape = w.shape(out)
    for t in ins:
        if w.label(t) is not None:
            continue
        s = w.shape(t)
        if s is None:
            w.freeze(ref, f"{node.op} {node.name!r}: operand shape unknown")
            return
        offs = r_out - len(s)
        dims = [s[a - offs] if a - offs >= 0 else 1 for a in ref.axes]
        if all(d == 1 for d in dims):
            continue  # broadcast along the channels: nothing to slice
        if len(ref.axes) == 1 and isinstance(t, gs.Constant) and dims[0] == ref.atoms.shape[0]:
            w.site(node, t, ref.axes[0] - offs, ref.atoms, "attached")
            continue
        w.freeze(ref, f"{node.op} {node.name!r} combines channels with an unprunable operand {t.name!r}")
        return
    if out_shape is not None and any(out_shape[a] != n for a, n in zip(ref.axes, ref.atoms.shape)):
        w.freeze(ref, f"{node.op} {node.name!r}: channels broadcast against a larger operand")
        return
    w.set(out, ref)


@rule("Concat")
def _concat(w: _Walker, node: gs.Node) -> None:
    out = node.outputs[0]
    r = w.rank(out)
    labs = [w.label(t) for t in node.inputs]
    if all(lab is None for lab in labs):
        return
    if r is None:
        w.freeze_node(node)
        return
    axis = _norm_axis(int(node.attrs["axis"]), r)
    if all(lab is None or lab.axes == (axis,) for lab in labs):
        parts = []
        for t, lab in zip(node.inputs, labs):
            if lab is None:
                s = w.shape(t)
                if s is None:
                    w.freeze_node(node, f"Concat {node.name!r}: unknown input size")
                    return
                fresh = w.uf.make(s[axis])
                w.freeze(Label((axis,), fresh), f"Concat {node.name!r}: channels from outside any group")
                parts.append(fresh)
            else:
                parts.append(lab.atoms)
        w.set(out, Label((axis,), np.concatenate(parts)))
        return
    # Concatenation along another axis: the channel axes of all inputs are joined.
    if any(lab is None for lab in labs) or any(lab.axes != labs[0].axes or
                                               lab.atoms.shape != labs[0].atoms.shape for lab in labs):
        for lab in labs:
            w.freeze(lab, f"Concat {node.name!r} mixes channels of different layouts")
        return
    for lab in labs[1:]:
        w.union_labels(labs[0], lab)
    w.set(out, labs[0])


def _split_sizes(w: _Walker, node: gs.Node, axis_len: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in v]
    if "split" in node.attrs:
        return [int(x) for x in node.attrs["split"]]
    n = len(node.outputs)
    if "num_outputs" in node.attrs or axis_len % n == 0:
        step = -(-axis_len // n)
        sizes = [step] * (n - 1) + [axis_len - step * (n - 1)]
        return sizes
    return None


@rule("Split")
def _split(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze(lab, f"Split {node.name!r}: rank unknown")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), r)
    if axis not in lab.axes:
        for o in node.outputs:
            w.set(o, lab)
        return
    if not lab.single:
        w.freeze(lab, f"Split {node.name!r} splits multi-axis channels")
        return
    sizes = _split_sizes(w, node, lab.atoms.shape[0])
    if sizes is None or sum(sizes) != lab.atoms.shape[0]:
        w.freeze(lab, f"Split {node.name!r}: split sizes not constant")
        return
    offs = np.cumsum([0] + sizes)
    for o, a, b in zip(node.outputs, offs[:-1], offs[1:]):
        w.set(o, Label((axis,), lab.atoms[a:b]))

    outs = list(node.outputs)

    def fix_sizes(kept: Kept, node=node, outs=outs, axis=axis):
        sizes = [len(kept[o.name][axis]) for o in outs]
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(node.name + "_split_pruned", np.asarray(sizes, dtype=np.int64))
        elif "split" in node.attrs:
            node.attrs["split"] = sizes
        elif len(set(sizes)) != 1:
            node.inputs.append(gs.Constant(node.name + "_split_pruned", np.asarray(sizes, dtype=np.int64)))
            node.attrs.pop("num_outputs", None)
    w.fixups.append((node, fix_sizes))


@rule("Slice")
def _slice(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    vals = [const_value(t) if len(node.inputs) > i and node.inputs[i].name else None
            for i, t in zip(range(1, 5), list(node.inputs[1:5]) + [None] * 4)]
    starts, ends, axes, steps = (vals + [None] * 4)[:4]
    if starts is None or ends is None or r is None or \
            (len(node.inputs) > 3 and node.inputs[3].name and axes is None) or \
            (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        w.freeze(lab, f"Slice {node.name!r}: non-constant parameters")
        return
    axes = [_norm_axis(int(a), r) for a in (axes if axes is not None else range(len(starts)))]
    steps = [int(s) for s in (steps if steps is not None else [1] * len(starts))]
    touched = [i for i, a in enumerate(axes) if a in lab.axes]
    if not touched:
        w.set(node.outputs[0], lab)
        return
    if not lab.single or len(touched) != 1 or steps[touched[0]] != 1:
        w.freeze(lab, f"Slice {node.name!r} slices channels with a step or on several axes")
        return
    i = touched[0]
    n = lab.atoms.shape[0]
    s, e, _ = slice(int(starts[i]), int(ends[i])).indices(n)
    w.set(node.outputs[0], Label(lab.axes, lab.atoms[s:e]))
    src = node.inputs[0]

    def fix(kept: Kept, node=node, i=i, s=s, e=e, src=src, axis=lab.axes[0]):
        idx = kept[src.name][axis]
        new_s = int(np.searchsorted(idx, s))
        new_e = int(np.searchsorted(idx, e))
        st = np.array(const_value(node.inputs[1]), dtype=np.int64).copy()
        en = np.array(const_value(node.inputs[2]), dtype=np.int64).copy()
        st[i], en[i] = new_s, new_e
        node.inputs[1] = gs.Constant(node.name + "_starts_pruned", st)
        node.inputs[2] = gs.Constant(node.name + "_ends_pruned", en)
    w.fixups.append((node, fix))


@rule("Transpose")
def _transpose(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    perm = list(node.attrs.get("perm", list(range(r - 1, -1, -1)) if r else []))
    if not perm:
        w.freeze(lab, f"Transpose {node.name!r}: rank unknown")
        return
    new_axes = [perm.index(a) for a in lab.axes]
    order = np.argsort(new_axes)
    w.set(node.outputs[0], Label(tuple(sorted(new_axes)), np.transpose(lab.atoms, order)))


def _axes_param(w: _Walker, node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in np.ravel(v)]
    a = node.attrs.get("axes")
    return None if a is None else [int(x) for x in a]


@rule("Squeeze", "Unsqueeze", "Flatten", "Reshape")
def _reshape_like(w: _Walker, node: gs.Node) -> None:
    """Any shape change: map channel axes by matching prefix products of the two shapes."""
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    sin, sout = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    if sin is None or sout is None:
        w.freeze(lab, f"{node.op} {node.name!r}: shapes unknown")
        return
    mapped = _map_reshape(lab, sin, sout, w, node)
    if mapped is None:
        w.freeze(lab, f"{node.op} {node.name!r} reshapes channels in a way prunec does not follow")
        return
    w.set(node.outputs[0], mapped)
    if node.op == "Reshape":
        src, dst = node.inputs[0], node.outputs[0]

        sin_ = sin
        pieces = _shape_pieces(w, node.inputs[1])
        if pieces is None or any(_piece_at(pieces, a) is None for a in mapped.axes):
            why = f"Reshape {node.name!r}: the channel dims of its shape are computed at run time"
            w.freeze(lab, why)
            w.freeze(mapped, why)
            return

        def fix(kept: Kept, node=node, src=src, dst=dst, sout=sout, sin_=sin_, pieces=pieces,
                graph=w.graph):
            new = _new_shape(kept, dst.name, sout)
            new_in = _new_shape(kept, src.name, sin_)
            values = []
            for t, offset, value in pieces:
                if value is None:
                    values.append(None)  # a run-time piece (the batch): checked not to hold channels
                    continue
                value = value.copy()
                for j, v in enumerate(value):
                    i = offset + j
                    if v == -1 or new[i] == sout[i]:
                        continue
                    if v == 0 and not node.attrs.get("allowzero", 0) and i < len(new_in) \
                            and new_in[i] == new[i]:
                        continue  # 0 copies the input dim, which is already the new size
                    value[j] = new[i]
                values.append(value)
            if any(v is not None and not np.array_equal(v, p[2]) for v, p in zip(values, pieces)):
                _set_shape_input(graph, node, pieces, values)
        w.fixups.append((node, fix))


def _shape_pieces(w: _Walker, t: gs.Tensor) -> list[tuple[gs.Tensor, int, np.ndarray | None]] | None:
    """A shape vector as pieces (tensor, offset, constant value or None): one constant, or a
    Concat of 1-D constants and run-time pieces (exporters build `[N, C, H*W]` that way)."""
    v = const_value(t)
    if v is not None:
        return [(t, 0, np.asarray(v, dtype=np.int64).ravel())]
    if len(t.inputs) != 1 or t.inputs[0].op != "Concat":
        return None
    pieces, offset = [], 0
    for p in t.inputs[0].inputs:
        pv = const_value(p)
        if pv is not None:
            pv = np.asarray(pv, dtype=np.int64).ravel()
            pieces.append((p, offset, pv))
            offset += pv.size
        elif w.shape(p) is not None and len(w.shape(p)) == 1:
            pieces.append((p, offset, None))
            offset += w.shape(p)[0]
        else:
            return None
    return pieces


def _piece_at(pieces, index: int):
    """The constant value of the piece holding shape entry `index` (None: a run-time piece)."""
    for k, (t, offset, value) in enumerate(pieces):
        end = pieces[k + 1][1] if k + 1 < len(pieces) else float("inf")
        if offset <= index < end:
            return value
    return None


def _set_shape_input(graph: gs.Graph, node: gs.Node, pieces, values: list) -> None:
    """Give `node` a new shape input built from `values` (None keeps a run-time piece).

    A fresh Concat is built rather than editing the old one, which other nodes may share.
    """
    if len(pieces) == 1 and values[0] is not None:
        node.inputs[1] = gs.Constant(f"{node.name}_shape_pruned", values[0].astype(np.int64))
        return
    parts = [gs.Constant(f"{node.name}_shape{k}_pruned", v.astype(np.int64)) if v is not None else t
             for k, ((t, _, _), v) in enumerate(zip(pieces, values))]
    out = gs.Variable(f"{node.name}_shape_pruned", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", f"{node.name}_shape_concat_pruned", attrs={"axis": 0},
                               inputs=parts, outputs=[out]))
    node.inputs[1] = out


def _new_shape(kept: Kept, name: str, old_shape: tuple) -> list[int]:
    """A tensor's shape after removal: kept counts on its channel axes, old dims elsewhere."""
    new = list(old_shape)
    for ax, idx in kept.get(name, {}).items():
        new[ax] = len(idx)
    return new


def _map_reshape(lab: Label, sin: tuple, sout: tuple, w: _Walker, node: gs.Node) -> Label | None:
    """Map a label through a reshape; None when the channel structure cannot be followed.

    The full atom pattern of the input (broadcast over non-channel axes) is reshaped to the
    output; the output's channel axes are those along which atoms vary. The mapping is kept
    only when removal stays rectangular: each output channel axis must either carry whole
    channels (repeated over merged spatial positions: Flatten->Gemm) or be a split of one input
    channel axis whose columns we couple (channel shuffle, head split).
    """
    if prod(sin) != prod(sout) or prod(sin) > 50_000_000:
        return None
    full = np.broadcast_to(_expand(lab, sin), sin).reshape(sout)
    varying = tuple(a for a in range(len(sout)) if not _constant_along(full, a))
    if not varying:
        return None
    sub = full[tuple(slice(None) if a in varying else 0 for a in range(len(sout)))]
    if len(varying) == 1:
        return Label(varying, np.ascontiguousarray(sub))
    if len(varying) == 2 and varying[1] == varying[0] + 1 and lab.single:
        # A channel axis split in two (rows x cols): couple each column so removal is rectangular.
        for j in range(sub.shape[1]):
            for i in range(1, sub.shape[0]):
                w.uf.union(sub[0, j], sub[i, j])
        return Label(varying, np.ascontiguousarray(sub))
    return None


def _expand(lab: Label, shape: tuple) -> np.ndarray:
    """The label's atoms laid out at full rank, with size-1 dims on non-channel axes."""
    view_shape = [1] * len(shape)
    order = np.argsort(lab.axes)
    atoms = np.transpose(lab.atoms, order) if len(lab.axes) > 1 else lab.atoms
    for a, n in zip(sorted(lab.axes), atoms.shape):
        view_shape[a] = n
    return atoms.reshape(view_shape)


def _constant_along(a: np.ndarray, axis: int) -> bool:
    if a.shape[axis] == 1:
        return True
    first = np.take(a, [0], axis=axis)
    return bool(np.all(a == first))


@rule("Resize", "Upsample")
def _resize(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    sin, sout = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    if sin is None or sout is None or any(sin[a] != sout[a] for a in lab.axes):
        w.freeze(lab, f"{node.op} {node.name!r} resizes the channel axis")
        return
    w.set(node.outputs[0], lab)
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        if const_value(node.inputs[3]) is None:
            w.freeze(lab, f"Resize {node.name!r}: sizes computed at run time")
            return
        dst = node.outputs[0]

        def fix(kept: Kept, node=node, dst=dst):
            sizes = np.array(const_value(node.inputs[3]), dtype=np.int64).copy()
            for ax, idx in kept.get(dst.name, {}).items():
                sizes[ax] = len(idx)
            node.inputs[3] = gs.Constant(node.name + "_sizes_pruned", sizes)
        w.fixups.append((node, fix))


@rule("Pad")
def _pad(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    if lab is None:
        return
    r = w.rank(node.inputs[0])
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name \
        else node.attrs.get("pads")
    if pads is None or r is None:
        w.freeze(lab, f"Pad {node.name!r}: pads not constant")
        return
    pads = np.ravel(pads)
    axes = _axes_param_pad(node, r)
    for a in lab.axes:
        if a in axes:
            i = axes.index(a)
            if pads[i] != 0 or pads[i + len(axes)] != 0:
                w.freeze(lab, f"Pad {node.name!r} pads the channel axis")
                return
    w.set(node.outputs[0], lab)


def _axes_param_pad(node: gs.Node, r: int) -> list[int]:
    if len(node.inputs) > 3 and node.inputs[3].name:
        v = const_value(node.inputs[3])
        if v is not None:
            return [_norm_axis(int(a), r) for a in np.ravel(v)]
    return list(range(r))


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")
def _reduce(w: _Walker, node: gs.Node) -> None:
    lab = w.label(node.inputs[0])
    r = w.rank(node.inputs[0])
    if lab is None:
        return
    if r is None:
        w.freeze(lab, f"{node.op} {node.name!r}: rank unknown")
        return
    axes = _axes_param(w, node)
    if axes is None:
        if len(node.inputs) > 1 and node.inputs[1].name or not node.attrs.get("noop_with_empty_axes", 0):
            axes = list(range(r)) if not (len(node.inputs) > 1 and node.inputs[1].name) else None
    if axes is None:
        w.freeze(lab, f"{node.op} {node.name!r}: axes not constant")
        return
    axes = sorted(_norm_axis(a, r) for a in axes)
    if set(axes) & set(lab.axes):
        w.freeze(lab, f"{node.op} {node.name!r} reduces over the channel axis")
        return
    if node.attrs.get("keepdims", 1):
        w.set(node.outputs[0], lab)
    else:
        w.set(node.outputs[0], Label(tuple(a - sum(x < a for x in axes) for a in lab.axes), lab.atoms))


@rule("Shape", "Size")
def _shape_of(w: _Walker, node: gs.Node) -> None:
    """Reading a shape is fine: downstream shape arithmetic sees the pruned shape at run time."""


# ----------------------------------------------------------------------------------------------
# Analysis entry point


def analyze_channels(graph_or_model: gs.Graph | onnx.ModelProto, *, input_shapes: dict | None = None,
                     protect: str | None = None) -> ChannelAnalysis:
    """Find channel groups of a graph. Accepts a gs.Graph (not modified) or a ModelProto."""
    graph = gs.import_onnx(graph_or_model) if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model
    graph.toposort()
    shapes = graph_shapes(graph, input_shapes)
    w = _Walker(graph, shapes)
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        fn = RULES.get(node.op) if node.domain in ("", "ai.onnx", "com.microsoft", None) else None
        if fn is None:
            w.freeze_node(node)
            continue
        fn(w, node)
    for t in graph.outputs:
        w.freeze(w.label(t), f"reaches graph output {t.name!r}")
    _check_shared_constants(w, graph)
    prot = re.compile(protect) if protect else None
    n = len(w.uf.parent)
    roots = np.fromiter((w.uf.find(a) for a in range(n)), dtype=np.int64, count=n)
    names = [name for _, _, name in w.producer_ranges]
    producer = np.full(n, -1, dtype=np.int64)
    for k, (start, count, _) in enumerate(w.producer_ranges):
        producer[start:start + count] = k
    groups = _make_groups(w, roots, producer, names, prot)
    return ChannelAnalysis(graph, groups, w.sites, w.uf, w.labels, w.frozen, w.fixups, roots,
                           producer, names)


def _check_shared_constants(w: _Walker, graph: gs.Graph) -> None:
    """A constant sliced for one reader must be sliced the same way for every reader."""
    by_const: dict[int, list[WeightSite]] = defaultdict(list)
    for s in w.sites:
        by_const[id(s.tensor)].append(s)
    for sites in by_const.values():
        t = sites[0].tensor
        readers = {id(n) for n in t.outputs}
        site_readers = {id(s.node) for s in sites}
        by_axis: dict[int, list[WeightSite]] = defaultdict(list)
        for s in sites:
            by_axis[s.axis].append(s)
        if readers - site_readers:
            for s in sites:
                w.freeze(Label((0,), s.atoms), f"constant {t.name!r} is also read by an op that is not pruned")
            continue
        for axis, group in by_axis.items():
            # The same axis of a shared constant: its positions are one channel each.
            if len({id(s.node) for s in group}) != len(site_readers):
                for s in sites:
                    w.freeze(Label((0,), s.atoms), f"constant {t.name!r} is shared inconsistently")
                break
            for s in group[1:]:
                if s.atoms.shape != group[0].atoms.shape:
                    w.freeze(Label((0,), s.atoms), f"constant {t.name!r} is shared inconsistently")
                    continue
                for a, b in zip(group[0].atoms, s.atoms):
                    w.uf.union(int(a), int(b))


def _make_groups(w: _Walker, roots: np.ndarray, producer: np.ndarray, names: list[str],
                 prot: re.Pattern | None) -> list[ChannelGroup]:
    """Group classes by the set of producers their atoms come from."""
    order = {n.name: i for i, n in enumerate(w.graph.nodes)}
    rank = np.array([order.get(nm, 0) for nm in names] + [0], dtype=np.int64)
    frozen_root: dict[int, str] = {}
    for a, why in w.frozen.items():
        frozen_root.setdefault(int(roots[a]), why)
    has = producer >= 0
    pairs = np.unique(np.stack([roots[has], producer[has]]), axis=1)
    by_root: dict[int, list[int]] = defaultdict(list)
    for r, p in pairs.T:
        by_root[int(r)].append(int(p))
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for root, prods in by_root.items():
        by_key[tuple(sorted(prods, key=lambda p: rank[p]))].append(root)
    group_of_root = np.full(len(roots), -1, dtype=np.int64)
    keys = list(by_key)
    for gi, key in enumerate(keys):
        group_of_root[by_key[key]] = gi
    touched: list[set[str]] = [set() for _ in keys]
    for s in w.sites:
        for gi in np.unique(group_of_root[roots[s.atoms]]):
            if gi >= 0:
                touched[gi].add(s.node.name)
    groups = []
    for gi, key in enumerate(keys):
        prods = [names[p] for p in key]
        classes = sorted(by_key[key])
        frozen = next((frozen_root[r] for r in classes if r in frozen_root), None)
        if frozen is None and prot is not None and any(prot.search(p) for p in prods):
            frozen = "protected by the protect option"
        layers = sorted(touched[gi], key=lambda nm: order.get(nm, 0))
        groups.append(ChannelGroup(id=prods[0], producers=prods, classes=classes,
                                   depth=order.get(prods[0], 0), frozen=frozen, layers=layers))
    groups.sort(key=lambda g: g.depth)
    _disambiguate_ids(groups, w, roots, producer, names)
    return groups


def _disambiguate_ids(groups: list[ChannelGroup], w: _Walker, roots: np.ndarray, producer: np.ndarray,
                      names: list[str]) -> None:
    """Group ids are their first producer's name; when one producer's channels fall into
    several groups (a Split of its output), each id gets `@offset`, the group's first channel
    in that producer's output. Stable for a given model, readable in plan files."""
    by_id: dict[str, list[ChannelGroup]] = defaultdict(list)
    for g in groups:
        by_id[g.id].append(g)
    starts = {name: start for start, _, name in w.producer_ranges}
    for gid, same in by_id.items():
        if len(same) == 1:
            continue
        p = names.index(gid)
        mine = np.nonzero(producer == p)[0]
        for g in same:
            offset = int(mine[np.isin(roots[mine], g.classes)].min()) - starts[gid]
            g.id = f"{gid}@{offset}"


# ----------------------------------------------------------------------------------------------
# Importance and removal


def class_importance(analysis: ChannelAnalysis, kind: str = "l1") -> np.ndarray:
    """Importance of every class, indexed by class id: L1 or L2 norm of all its weight
    slices, or (bn-scale) the |gamma| of its BatchNormalizations."""
    n = len(analysis.roots)
    score = np.zeros(n, dtype=np.float64)
    magnitude: dict[int, np.ndarray] = {}  # |w| or w^2 per constant, shared by its sites
    for s in analysis.sites:
        if kind == "bn-scale" and not (s.node.op == "BatchNormalization" and s.tensor is s.node.inputs[1]):
            continue
        if s.node.op == "BatchNormalization" and any(s.tensor is t for t in s.node.inputs[3:5]):
            continue  # running statistics describe the data, not what the channel contributes
        m = magnitude.get(id(s.tensor))
        if m is None:
            v = np.asarray(s.tensor.values)
            m = np.square(v, dtype=np.float64) if kind == "l2" else np.abs(v)
            magnitude[id(s.tensor)] = m
        other = tuple(i for i in range(m.ndim) if i != s.axis)
        per = m.sum(axis=other, dtype=np.float64) if other else m.astype(np.float64)
        score += np.bincount(analysis.roots[s.atoms], weights=per, minlength=n)
    return np.sqrt(score) if kind == "l2" else score


def apply_removal(analysis: ChannelAnalysis, removed_classes: set[int]) -> dict[str, int]:
    """Delete every slice of the removed classes from the graph, then fix shape constants."""
    graph = analysis.graph
    removed_atom = np.isin(analysis.roots, np.fromiter(removed_classes, dtype=np.int64))
    # Kept indices of every labeled tensor along each channel axis, for the fixups.
    kept: Kept = {}
    for name, lab in analysis.labels.items():
        mask = ~removed_atom[lab.atoms]
        per_axis = {}
        for k, ax in enumerate(lab.axes):
            other = tuple(i for i in range(mask.ndim) if i != k)
            per_axis[ax] = np.nonzero(mask.any(axis=other) if other else mask)[0]
        kept[name] = per_axis
    # Slice constants: group sites by (tensor, axis) and slice once.
    done: set[tuple[int, int]] = set()
    sliced_weights = 0
    new_values: dict[int, np.ndarray] = {}
    for s in analysis.sites:
        key = (id(s.tensor), s.axis)
        if key in done:
            continue
        done.add(key)
        keep = np.nonzero(~removed_atom[s.atoms])[0]
        if len(keep) == len(s.atoms):
            continue
        v = new_values.get(id(s.tensor), np.asarray(s.tensor.values))
        new_values[id(s.tensor)] = np.take(v, keep, axis=s.axis)
        sliced_weights += 1
    for s in analysis.sites:
        if id(s.tensor) in new_values:
            s.tensor.values = new_values[id(s.tensor)]
    for _, fix in analysis.fixups:
        fix(kept)
    # Intermediate shapes are stale now; shape inference recomputes them on export.
    outs = {id(t) for t in graph.outputs} | {id(t) for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in outs:
            t.shape = None
    return {"sliced_constants": sliced_weights, "removed_atoms": int(removed_atom.sum())}
