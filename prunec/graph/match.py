"""Which node of one model is which node of another, even when passes renamed them.

Matching runs in stages, each only on what is still unmatched, and every pair records how it
was found (`name`, `topology`, `order`):

1. by name: equal non-empty, unique names and the same op type;
2. by topology, to a fixed point: an unmatched node pairs with an unmatched node of the same op
   type whose inputs come from corresponding producers (matched nodes, or the same graph input)
   and whose outputs feed corresponding consumers; a pair is taken only when it is the single
   best candidate for both sides, so symmetric branches are never guessed;
3. by order, as a fallback: the remaining nodes of each model, in graph order, are aligned
   (longest common subsequence) first on op type plus weight shapes, then on op type alone,
   and topology runs again after each alignment.

Nothing here looks at tensor values, so the matching is cheap and deterministic.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field

import onnx

#: How a pair was found, strongest first.
MATCH_KINDS = ("name", "topology", "order")


@dataclass
class GraphIndex:
    """Producer/consumer lookup for one graph, by node index."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    producer: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (node, slot)
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # tensor -> [(node, slot)]
    inputs: dict[str, int] = field(default_factory=dict)  # graph input -> position
    outputs: dict[str, int] = field(default_factory=dict)  # graph output -> position
    constants: dict[str, tuple[int, ...]] = field(default_factory=dict)  # initializer -> dims

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphIndex":
        """Index `model`'s main graph."""
        g = model.graph
        ix = cls(model, list(g.node))
        ix.constants = {t.name: tuple(t.dims) for t in g.initializer}
        ix.constants.update({s.values.name: tuple(s.dims) for s in g.sparse_initializer})
        real_inputs = [vi.name for vi in g.input if vi.name not in ix.constants]
        ix.inputs = {name: i for i, name in enumerate(real_inputs)}
        ix.outputs = {vi.name: i for i, vi in enumerate(g.output)}
        consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, n in enumerate(ix.nodes):
            for k, t in enumerate(n.output):
                if t:
                    ix.producer[t] = (i, k)
            for k, t in enumerate(n.input):
                if t:
                    consumers[t].append((i, k))
        ix.consumers = dict(consumers)
        return ix

    def signature(self, i: int) -> tuple:
        """Op type plus the shapes of the node's constant inputs: what order matching compares."""
        n = self.nodes[i]
        return (n.domain, n.op_type, tuple(self.constants.get(t) for t in n.input))


@dataclass
class NodeMatching:
    """Pairs of node indices (before, after) with how each was found; the rest are removed/added."""

    pairs: dict[int, tuple[int, str]]  # before index -> (after index, kind)
    removed: list[int]
    added: list[int]

    def after_of(self, b: int) -> int | None:
        """The after-index matched to before-index `b`, if any."""
        hit = self.pairs.get(b)
        return hit[0] if hit else None


