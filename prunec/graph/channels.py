"""Channel dependency analysis: which channels must be removed together, and where they live.

Every output channel of a *producer* (Conv/ConvTranspose/Gemm/MatMul with a constant weight)
is an **atom**. Walking the graph in topological order, each tensor gets a `Label`: the atom
carried by every position of its channel axes. One rule per op family says how labels flow
through that op (`prunec.graph.rules`): element-wise joins *union* atoms,
Concat/Split/Slice/Reshape/Transpose are list operations on labels, and anything without a
rule **freezes** the atoms it touches. Union-find classes are the removable channels; every constant slice that a class
touches is a `WeightSite`, and the few attributes/shape constants that encode channel counts
are fixed up by the op's rule after removal.

A wrong graph is never an acceptable outcome; a frozen class is. The analysis reads the graph
and never mutates it; `apply_removal` does the rewrite.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.graph import rules  # noqa: F401  (registers the channel rules)
from prunec.graph.channel_core import (Contraction, Kept, Label, Mode, UnionFind, Walker, WeightSite,
                                       find_rule)
from prunec.graph.fold import fold_constants, graph_shapes
from prunec.graph.int_sets import member, unique
from prunec.graph.ir import name_unnamed_nodes, toposort


# ----------------------------------------------------------------------------------------------
# Groups


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
    #: Activation x activation sums over channels (attention), for the masked-original proof.
    contractions: list[Contraction] = field(default_factory=list)
    mode: Mode = Mode()
    #: Atoms on the head axis of attention products (heads mode): see `head_classes`.
    head_atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: Normalizations whose statistics change with the channels they see (hidden mode).
    statistics: list[tuple[gs.Node, np.ndarray]] = field(default_factory=list)
    #: Graph inputs and outputs whose channel axes may change (interface mode).
    interface: dict[str, Label] = field(default_factory=dict)
    #: Tensor shapes the analysis ran at (concrete where the inputs were resolved).
    shapes: dict[str, tuple] = field(default_factory=dict)

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
# Analysis entry point


def analyze_channels(graph_or_model: gs.Graph | onnx.ModelProto, *, input_shapes: dict | None = None,
                     protect: str | None = None, mode: Mode = Mode()) -> ChannelAnalysis:
    """Find channel groups of a graph (or, with `mode`, attention heads and the hidden width).

    A ModelProto is imported and constant-folded first (weights behind Identity or shape
    arithmetic become readable), as the `channels` pass does. A gs.Graph is analysed as it is,
    except that its nodes are sorted and unnamed nodes get names (group ids name producers):
    fold it first (`prunec.graph.fold.fold_constants`) for the same result as the pass.
    """
    if isinstance(graph_or_model, onnx.ModelProto):
        graph = fold_constants(gs.import_onnx(graph_or_model), input_shapes)
    else:
        graph = graph_or_model
    toposort(graph)
    name_unnamed_nodes(graph)
    shapes = graph_shapes(graph, input_shapes)
    w = Walker(graph, shapes, graph_opsets(graph), mode)
    out_names = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        fn = find_rule(node.op, node.domain, w.opsets.get(node.domain or ""))
        if fn is None:
            w.freeze_node(node)
            continue
        fn(w, node)
        # A rule must label or freeze every output it lets channels reach (MaxPool's Indices,
        # Dropout's mask, LayerNorm's Mean): whatever it did not follow cannot change.
        for o in w.unlabeled_outputs(node, out_names):
            w.freeze_node(node, f"{node.op} {node.name!r}: output {o.name!r} carries channels "
                                "that its rule does not follow")
    for t in graph.outputs:
        if w.label(t) is not None:
            w.interface_tensor(t, w.label(t), f"reaches graph output {t.name!r}")
    for check in w.checks:
        check(w)
    for node in graph.nodes:
        for name in _subgraph_reads(node):
            w.freeze(w.labels.get(name), f"read inside the subgraph of {node.op} {node.name!r}")
    _check_shared_constants(w, graph)
    prot = re.compile(protect) if protect else None
    n = len(w.uf)
    roots = w.uf.roots()
    names = [name for _, _, name in w.producer_ranges]
    producer = np.full(n, -1, dtype=np.int64)
    for k, (start, count, _) in enumerate(w.producer_ranges):
        producer[start:start + count] = k
    groups = _make_groups(w, roots, producer, names, prot)
    heads = unique(np.concatenate([a.ravel() for a in w.head_atoms])) if w.head_atoms \
        else np.zeros(0, np.int64)
    return ChannelAnalysis(graph, groups, w.sites, w.uf, w.labels, w.frozen, w.fixups, roots,
                           producer, names, w.contractions, mode, heads, w.statistics, w.interface, shapes)


def protect_early(analysis: ChannelAnalysis, fraction: float) -> list[str]:
    """Freeze the groups any of whose producers runs within the first `fraction` of the model's
    MACs, counted in graph order up to and including the producer (`graph.costs.mac_positions`).
    Early layers tolerate far less pruning than late ones. Returns the ids frozen here."""
    from prunec.graph.costs import mac_positions

    if fraction <= 0:
        return []
    pos = mac_positions(analysis.graph, analysis.shapes)
    if pos is None:
        from prunec.errors import OptionError

        raise OptionError("channels.protect-early needs the MACs of every layer, and some depend on "
                          "input dims prunec could not size: give them with --input-shape")
    frozen = []
    for g in analysis.groups:
        if g.frozen is None and any(pos.get(p, 1.0) <= fraction for p in g.producers):
            first = min(pos.get(p, 1.0) for p in g.producers)
            g.frozen = (f"early: produced within the first {first:.1%} of the model's MACs "
                        f"(channels.protect-early={fraction:g})")
            frozen.append(g.id)
    return frozen


def graph_opsets(graph: gs.Graph) -> dict[str, int]:
    """Opset version per imported domain ("" for the default one) of a graphsurgeon graph."""
    out = {"" if imp.domain in ("", "ai.onnx") else imp.domain: int(imp.version)
           for imp in graph.import_domains or ()}
    if graph.opset:
        out[""] = int(graph.opset)
    return out


def _subgraph_reads(node: gs.Node) -> set[str]:
    """Names of tensors read inside a node's subgraphs (If/Loop/Scan bodies), at any depth:
    they are outer tensors the subgraph uses implicitly, so their channels cannot change."""
    names: set[str] = set()
    for value in node.attrs.values():
        for g in (value if isinstance(value, list) else [value]):
            if isinstance(g, gs.Graph):
                for inner in g.nodes:
                    names.update(t.name for t in inner.inputs if t.name)
                    names |= _subgraph_reads(inner)
    return names


def _check_shared_constants(w: Walker, graph: gs.Graph) -> None:
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
                w.uf.union_many(group[0].atoms, s.atoms)


def _make_groups(w: Walker, roots: np.ndarray, producer: np.ndarray, names: list[str],
                 prot: re.Pattern | None) -> list[ChannelGroup]:
    """Group classes by the set of producers their atoms come from (vectorized: a model has
    tens of thousands of classes, and a Python loop over them cost more than the rest of the
    analysis)."""
    order = {n.name: i for i, n in enumerate(w.graph.nodes)}
    rank = np.array([order.get(nm, 0) for nm in names] + [0], dtype=np.int64)
    frozen_root: dict[int, str] = {}
    for a, why in w.frozen.items():
        frozen_root.setdefault(int(roots[a]), why)
    has = producer >= 0
    n_prod = len(names) + 1
    pair = unique(roots[has] * n_prod + producer[has])  # sorted by root, then producer
    r_of, p_of = pair // n_prod, pair % n_prod
    # Each class's producers in graph order (ties by producer index, as a stable sort of the
    # per-root list that is ascending by producer gives), as a padded row; equal rows: one group.
    by = np.lexsort((p_of, rank[p_of], r_of))
    r_of, p_of = r_of[by], p_of[by]
    class_roots, first, count = np.unique(r_of, return_index=True, return_counts=True)
    if not len(class_roots):
        return []
    width = int(count.max()) if len(count) else 0
    keys_m = np.full((len(class_roots), width), -1, dtype=np.int64)
    row = np.repeat(np.arange(len(class_roots)), count)
    col = np.arange(len(r_of)) - np.repeat(first, count)
    keys_m[row, col] = p_of
    uniq, key_first, key_of_root = np.unique(keys_m, axis=0, return_index=True, return_inverse=True)
    key_of_root = key_of_root.ravel()
    # Groups in order of their first (smallest) class, as the roots come sorted.
    key_order = np.argsort(key_first, kind="stable")
    gi_of_key = np.empty(len(uniq), dtype=np.int64)
    gi_of_key[key_order] = np.arange(len(uniq))
    gi_of_class = gi_of_key[key_of_root]
    group_of_root = np.full(len(roots), -1, dtype=np.int64)
    group_of_root[class_roots] = gi_of_class
    members = np.argsort(gi_of_class, kind="stable")  # classes ascending within each group
    bounds = np.searchsorted(gi_of_class[members], np.arange(len(uniq) + 1))
    # Which layers touch each group: one (site, group) pair per distinct meeting.
    touched: list[set[str]] = [set() for _ in range(len(uniq))]
    if w.sites:
        site_of = np.repeat(np.arange(len(w.sites)), [s.atoms.size for s in w.sites])
        gis = group_of_root[roots[np.concatenate([s.atoms.ravel() for s in w.sites])]]
        keep = gis >= 0
        met = unique(site_of[keep] * len(uniq) + gis[keep])
        for si, gi in zip((met // len(uniq)).tolist(), (met % len(uniq)).tolist()):
            touched[gi].add(w.sites[si].node.name)
    groups = []
    for gi in range(len(uniq)):
        key = uniq[key_order[gi]]
        prods = [names[p] for p in key[key >= 0]]
        classes = class_roots[members[bounds[gi]:bounds[gi + 1]]].tolist()
        frozen = next((frozen_root[r] for r in classes if r in frozen_root), None)
        if frozen is None and prot is not None and any(prot.search(p) for p in prods):
            frozen = "protected by the protect option"
        layers = sorted(touched[gi], key=lambda nm: order.get(nm, 0))
        groups.append(ChannelGroup(id=prods[0], producers=prods, classes=classes,
                                   depth=order.get(prods[0], 0), frozen=frozen, layers=layers))
    groups.sort(key=lambda g: g.depth)
    _disambiguate_ids(groups, w, roots, producer, names)
    return groups


def _disambiguate_ids(groups: list[ChannelGroup], w: Walker, roots: np.ndarray, producer: np.ndarray,
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
            offset = int(mine[member(roots[mine], g.classes, len(roots))].min()) - starts[gid]
            g.id = f"{gid}@{offset}"


def head_groups(analysis: ChannelAnalysis) -> list[ChannelGroup]:
    """The groups whose classes are attention heads (or, for grouped-query attention, KV groups
    with their query heads): every class lies on the head axis of an attention product.
    Meaningful for an analysis in heads mode; other groups are the `channels` pass's business."""
    heads = set(analysis.roots[analysis.head_atoms].tolist())
    return [g for g in analysis.groups if g.classes and set(g.classes) <= heads]


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
            # Weights of any float dtype rank in float32 or wider; integer constants (indices,
            # quantized weights without their scales) are no measure of importance.
            v = np.asarray(s.magnitude if s.magnitude is not None else s.tensor.values)
            if v.dtype.kind != "f" and "float" not in v.dtype.name:
                continue
            v = v.astype(np.float32, copy=False)
            m = np.square(v, dtype=np.float64) if kind == "l2" else np.abs(v)
            magnitude[id(s.tensor)] = m
        other = tuple(i for i in range(m.ndim) if i != s.axis)
        per = m.sum(axis=other, dtype=np.float64) if other else m.astype(np.float64)
        score += np.bincount(analysis.roots[s.atoms], weights=per, minlength=n)
    return np.sqrt(score) if kind == "l2" else score


