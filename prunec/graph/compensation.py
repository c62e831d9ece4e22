"""Compensation for removed channels: fold their expected contribution into the readers' biases.

A reader (a Conv, Gemm or MatMul that consumes channels) computes `patch @ W + b`. When input
channel c is removed, the reader loses `x_c . W[c]` at every position; replacing x_c by a value
v_c (its mean on calibration data, or the constant it provably is) and folding `v_c . W[c]`
into b keeps the reader's output right on average (exactly, for a constant channel).

Two separate steps, so the same adjustment can be applied to more than one graph (the pruned
one, and a masked copy of the original used as an exact reference): `compensation_deltas`
computes per-reader bias changes in the reader's output channels *before* removal, keyed by
node name; `apply_bias_deltas` adds them to a graph, slicing to the kept output channels when
the reader's own outputs were pruned too.

Conv padding: a constant input channel contributes less at the borders, where some kernel taps
read padding. A bias cannot vary by position, so the fold is exact in the interior only; the
largest border error is measured per reader and reported (`BorderResidual`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Kept
from prunec.graph.channels import ChannelAnalysis, removed_atoms
from prunec.graph.ir import NameGen
from prunec.graph.linear import LinearLayer, NotLinear, linear_layer


@dataclass
class Reader:
    """A weight layer reading removed channels: which positions of its input channel axis."""

    layer: LinearLayer
    removed: np.ndarray  # indices along the input channel axis (pre-removal)


@dataclass
class BorderResidual:
    """Largest error left by a bias fold at a padded Conv's borders, and the bias change itself."""

    max_abs: float
    max_delta: float


@dataclass
class Compensation:
    """Bias changes per reader (node name -> [cout] in the pre-removal output channels)."""

    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    channels: int = 0  # removed (reader, channel) pairs folded
    border: dict[str, BorderResidual] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    #: An end-to-end check (see the channels pass): output error without and with, and the verdict.
    check: dict | None = None

    def summary(self) -> dict:
        worst = max(self.border.items(), key=lambda kv: kv[1].max_abs, default=None)
        return {"readers": len(self.deltas), "channels": self.channels,
                "border_residual": (None if worst is None else
                                    {"reader": worst[0], "max_abs": worst[1].max_abs,
                                     "max_bias_change": worst[1].max_delta}),
                **({"check": self.check} if self.check else {})}


def readers_of(analysis: ChannelAnalysis, removed_classes: set[int] | None = None
               ) -> tuple[list[Reader], list[tuple[str, str]]]:
    """Every layer consuming channels of the analysis (with the removed input positions when
    `removed_classes` is given, else all of them), and the consumers that are not linear layers."""
    mask = removed_atoms(analysis, removed_classes) if removed_classes is not None else None
    readers, skipped = [], []
    seen: set[int] = set()
    for s in analysis.sites:
        if s.role != "consumer" or id(s.node) in seen:
            continue
        seen.add(id(s.node))
        lab = analysis.labels.get(s.node.inputs[0].name)
        removed = (np.arange(lab.atoms.shape[0]) if mask is None else np.nonzero(mask[lab.atoms])[0]) \
            if lab is not None and lab.single else None
        if removed is None or len(removed) == 0 and mask is not None:
            continue
        try:
            layer = linear_layer(s.node, analysis.graph)
        except NotLinear as exc:
            skipped.append((s.node.name, str(exc)))
            continue
        readers.append(Reader(layer, removed))
    return readers, skipped


