"""Output-aware channel selection: remove the channels whose loss the readers notice least.

For a reader computing `patch @ W`, removing a set S of its input channels changes its output
by `e = sum_{c in S} z_c` with `z_c = patch_c @ W_c` (channel c's share). Over calibration rows,
`E||e||^2 = 1_S^T G 1_S` with `G[c, c'] = sum over taps of (W W^T) * E[patch patch^T]` restricted
to channels c, c' (ThiNet; He et al. 2017 without the LASSO). With mean compensation the
removed channels' means are folded back, so the covariance replaces the second moment.
Every reader of a group adds its G, normalized by its own output energy so that a loud layer
does not outvote a quiet one; a greedy forward selection then picks, one class at a time, the
class that adds least error given those already picked (which accounts for channels that cancel
or duplicate each other, unlike a per-channel score).
"""

from __future__ import annotations

import numpy as np

from prunec.graph.channels import ChannelAnalysis
from prunec.graph.compensation import Reader
from prunec.graph.linear import PatchStats


def class_grams(analysis: ChannelAnalysis, readers: list[Reader], stats: dict[str, PatchStats],
                centered: bool) -> dict[int, np.ndarray]:
    """Per channel-group index, the [size, size] Gram of the classes' contributions to their
    readers' outputs, each reader normalized by its output energy."""
    group_of: dict[int, tuple[int, int]] = {}  # class root -> (group index, position in group)
    for gi, g in enumerate(analysis.groups):
        if g.frozen:
            continue
        for k, c in enumerate(g.classes):
            group_of[int(c)] = (gi, k)
    grams = {gi: np.zeros((g.size, g.size)) for gi, g in enumerate(analysis.groups) if not g.frozen}
    for r in readers:
        st = stats.get(r.layer.name)
        if st is None or st.n == 0:
            continue
        layer = r.layer
        lab = analysis.labels[layer.in_tensor.name]
        roots = analysis.roots[lab.atoms]
        mats = layer.matrices()  # [g, d, cout_g]
        cov = st.second_moment(centered)  # [g, d, d]
        taps = max(layer.taps, 1)
        cin_g = layer.cin // layer.groups
        energy = sum(float(np.sum((c @ m) * m)) for m, c in zip(mats, cov))
        if energy <= 0:
            continue
        for grp in range(layer.groups):
            m, c = mats[grp], cov[grp]
            k = (m @ m.T) * c  # [d, d]: tap-level contribution products
            ch = k.reshape(cin_g, taps, cin_g, taps).sum(axis=(1, 3)) / energy
            pos_roots = roots[grp * cin_g:(grp + 1) * cin_g]
            where = [group_of.get(int(x), (-1, -1)) for x in pos_roots]
            gids = np.array([w[0] for w in where])
            local = np.array([w[1] for w in where])
            for gi in np.unique(gids[gids >= 0]):
                sel = np.nonzero(gids == gi)[0]
                li = local[sel]
                np.add.at(grams[int(gi)], (li[:, None], li[None, :]), ch[np.ix_(sel, sel)])
    return grams


def greedy_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes in the order a greedy forward selection removes them (least added error first),
    and the total error after each removal."""
    n = gram.shape[0]
    picked = np.zeros(n, dtype=bool)
    cross = np.zeros(n)  # gram @ 1_S
    order, total = [], []
    err = 0.0
    diag = np.diag(gram).copy()
    for _ in range(n):
        cost = np.where(picked, np.inf, diag + 2 * cross)
        c = int(np.argmin(cost))
        err += float(cost[c])
        picked[c] = True
        cross += gram[:, c]
        order.append(c)
        total.append(err)
    return np.asarray(order, dtype=np.int64), np.asarray(total)


def reconstruction_scores(analysis: ChannelAnalysis, readers: list[Reader], stats: dict[str, PatchStats],
                          centered: bool, fallback: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per-class scores whose ascending order is each group's greedy removal order; the score
    is the running maximum of the relative output error after removal (comparable across
    groups). Groups none of whose readers had data keep `fallback`'s order; their ids are
    returned."""
    scores = np.array(fallback, dtype=np.float64, copy=True)
    grams = class_grams(analysis, readers, stats, centered)
    fell_back = []
    for gi, g in enumerate(analysis.groups):
        if g.frozen:
            continue
        gram = grams[gi]
        if not np.any(gram):
            fell_back.append(g.id)
            continue
        order, total = greedy_order(gram)
        running = np.maximum.accumulate(total)
        # Ties (channels that add no error) must keep the greedy order: add a tiny ramp.
        ramp = np.arange(len(order)) * (1e-12 * max(float(running[-1]), 1e-30))
        classes = np.asarray(g.classes)
        scores[classes[order]] = running + ramp
    return scores, fell_back