class _Matcher:
    def __init__(self, before: GraphIndex, after: GraphIndex):
        self.b, self.a = before, after
        self.fwd: dict[int, int] = {}
        self.back: dict[int, int] = {}
        self.kind: dict[int, str] = {}

    def pair(self, bi: int, ai: int, kind: str) -> None:
        self.fwd[bi], self.back[ai], self.kind[bi] = ai, bi, kind

    def same_op(self, bi: int, ai: int) -> bool:
        nb, na = self.b.nodes[bi], self.a.nodes[ai]
        return nb.op_type == na.op_type and nb.domain == na.domain

    # -- stage 1 -------------------------------------------------------------------------------
    def by_name(self) -> None:
        def unique(ix: GraphIndex) -> dict[str, int]:
            seen: dict[str, list[int]] = defaultdict(list)
            for i, n in enumerate(ix.nodes):
                if n.name:
                    seen[n.name].append(i)
            return {k: v[0] for k, v in seen.items() if len(v) == 1}

        ua = unique(self.a)
        for name, bi in unique(self.b).items():
            ai = ua.get(name)
            if ai is not None and self.same_op(bi, ai):
                self.pair(bi, ai, "name")

    # -- stage 2 -------------------------------------------------------------------------------
    def tensors_correspond(self, tb: str, ta: str) -> bool:
        """True when before-tensor `tb` and after-tensor `ta` are known to be the same value."""
        if not tb or not ta:
            return False
        pb, pa = self.b.producer.get(tb), self.a.producer.get(ta)
        if pb is not None and pa is not None:
            return self.fwd.get(pb[0]) == pa[0] and pb[1] == pa[1]
        if tb in self.b.inputs and ta in self.a.inputs:
            return tb == ta or self.b.inputs[tb] == self.a.inputs[ta]
        return False

    def score(self, bi: int, ai: int) -> int:
        """How many inputs and output uses of the two nodes are known to correspond."""
        nb, na = self.b.nodes[bi], self.a.nodes[ai]
        s = sum(self.tensors_correspond(tb, ta) for tb, ta in zip(nb.input, na.input))
        for tb, ta in zip(nb.output, na.output):
            uses_a = set(self.a.consumers.get(ta, ()))
            for (cb, slot) in self.b.consumers.get(tb, ()):
                ca = self.fwd.get(cb)
                if ca is not None and (ca, slot) in uses_a:
                    s += 1
            if tb in self.b.outputs and ta in self.a.outputs and (
                    tb == ta or self.b.outputs[tb] == self.a.outputs[ta]):
                s += 1
        return s

    def candidates(self, i: int, *, reverse: bool = False) -> set[int]:
        """Unmatched nodes of the other model, same op type, next to the partners of node i's
        matched neighbours (i is a before-node, or an after-node when `reverse`)."""
        src, dst = (self.a, self.b) if reverse else (self.b, self.a)
        fwd, taken = (self.back, self.fwd) if reverse else (self.fwd, self.back)
        node = src.nodes[i]
        found: set[int] = set()
        for slot, t in enumerate(node.input):
            for u in self._partner_tensors(t, src, dst, fwd):
                found.update(c for c, s in dst.consumers.get(u, ()) if s == slot)
        for k, t in enumerate(node.output):
            for (c, slot) in src.consumers.get(t, ()):
                cd = fwd.get(c)
                if cd is not None and slot < len(dst.nodes[cd].input):
                    p = dst.producer.get(dst.nodes[cd].input[slot])
                    if p is not None and p[1] == k:
                        found.add(p[0])
            if t in src.outputs:
                pos = src.outputs[t]
                for u, upos in dst.outputs.items():
                    if u == t or upos == pos:
                        p = dst.producer.get(u)
                        if p is not None and p[1] == k:
                            found.add(p[0])
        node_ops = (node.op_type, node.domain)
        return {j for j in found
                if j not in taken and (dst.nodes[j].op_type, dst.nodes[j].domain) == node_ops}

    @staticmethod
    def _partner_tensors(t: str, src: GraphIndex, dst: GraphIndex, fwd: dict[int, int]) -> list[str]:
        p = src.producer.get(t)
        if p is not None:
            j = fwd.get(p[0])
            if j is None or p[1] >= len(dst.nodes[j].output):
                return []
            return [dst.nodes[j].output[p[1]]]
        if t in src.inputs:
            if t in dst.inputs:
                return [t]
            pos = src.inputs[t]
            return [u for u, i in dst.inputs.items() if i == pos]
        return []

    def _neighbours(self, bi: int) -> set[int]:
        n = self.b.nodes[bi]
        out = {self.b.producer[t][0] for t in n.input if t in self.b.producer}
        for t in n.output:
            out.update(c for c, _ in self.b.consumers.get(t, ()))
        return out

    def by_topology(self) -> None:
        # Only nodes next to a new match can gain a candidate or score, and only nodes that were
        # blocked by a tie can be unblocked by a competitor's match elsewhere: a worklist keeps
        # this linear in practice instead of rescanning the whole graph every round.
        work = {bi for bi in range(len(self.b.nodes)) if bi not in self.fwd}
        scores: dict[tuple[int, int], int] = {}

        def score(bi: int, ai: int) -> int:
            key = (bi, ai)
            if key not in scores:
                scores[key] = self.score(bi, ai)
            return scores[key]

        while work:
            scores.clear()  # scores depend on the matches made so far
            best_b: dict[int, list[tuple[int, int]]] = {}
            for bi in sorted(work):
                if bi not in self.fwd:
                    opts = [(score(bi, ai), ai) for ai in self.candidates(bi)]
                    best_b[bi] = [(s, ai) for s, ai in opts if s > 0]
            scored = sorted(((s, bi, ai) for bi, opts in best_b.items() for s, ai in opts),
                            key=lambda x: (-x[0], x[1], x[2]))
            best_a: dict[int, list[tuple[int, int]]] = {}
            for _, _, ai in scored:
                if ai not in best_a:  # every before-node that could score with ai, not only `work`
                    opts = [(score(bj, ai), bj) for bj in self.candidates(ai, reverse=True)]
                    best_a[ai] = [(s, bj) for s, bj in opts if s > 0]
            new: list[int] = []
            for s, bi, ai in scored:
                if bi in self.fwd or ai in self.back:
                    continue
                if self._unique_best(best_b[bi], s, ai) and self._unique_best(best_a[ai], s, bi):
                    self.pair(bi, ai, "topology")
                    new.append(bi)
            if not new:
                return
            blocked = {bi for bi, opts in best_b.items() if opts and bi not in self.fwd}
            work = blocked | {x for bi in new for x in self._neighbours(bi) if x not in self.fwd}

    def _unique_best(self, options: list[tuple[int, int]], s: int, who: int) -> bool:
        return all(other == who or os_ < s for os_, other in options)

    # -- stage 3 -------------------------------------------------------------------------------
    def by_order(self, key) -> int:
        rb = [i for i in range(len(self.b.nodes)) if i not in self.fwd]
        ra = [i for i in range(len(self.a.nodes)) if i not in self.back]
        if not rb or not ra:
            return 0
        sm = difflib.SequenceMatcher(None, [key(self.b, i) for i in rb], [key(self.a, i) for i in ra],
                                     autojunk=False)
        new = 0
        for block in sm.get_matching_blocks():
            for k in range(block.size):
                self.pair(rb[block.a + k], ra[block.b + k], "order")
                new += 1
        return new


def match_nodes(before: onnx.ModelProto | GraphIndex, after: onnx.ModelProto | GraphIndex) -> NodeMatching:
    """Pair the nodes of two models (or their prebuilt indexes): by name, then topology, then
    graph order (see the module docstring)."""
    m = _Matcher(*(x if isinstance(x, GraphIndex) else GraphIndex.of(x) for x in (before, after)))
    m.by_name()
    m.by_topology()
    for key in (GraphIndex.signature, lambda ix, i: (ix.nodes[i].domain, ix.nodes[i].op_type)):
        if m.by_order(key):
            m.by_topology()
    pairs = {bi: (ai, m.kind[bi]) for bi, ai in sorted(m.fwd.items())}
    removed = [i for i in range(len(m.b.nodes)) if i not in m.fwd]
    added = [i for i in range(len(m.a.nodes)) if i not in m.back]
    return NodeMatching(pairs, removed, added)
