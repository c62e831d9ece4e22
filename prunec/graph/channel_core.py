"""The machinery channel rules run on: atoms, labels, weight sites, the walker, the registry.

See `prunec.graph.channels` for the idea; `prunec.graph.rules` holds the rules, one module per op family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.int_sets import unique


# ----------------------------------------------------------------------------------------------
# Core data structures


class UnionFind:
    """Union-find over integer atoms, growable. Every set's root is its smallest atom, so the
    classes do not depend on the order of unions. Parents live in a numpy array, so that the
    unions of whole labels (`union_many`: a residual join unites thousands of atom pairs) and
    the final `roots` run vectorized."""

    def __init__(self) -> None:
        self._p = np.zeros(1024, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def parent(self) -> np.ndarray:
        """Parent of every atom (a root is its own parent)."""
        return self._p[: self._n]

    def make(self, n: int) -> np.ndarray:
        start = self._n
        if start + n > len(self._p):
            grown = np.zeros(max(2 * len(self._p), start + n), dtype=np.int64)
            grown[:start] = self._p[:start]
            self._p = grown
        atoms = np.arange(start, start + n, dtype=np.int64)
        self._p[start:start + n] = atoms
        self._n = start + n
        return atoms

    def find(self, a: int) -> int:
        p = self._p
        root = int(a)
        while p[root] != root:
            root = int(p[root])
        a = int(a)
        while a != root:
            p[a], a = root, int(p[a])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self._p[max(ra, rb)] = min(ra, rb)

    def find_many(self, x: np.ndarray) -> np.ndarray:
        """The root of every atom in the integer array `x`."""
        p = self._p
        r = p[x]
        while True:
            up = p[r]
            if np.array_equal(up, r):
                break
            r = up
        p[x] = r  # compress the queried paths
        return r

    def union_many(self, a, b) -> None:
        """Unite a[i] with b[i] for every i (arrays of equal size, any shape)."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        while a.size:
            ra, rb = self.find_many(a), self.find_many(b)
            differ = ra != rb
            if not differ.any():
                return
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            # Hook each larger root under the smallest root it meets this round; the pairs it
            # did not take are united in the next round, through their new roots.
            np.minimum.at(self._p, np.maximum(ra, rb), np.minimum(ra, rb))

    def roots(self) -> np.ndarray:
        """The root (class) of every atom."""
        p = self._p[: self._n]
        while True:
            up = p[p]
            if np.array_equal(up, p):
                return p.copy()
            p[:] = up


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
    #: Real-valued weights to rank channels by when `tensor` is not them (a quantized weight's
    #: dequantized values); None: the tensor's own values if floating point, else no importance.
    magnitude: np.ndarray | None = None


@dataclass
class WeightView:
    """A weight that reaches its layer through an op, e.g. DequantizeLinear(int8 constant):
    its shape, and how to record a site on it (on the constants that actually hold it)."""

    shape: tuple[int, ...]
    record: Callable[["Walker", gs.Node, int, np.ndarray, str], None]


#: Functions that recognise a weight view behind a tensor (registered by rule modules).
WEIGHT_VIEWS: list[Callable[[gs.Tensor], WeightView | None]] = []


def weight_view(t: gs.Tensor) -> WeightView | None:
    """The weight view behind a non-constant tensor, if a rule module recognises one."""
    for fn in WEIGHT_VIEWS:
        v = fn(t)
        if v is not None:
            return v
    return None


@dataclass(frozen=True)
class Mode:
    """What one analysis removes. The same rules serve every mode; only a few choices differ.

    `heads`: a channel axis split in two (`[heads*head_dim] -> [heads, head_dim]`) couples each
    *row* (a whole head) instead of each column (one head_dim index in every head), so a class is
    a head. `hidden`: normalizations across the channel axis (LayerNorm, RMSNorm, their
    decomposed ReduceMean forms) let channels through, which changes their statistics (lossy).
    `interface` (heads mode only): heads that reach a graph input or output may change its
    shape (a KV cache carrying the head count) instead of freezing."""

    heads: bool = False
    hidden: bool = False
    interface: bool = False


#: Freeze reasons that only an interface change would lift start with this.
INTERFACE = "the model's interface"


