"""Which heads to remove: scores from weights, or from calibration data at the layers that read
the heads (the attention output projections).

`output`: the energy a head contributes to the projection's output, sum over tokens of
||x_h W_h||² (what removing it loses when nothing is re-fitted). `reconstruction`: what removing
a set of heads loses once the projection is re-fitted by least squares on the kept inputs (as
the `reconstruct` pass does): with G = [X 1]ᵀ[X 1] over calibration tokens, removing the columns
R and keeping K leaves tr(W_Rᵀ (G_RR − G_RK G_KK⁻¹ G_KR) W_R), the part of X_R W_R the kept inputs
cannot express. That is not additive over heads, so heads are chosen greedily, the cheapest
first, per layer.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from prunec.errors import OptionError
from prunec.graph.channels import ChannelAnalysis, ChannelGroup
from prunec.passes.calibration import capture


class Reader:
    """A MatMul/Gemm reading head classes: its input tensor, the class of each input column,
    its weight as [in, out], and the statistics gathered over calibration tokens."""

    def __init__(self, name: str, axis: int, roots: np.ndarray, weight: np.ndarray):
        self.name, self.axis, self.roots, self.weight = name, axis, roots, weight
        self.tokens = 0
        self.abs_sum = np.zeros(len(roots))
        self.gram = np.zeros((len(roots) + 1, len(roots) + 1))  # [X 1]ᵀ[X 1]

    def add(self, x: np.ndarray) -> None:
        x = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, -1).reshape(-1, len(self.roots))
        x1 = np.hstack([x, np.ones((len(x), 1))])
        self.tokens += len(x)
        self.abs_sum += np.abs(x).sum(axis=0)
        self.gram += x1.T @ x1

    def loss(self, removed: set[int], refit: bool) -> float:
        """Output energy lost (per token) when the classes `removed` go, with or without a refit."""
        r = np.nonzero(np.isin(self.roots, list(removed)))[0]
        if not len(r):
            return 0.0
        g = self.gram / max(self.tokens, 1)
        s = g[np.ix_(r, r)]
        if refit:
            k = np.setdiff1d(np.arange(len(g)), r)  # kept columns and the bias column
            # A pseudo-inverse: kept inputs that are linearly dependent (constant, duplicated) are fine.
            s = s - g[np.ix_(r, k)] @ scipy.linalg.pinvh(g[np.ix_(k, k)]) @ g[np.ix_(k, r)]
        w = self.weight[r]
        return float(np.trace(w.T @ s @ w))


def readers(analysis: ChannelAnalysis, groups: list[ChannelGroup]) -> list[Reader]:
    """The MatMul/Gemm layers whose input columns belong to the groups' classes."""
    wanted = list(set().union(*(g.classes for g in groups)))
    out = []
    for s in analysis.sites:
        if s.role != "consumer" or s.node.op not in ("MatMul", "Gemm"):
            continue
        roots = analysis.roots[s.atoms]
        lab = analysis.labels.get(s.node.inputs[0].name)
        if not np.isin(roots, wanted).any() or lab is None or not lab.single:
            continue
        w = np.asarray(s.tensor.values, dtype=np.float64)
        out.append(Reader(s.node.inputs[0].name, lab.axes[0], roots,
                          np.moveaxis(w, s.axis, 0).reshape(w.shape[s.axis], -1)))
    return out


def choose(analysis: ChannelAnalysis, groups: list[ChannelGroup], counts: dict[str, int], kind: str,
           data: dict[str, np.ndarray] | None) -> dict[str, set[int]]:
    """The classes to remove from each group (`counts[g.id]` of them), by importance `kind`."""
    from prunec.graph.channels import class_importance

    if kind == "l1":
        score = class_importance(analysis, "l1")
        return {g.id: set(sorted(g.classes, key=lambda c: (score[c], c))[:counts[g.id]]) for g in groups}
    rs = readers(analysis, groups)
    if not rs:
        raise OptionError(f"heads.importance={kind}: no MatMul/Gemm reads the heads (a fused attention "
                          "without an output projection); use importance=l1")
    for batch in capture(analysis.graph, [r.name for r in rs], data, what=f"heads.importance={kind}"):
        for r in rs:
            r.add(batch[r.name])
    removed: dict[str, set[int]] = {}
    for g in groups:
        mine = [r for r in rs if np.isin(r.roots, g.classes).any()]
        if kind == "activation":
            score = {c: sum(float(r.abs_sum[r.roots == c].sum()) / max(r.tokens, 1) for r in mine)
                     for c in g.classes}
            removed[g.id] = set(sorted(g.classes, key=lambda c: (score[c], c))[:counts[g.id]])
            continue
        chosen: set[int] = set()
        for _ in range(counts[g.id]):  # greedy: the head whose loss (given those gone) is least
            cost = {c: sum(r.loss(chosen | {c}, refit=kind == "reconstruction") for r in mine)
                    for c in g.classes if c not in chosen}
            chosen.add(min(cost, key=lambda c: (cost[c], c)))
        removed[g.id] = chosen
    return removed