def interface_changes(analysis: ChannelAnalysis, removed_classes: set[int]) -> dict[str, dict[int, list[int]]]:
    """Graph inputs and outputs whose channel axes lose positions (interface mode): name ->
    axis -> indices kept, for verifying the result against the original on sliced data."""
    removed_atom = removed_atoms(analysis, removed_classes)
    out: dict[str, dict[int, list[int]]] = {}
    for name, lab in analysis.interface.items():
        mask = ~removed_atom[lab.atoms]
        if mask.all():
            continue
        per_axis = {}
        for k, ax in enumerate(lab.axes):
            other = tuple(i for i in range(mask.ndim) if i != k)
            keep = np.nonzero(mask.any(axis=other) if other else mask)[0]
            if len(keep) < mask.shape[k]:
                per_axis[ax] = keep.tolist()
        out[name] = per_axis
    return out


def statistics_notes(analysis: ChannelAnalysis, removed_classes: set[int]) -> list[str]:
    """One line per normalization whose statistics now cover fewer channels (hidden mode)."""
    removed_atom = removed_atoms(analysis, removed_classes)
    by_change: dict[tuple, list[str]] = defaultdict(list)
    for node, atoms in analysis.statistics:
        gone = int(removed_atom[atoms].sum())
        if gone:
            by_change[(node.op, len(atoms) - gone, len(atoms))].append(node.name)
    return [f"{len(names)} {op} statistics now over {kept} of {total} channels (lossy): "
            + ", ".join(repr(n) for n in names[:2]) + (", ..." if len(names) > 2 else "")
            for (op, kept, total), names in by_change.items()]