def compensation_deltas(readers: list[Reader], values: dict[str, np.ndarray],
                        spatial: dict[str, tuple[int, ...]] | None = None) -> Compensation:
    """Bias change of each reader for replacing its removed input channels by `values`
    (input tensor name -> one value per channel; NaN where unknown, which is left alone).
    `spatial` (input tensor name -> spatial dims) lets padded Convs report their border residual."""
    comp = Compensation()
    for r in readers:
        layer = r.layer
        v = values.get(layer.in_tensor.name)
        if v is None:
            comp.skipped.append((layer.name, "no value for its removed input channels"))
            continue
        pos = r.removed[np.isfinite(v[r.removed])]
        if len(pos) == 0:
            continue
        mats = layer.matrices()  # [g, cin_g * taps, cout_g]
        g, _, cout_g = mats.shape
        taps = max(layer.taps, 1)
        cin_g = layer.cin // g
        per_tap = np.zeros((layer.cout, taps))  # sum over removed channels of v_c * W[o, c, tap]
        for grp in range(g):
            sel = pos[(pos // cin_g) == grp]
            if len(sel) == 0:
                continue
            w = mats[grp].reshape(cin_g, taps, cout_g)[sel % cin_g]  # [k, taps, cout_g]
            per_tap[grp * cout_g:(grp + 1) * cout_g] += np.einsum("k,ktc->ct", v[sel], w)
        delta = per_tap.sum(axis=1)
        comp.channels += len(pos)
        if not np.any(delta):
            continue  # channels that were zero: nothing to fold (and no bias to add)
        comp.deltas[layer.name] = delta
        shape = (spatial or {}).get(layer.in_tensor.name)
        if layer.kind == "conv" and shape is not None:
            inside = layer.border_mask(tuple(shape))  # [taps, positions]
            err = float(np.max(np.abs(per_tap @ inside - delta[:, None]))) if inside.size else 0.0
            if err > 0:
                comp.border[layer.name] = BorderResidual(err, float(np.max(np.abs(delta))))
    return comp


def apply_bias_deltas(graph: gs.Graph, deltas: dict[str, np.ndarray], kept: Kept | None = None) -> None:
    """Add each delta to the bias of the node of that name (adding a bias where there is none).
    A delta longer than the node's output channels is sliced with `kept` (its pruned outputs)."""
    names = NameGen(graph)
    nodes = {n.name: n for n in graph.nodes}
    for name, delta in deltas.items():
        layer = linear_layer(nodes[name], graph)
        d = np.asarray(delta, dtype=np.float64)
        if d.size != layer.cout:
            axes = (kept or {}).get(layer.node.outputs[0].name, {})
            if len(axes) != 1:
                raise ValueError(f"{name}: delta has {d.size} channels, layer writes {layer.cout}, "
                                 "and no kept indices say which")
            d = d[next(iter(axes.values()))]
        layer.add_to_bias(d, names)


def constant_classes(analysis: ChannelAnalysis, classes: set[int]) -> set[int]:
    """Those of `classes` that every producer writes with all-zero weights: the channel is then
    its bias, followed by per-channel ops, so it holds one value everywhere (up to padding)."""
    if not classes:
        return set()
    wanted = np.zeros(len(analysis.roots), dtype=bool)  # class ids are atom ids: a lookup, not np.isin per site
    wanted[np.fromiter(classes, dtype=np.int64)] = True
    cls, silent = [], []  # per producer atom: its class, and whether its weights are all zero
    for s in analysis.sites:
        if s.role != "producer" or len(s.node.inputs) < 2 or s.tensor is not s.node.inputs[1]:
            continue
        w = np.asarray(s.tensor.values)
        n = min(len(s.atoms), w.shape[s.axis])
        at = np.nonzero(wanted[analysis.roots[s.atoms[:n]]])[0]  # only removed channels' rows
        if not len(at):
            continue
        sub = np.take(w, at, axis=s.axis)
        other = tuple(i for i in range(w.ndim) if i != s.axis)
        z = np.all(sub == 0, axis=other) if other else sub == 0
        cls.append(analysis.roots[s.atoms[at]])
        silent.append(np.asarray(z, dtype=bool))
    if not cls:
        return set()
    c, z = np.concatenate(cls), np.concatenate(silent)
    return set(np.setdiff1d(c[z], c[~z]).tolist())