@dataclass
class Contraction:
    """Input `index` of `node` is summed over its channel axes (`axes`, carrying `atoms`) against
    another activation: attention's Q·Kᵀ and A·V. Like a consumer weight site, it is a place where
    a removed channel would still reach kept values; the masked-original proof
    (`prunec.graph.proof`) masks the channel here, as it zeroes consumer weight slices."""

    node: gs.Node
    index: int
    rank: int
    axes: tuple[int, ...]
    atoms: np.ndarray


# ----------------------------------------------------------------------------------------------
# The walk


class Walker:
    """Holds state while rules run over the graph in topological order."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], opsets: dict[str, int] | None = None,
                 mode: Mode = Mode()):
        self.graph = graph
        self.shapes = shapes
        #: Opset version per domain ("" for the default domain), for rules whose op changed.
        self.opsets = opsets or {}
        self.mode = mode
        #: Atoms on the head axis of an attention product (Q·Kᵀ): what the heads pass removes.
        self.head_atoms: list[np.ndarray] = []
        #: Normalizations whose statistics change when channels go (hidden mode): (node, atoms).
        self.statistics: list[tuple[gs.Node, np.ndarray]] = []
        #: Graph inputs and outputs whose channel axes may change (interface mode): name -> Label.
        self.interface: dict[str, Label] = {}
        self.uf = UnionFind()
        self.labels: dict[str, Label] = {}
        self.sites: list[WeightSite] = []
        self.frozen: dict[int, str] = {}
        self.fixups: list[tuple[gs.Node, Callable]] = []
        self.producer_ranges: list[tuple[int, int, str]] = []
        self.contractions: list[Contraction] = []
        #: Outputs a rule declares free of channels although its inputs carry some (a shape,
        #: a contraction's result); every other output of a node with labeled inputs must be
        #: labeled, or the walker freezes the inputs (see `unlabeled_outputs`).
        self.channel_free: set[str] = set()
        #: Checks run once the walk is over (e.g. a viewed weight read by an op that is not pruned).
        self.checks: list[Callable[[Walker], None]] = []

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
        for a in unique(lab.atoms):
            self.frozen.setdefault(int(a), why)

    def freeze_node(self, node: gs.Node, why: str | None = None) -> None:
        why = why or f"{node.op} {node.name!r} has no channel rule"
        for t in node.inputs:
            self.freeze(self.label(t), why)

    def union_labels(self, a: Label, b: Label) -> None:
        n = min(a.atoms.size, b.atoms.size)  # as zip would pair them
        self.uf.union_many(a.atoms.ravel()[:n], b.atoms.ravel()[:n])

    def site(self, node, tensor, axis, atoms, role, magnitude=None) -> None:
        if not isinstance(tensor, gs.Constant):
            view = weight_view(tensor)
            if view is not None:
                view.record(self, node, axis, np.asarray(atoms, dtype=np.int64), role)
                return
        self.sites.append(WeightSite(node, tensor, axis, np.asarray(atoms, dtype=np.int64), role,
                                     magnitude))

    # -- helpers for split axes and attention
    def couple_split(self, grid: np.ndarray) -> None:
        """Make removal along a channel axis split in two (`grid[i, j]`) rectangular: unite each
        column (one index j in every part: shuffles, head_dim) or, in heads mode, each row (a
        whole part: a head)."""
        grid = np.asarray(grid)
        lines = grid if self.mode.heads else grid.T
        if lines.ndim == 2 and lines.shape[1] > 1:
            self.uf.union_many(np.broadcast_to(lines[:, :1], lines[:, 1:].shape), lines[:, 1:])

    def uniform_along(self, lab: Label, k: int) -> bool:
        """Whether label axis number `k` is never cut: along it, every position already holds
        one class (a head's head_dim in heads mode). Unions only merge classes, so it stays so."""
        a = np.moveaxis(lab.atoms, k, -1)
        roots = self.uf.find_many(a.ravel()).reshape(a.shape) if a.size else a
        return bool(np.all(roots == roots[..., :1]))

    def union_broadcast(self, small: Label, big: Label) -> bool:
        """Unite `small`'s atoms with `big`'s wherever they meet, when `small`'s axes are a
        subset of `big`'s with equal sizes (`small` repeats along the others). False otherwise."""
        if not set(small.axes) <= set(big.axes):
            return False
        pos = [big.axes.index(a) for a in small.axes]
        if any(big.atoms.shape[p] != n for p, n in zip(pos, small.atoms.shape)):
            return False
        s = np.transpose(small.atoms, np.argsort(pos))  # small's axes in big's order
        view = [1] * big.atoms.ndim
        for p, n in zip(sorted(pos), s.shape):
            view[p] = n
        s = s.reshape(view)
        self.uf.union_many(np.broadcast_to(s, big.atoms.shape), big.atoms)
        return True

    def adopt_interface(self, t: gs.Tensor, like: Label, why: str) -> Label | None:
        """Fresh atoms for a graph input `t` that joins channels laid out as `like` (a KV cache
        concatenated with new keys). Outside interface mode they are frozen with `why`."""
        if not any(t is i for i in self.graph.inputs):
            return None
        if self.label(t) is not None:
            return self.label(t)
        lab = Label(like.axes, self.uf.make(like.atoms.size).reshape(like.atoms.shape))
        self.set(t, lab)
        self.interface_tensor(t, lab, why)
        return lab

    def interface_tensor(self, t: gs.Tensor, lab: Label, why: str) -> None:
        """`t`, a graph input or output, carries `lab`: it may change only in interface mode."""
        if self.mode.interface:
            self.interface[t.name] = lab
        else:
            self.freeze(lab, f"{why}: {INTERFACE}" + (
                " (--allow-interface-change lets the heads pass change it)" if self.mode.heads else ""))

    def contraction(self, node: gs.Node, index: int, rank: int, lab: Label) -> None:
        """Record that `node` sums input `index` (of `rank`) over the channels of `lab`."""
        self.contractions.append(Contraction(node, index, rank, lab.axes,
                                             np.asarray(lab.atoms, dtype=np.int64)))

    def no_channels(self, t: gs.Tensor) -> None:
        """Declare that output `t` carries no channels although the node's inputs do."""
        if t is not None and t.name:
            self.channel_free.add(t.name)

    def unlabeled_outputs(self, node: gs.Node, graph_outputs: set[str]) -> list[gs.Tensor]:
        """Outputs of `node` that someone reads, that carry no label although an input does,
        and that no rule declared channel-free: what the rule did not follow."""
        if not any(self.label(t) is not None for t in node.inputs):
            return []
        return [o for o in node.outputs
                if o.name and o.name not in self.labels and o.name not in self.channel_free
                and (o.outputs or o.name in graph_outputs)]


Rule = Callable[[Walker, gs.Node], None]
#: Kept indices after removal: tensor name -> channel axis -> indices kept along it.
Kept = dict[str, dict[int, np.ndarray]]
#: (domain, op) -> [(since_version, rule)], sorted by version. ONNX versions an op's semantics
#: per opset (Softmax's axis before 13, Split's sizes as an input from 13...): a rule registered
#: `since=N` applies to models importing that domain at version N or later, until the next one.
RULES: dict[tuple[str, str], list[tuple[int, Rule]]] = {}

#: Domains that mean the default ONNX operator set.
DEFAULT_DOMAINS = ("", "ai.onnx")


def _domain(domain: str | None) -> str:
    return "" if domain in DEFAULT_DOMAINS or domain is None else domain


def rule(*ops: str, domain: str = "", since: int = 1):
    """Register a channel rule for one op family, in `domain`, from opset version `since` on."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            entries = RULES.setdefault((_domain(domain), op), [])
            entries[:] = [e for e in entries if e[0] != since] + [(since, fn)]
            entries.sort(key=lambda e: e[0])
        return fn

    return deco


def find_rule(op: str, domain: str | None, opset: int | None) -> Rule | None:
    """The rule for `op` at this opset version of its domain, or None (the op then freezes).

    An unknown opset version means the newest rule; a version older than every registered
    rule means prunec does not know the op's semantics there, so there is no rule."""
    entries = RULES.get((_domain(domain), op))
    if not entries:
        return None
    if opset is None:
        return entries[-1][1]
    fit = [fn for since, fn in entries if since <= opset]
    return fit[-1] if fit else None