def removed_atoms(analysis: ChannelAnalysis, removed_classes: set[int]) -> np.ndarray:
    """Boolean per atom: does it belong to a removed class."""
    return member(analysis.roots, np.fromiter(removed_classes, dtype=np.int64), len(analysis.roots))


def kept_indices(analysis: ChannelAnalysis, removed_classes: set[int]) -> Kept:
    """Kept indices of every labeled tensor along each of its channel axes after removal."""
    removed_atom = removed_atoms(analysis, removed_classes)
    kept: Kept = {}
    for name, lab in analysis.labels.items():
        mask = ~removed_atom[lab.atoms]
        per_axis = {}
        for k, ax in enumerate(lab.axes):
            other = tuple(i for i in range(mask.ndim) if i != k)
            per_axis[ax] = np.nonzero(mask.any(axis=other) if other else mask)[0]
        kept[name] = per_axis
    return kept


def apply_removal(analysis: ChannelAnalysis, removed_classes: set[int], kept: Kept | None = None) -> dict[str, int]:
    """Delete every slice of the removed classes from the graph, then fix shape constants.
    `kept`: `kept_indices(analysis, removed_classes)`, where the caller has it already."""
    graph = analysis.graph
    removed_atom = removed_atoms(analysis, removed_classes)
    # Kept indices of every labeled tensor along each channel axis, for the fixups.
    if kept is None:
        kept = kept_indices(analysis, removed_classes)
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
    # Graph inputs and outputs allowed to change (interface mode) declare their new sizes.
    tensors = graph.tensors()
    for name in analysis.interface:
        t = tensors.get(name)
        if t is not None and t.shape is not None:
            t.shape = [len(kept[name][ax]) if ax in kept.get(name, {}) else d for ax, d in enumerate(t.shape)]
    # Intermediate shapes are stale now; shape inference recomputes them on export.
    outs = {id(t) for t in graph.outputs} | {id(t) for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in outs:
            t.shape = None
    return {"sliced_constants": sliced_weights, "removed_atoms": int(removed_atom.sum())}
