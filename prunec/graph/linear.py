"""Weight layers seen as one linear map: output rows = input rows @ matrix + bias.

Conv (any spatial rank, grouped and depthwise), Gemm and MatMul with a constant weight all
compute, at every output position, `patch @ W + b`: a Conv's patch is its receptive field
(im2col, channel-major then kernel taps), a Gemm's or MatMul's is the input row along the last
axis. `LinearLayer` reads and writes the weights in that form, turns activations into the
matching rows at sampled positions, and edits the bias (adding one, or an Add after a MatMul,
where there is none). Recovery (compensation, reconstruction, statistics correction,
output-aware channel selection) is written once against this view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.fold import const_value
from prunec.runtime.activations import Reducer, batch_positions, rows_at

#: Ops that read and write channels through a constant weight.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class NotLinear(Exception):
    """A node that `LinearLayer` cannot treat as patch @ matrix + bias (the message says why)."""


@dataclass
class LinearLayer:
    """A Conv, Gemm or MatMul with a constant float weight, as `rows @ matrix + bias`."""

    node: gs.Node
    kind: str  # "conv", "gemm" or "matmul"
    groups: int
    #: The Add after a MatMul that holds its bias (torch exports Linear on 3-D inputs that way).
    bias_node: gs.Node | None = None
    #: The graph, for the Add a bias-less MatMul gets when it needs a bias.
    graph: gs.Graph | None = None

    # -- what it reads and writes
    @property
    def name(self) -> str:
        return self.node.name

    @property
    def in_tensor(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def out_tensor(self) -> gs.Tensor:
        """The tensor holding `rows @ matrix + bias` (after the bias Add of a MatMul)."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def in_axis(self) -> int:
        """Channel axis of the input (and output): 1, or -1 for a MatMul's channels-last rows."""
        return -1 if self.kind == "matmul" else 1

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.node.inputs[1].values)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.shape[2:]) if self.kind == "conv" else ()

    @property
    def taps(self) -> int:
        return prod(self.kernel)

    @property
    def cin(self) -> int:
        w = self.weight
        if self.kind == "conv":
            return int(w.shape[1]) * self.groups
        if self.kind == "gemm" and self.node.attrs.get("transB", 0):
            return int(w.shape[1])
        return int(w.shape[0])

    @property
    def cout(self) -> int:
        w = self.weight
        if self.kind == "conv" or (self.kind == "gemm" and self.node.attrs.get("transB", 0)):
            return int(w.shape[0])
        return int(w.shape[1])

    @property
    def features(self) -> int:
        """Unknowns per output channel of one group: cin/groups * taps (+1 for the bias)."""
        return self.cin // self.groups * max(self.taps, 1)

    # -- weights as matrices
    def matrices(self) -> np.ndarray:
        """[groups, cin/groups * taps, cout/groups] float64: output = patch @ matrix (+ bias)."""
        w = self.weight.astype(np.float64)
        if self.kind == "conv":
            g = self.groups
            cout_g = w.shape[0] // g
            return w.reshape(g, cout_g, -1).transpose(0, 2, 1)
        if self.kind == "gemm":
            alpha = float(self.node.attrs.get("alpha", 1.0))
            m = w.T if self.node.attrs.get("transB", 0) else w
            return (alpha * m)[None]
        return w[None]

    def bias(self) -> np.ndarray:
        """The effective bias, [cout] float64 (zeros where the layer has none)."""
        c = self._bias_const()
        if c is None:
            return np.zeros(self.cout)
        v = np.asarray(c.values, dtype=np.float64)
        if self.kind == "gemm":
            v = float(self.node.attrs.get("beta", 1.0)) * v
        return np.broadcast_to(v.reshape(-1), (self.cout,)).copy()

    def set_matrices(self, mats: np.ndarray, names) -> None:
        """Write `matrices()`-shaped weights back (a fresh constant when the old one is shared)."""
        old = self.node.inputs[1]
        dtype = np.asarray(old.values).dtype
        if self.kind == "conv":
            g, d, cout_g = mats.shape
            w = mats.transpose(0, 2, 1).reshape((g * cout_g,) + tuple(old.shape[1:]))
        elif self.kind == "gemm":
            w = mats[0] / float(self.node.attrs.get("alpha", 1.0))
            w = w.T if self.node.attrs.get("transB", 0) else w
        else:
            w = mats[0]
        self.node.inputs[1] = _replace(old, w.astype(dtype), names, "rec")

    def set_bias(self, bias: np.ndarray, names) -> None:
        """Make the effective bias `bias` ([cout]), adding a bias input or Add node if needed."""
        bias = np.asarray(bias, dtype=np.float64).reshape(-1)
        dtype = self.weight.dtype
        c = self._bias_const()
        if self.kind == "gemm":
            beta = float(self.node.attrs.get("beta", 1.0))
            if c is None or beta == 0.0:
                self.node.attrs["beta"] = beta = 1.0 if beta == 0.0 or c is None else beta
            bias = bias / beta
        if c is not None:
            shape = np.asarray(c.values).shape
            shape = shape if int(np.prod(shape)) == bias.size else (bias.size,)
            new = _replace(c, bias.reshape(shape).astype(dtype), names, "bias")
            node = self.bias_node or self.node
            for i, t in enumerate(node.inputs):
                if t is c:
                    node.inputs[i] = new
            return
        const = gs.Constant(names(f"{self.name or 'layer'}_bias"), bias.astype(dtype))
        if self.kind in ("conv", "gemm"):
            self.node.inputs.append(const)
            return
        # MatMul: y = x @ W becomes y = (x @ W) + b, the Add writing the old output tensor.
        y = self.node.outputs[0]
        mid = gs.Variable(names(y.name + "_nobias"), dtype=y.dtype)
        self.node.outputs[0] = mid
        add = gs.Node("Add", names(f"{self.name}_bias_add"), inputs=[mid, const], outputs=[y])
        self.graph.nodes.append(add)
        self.bias_node = add

    def add_to_bias(self, delta: np.ndarray, names) -> None:
        """bias += delta."""
        self.set_bias(self.bias() + np.asarray(delta, dtype=np.float64).reshape(-1), names)

    def _bias_const(self) -> gs.Constant | None:
        if self.kind == "matmul":
            if self.bias_node is None:
                return None
            return next(t for t in self.bias_node.inputs if isinstance(t, gs.Constant))
        if len(self.node.inputs) > 2 and self.node.inputs[2].name:
            return self.node.inputs[2]
        return None

    # -- activations as rows
    def out_positions(self, in_shape: tuple[int, ...]) -> int:
        """Output positions per sample for an input of shape `in_shape` (without the sample axis)."""
        if self.kind == "conv":
            return prod(self._out_spatial(tuple(in_shape[1:])))
        return prod(in_shape[:-1]) if self.kind == "matmul" else 1

    def patches(self, x: np.ndarray, first: int, positions: int, seed: int,
                mask: np.ndarray | None = None) -> np.ndarray:
        """[rows, cin * taps] input rows at the output positions `out_rows` samples (a Gemm or
        MatMul's real positions only, with a calibration `mask`; Convs take no mask)."""
        if self.kind != "conv":
            return rows_at(x, self.in_axis, positions, seed, first, mask)[0]
        n, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        out = self._out_spatial(spatial)
        if out == spatial and self.taps == 1:  # a pointwise conv: patches are the pixels
            return rows_at(x, 1, positions, seed, first)[0]
        begin, end = self._pads(spatial)
        xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end))) if any(begin + end) else x
        picks = batch_positions(prod(out), positions, seed, first, n)  # [n, p]
        coords = np.stack(np.unravel_index(picks, out), axis=-1)  # [n, p, r]
        strides = np.asarray(self.node.attrs.get("strides", [1] * len(out)))
        dil = np.asarray(self.node.attrs.get("dilations", [1] * len(out)))
        taps = np.stack(np.unravel_index(np.arange(self.taps), self.kernel), axis=-1) * dil  # [t, r]
        idx = coords[:, :, None, :] * strides + taps[None, None]  # [n, p, t, r]
        sample = np.arange(n)[:, None, None]
        cols = xp[(sample, slice(None)) + tuple(idx[..., d] for d in range(len(out)))]
        # Advanced indices around a slice come first: [n, p, t, c] -> [n*p, c*t].
        return cols.transpose(0, 1, 3, 2).reshape(n * picks.shape[1], c * self.taps)

    def out_rows(self, y: np.ndarray, first: int, positions: int, seed: int,
                 mask: np.ndarray | None = None) -> np.ndarray:
        """[rows, cout] output rows at the sampled positions."""
        return rows_at(y, self.in_axis, positions, seed, first, None if self.kind == "conv" else mask)[0]

    def _out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        begin, end = self._pads(spatial)
        strides = self.node.attrs.get("strides", [1] * len(spatial))
        dil = self.node.attrs.get("dilations", [1] * len(spatial))
        return tuple((s + b + e - d * (k - 1) - 1) // st + 1
                     for s, b, e, k, st, d in zip(spatial, begin, end, self.kernel, strides, dil))

    def _pads(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        r = len(spatial)
        auto = self.node.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            strides = self.node.attrs.get("strides", [1] * r)
            dil = self.node.attrs.get("dilations", [1] * r)
            begin, end = [], []
            for s, k, st, d in zip(spatial, self.kernel, strides, dil):
                total = max(0, (-(-s // st) - 1) * st + d * (k - 1) + 1 - s)
                small, big = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
            return begin, end
        if auto == "VALID":
            return [0] * r, [0] * r
        pads = list(self.node.attrs.get("pads", [0] * (2 * r)))
        return pads[:r], pads[r:]

    def border_mask(self, spatial: tuple[int, ...]) -> np.ndarray:
        """[taps, output positions] 1 where a tap reads inside the input, 0 where it reads padding."""
        out = self._out_spatial(spatial)
        begin, _ = self._pads(spatial)
        strides = np.asarray(self.node.attrs.get("strides", [1] * len(out)))
        dil = np.asarray(self.node.attrs.get("dilations", [1] * len(out)))
        coords = np.stack(np.unravel_index(np.arange(prod(out)), out), axis=-1)  # [P, r]
        taps = np.stack(np.unravel_index(np.arange(self.taps), self.kernel), axis=-1) * dil  # [t, r]
        pos = coords[None] * strides + taps[:, None] - np.asarray(begin)  # [t, P, r]
        return np.all((pos >= 0) & (pos < np.asarray(spatial)), axis=-1).astype(np.float64)


def gram_upper(x: np.ndarray) -> np.ndarray:
    """The upper triangle of x^T x (zeros below the diagonal) as float64, by a symmetric rank-k
    update: half the work of a matrix product. Sum these, then `symmetric` once."""
    import scipy.linalg.blas as blas

    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64) or x.shape[0] == 0 or x.shape[1] == 0:
        x = x.astype(np.float64)
        return np.triu(x.T @ x)
    syrk = blas.ssyrk if x.dtype == np.float32 else blas.dsyrk
    return syrk(1.0, x.T, trans=0).astype(np.float64)  # x.T is F-ordered: no copy


def symmetric(upper: np.ndarray) -> np.ndarray:
    """A full symmetric matrix from its upper triangle (the last axes of a stack)."""
    return np.triu(upper) + np.swapaxes(np.triu(upper, 1), -1, -2)


def _replace(old: gs.Constant, values: np.ndarray, names, tag: str) -> gs.Constant:
    """`old` with new values: in place when only one node reads it, else a fresh constant."""
    if len(old.outputs) <= 1:
        old.values = values
        return old
    return gs.Constant(names(f"{old.name}_{tag}"), values)


def linear_layer(node: gs.Node, graph: gs.Graph) -> LinearLayer:
    """`node` as a LinearLayer, or NotLinear saying why it is not one."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        raise NotLinear(f"{node.op} is not a Conv, Gemm or MatMul")
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        raise NotLinear("weight is not a constant")
    w = np.asarray(node.inputs[1].values)
    if w.dtype.kind != "f":
        raise NotLinear(f"weight dtype {w.dtype} is not floating point")
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and not isinstance(bias, gs.Constant):
        raise NotLinear("bias is not a constant")
    outputs = {id(t) for t in graph.outputs}
    if node.op == "Conv":
        layer = LinearLayer(node, "conv", int(node.attrs.get("group", 1)))
        if w.ndim < 3:
            raise NotLinear("Conv weight has no kernel axes")
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0) or w.ndim != 2:
            raise NotLinear("Gemm with transA or a weight that is not a matrix")
        layer = LinearLayer(node, "gemm", 1)
        if bias is not None:
            c = np.asarray(bias.values)
            if c.size not in (1, layer.cout) or (c.size > 1 and c.shape[-1] != layer.cout):
                raise NotLinear(f"Gemm bias of shape {list(c.shape)} is not per output feature")
    else:
        if w.ndim != 2:
            raise NotLinear("MatMul weight is not a matrix")
        layer = LinearLayer(node, "matmul", 1)
        y = node.outputs[0]
        readers = list(y.outputs)
        if len(readers) == 1 and readers[0].op == "Add" and id(y) not in outputs:
            other = [t for t in readers[0].inputs if t is not y]
            c = const_value(other[0]) if len(other) == 1 and isinstance(other[0], gs.Constant) else None
            if c is not None and c.size == layer.cout and c.shape[-1] == layer.cout:
                layer.bias_node = readers[0]
    layer.graph = graph
    return layer


def layer_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    """Weight-layer nodes by name."""
    return {n.name: n for n in graph.nodes if n.op in WEIGHT_OPS and n.name}


# ----------------------------------------------------------------------------------------------
# Second moments of a layer's input patches (what output-aware selection needs)


@dataclass
class PatchStats:
    """Sums over sampled input patches of one layer, per group: count, sum, sum of outer products."""

    n: int
    sums: np.ndarray  # [groups, d]
    outer: np.ndarray  # [groups, d, d]

    def second_moment(self, centered: bool) -> np.ndarray:
        """[groups, d, d] E[p p^T], or the covariance when `centered`."""
        m = self.outer / max(self.n, 1)
        if centered:
            mu = self.sums / max(self.n, 1)
            m = m - mu[:, :, None] * mu[:, None, :]
        return m


@dataclass(frozen=True)
class PatchMoments(Reducer):
    """Running sum and sum of outer products of a layer's input patches at `positions` sampled
    output positions per sample, per group (memory: groups x d^2, d = cin/groups * taps)."""

    layer: str
    geometry: tuple
    positions: int = 32
    seed: int = 0
    view: LinearLayer | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, layer: LinearLayer, positions: int, seed: int) -> "PatchMoments":
        attrs = tuple(sorted((k, str(v)) for k, v in layer.node.attrs.items()))
        return cls(layer.name, (layer.kind, layer.groups, layer.kernel, attrs), positions, seed, layer)

    def start(self) -> "_PatchAcc":
        return _PatchAcc(self)


class _PatchAcc:
    def __init__(self, spec: PatchMoments):
        self.spec = spec
        self.n = 0
        self.sums = self.outer = None

    def add(self, value: np.ndarray, first: int, mask: np.ndarray | None = None) -> None:
        layer = self.spec.view
        p = layer.patches(value, first, self.spec.positions, self.spec.seed, mask)
        g = layer.groups
        d = p.shape[1] // g
        outer = np.stack([gram_upper(p[:, k * d:(k + 1) * d]) for k in range(g)])
        sums = p.reshape(len(p), g, d).sum(axis=0, dtype=np.float64)
        if self.outer is None:
            self.outer, self.sums = outer, sums
        else:
            self.outer += outer
            self.sums += sums
        self.n += len(p)

    def result(self) -> PatchStats:
        return PatchStats(self.n, self.sums, symmetric(self.outer))
