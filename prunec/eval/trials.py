"""Pruning trials without pruning: what a `channels` run would remove, what it would save, and
how the model would score, measured on the original graph with the removed channels masked.

A trial is a set of per-group ratios. `TrialGraph` picks the classes it removes with the pass's
own selection (`ChannelPruning.select`: same ranking, `round` and `min` rules) and prices the
removal from shapes (`graph.masking.removal_shapes`), so nothing is rewritten or verified.
`MaskedRunner` scores it: the removed channels are zeroed where they are read
(`graph.masking`), which the tests show equals removal, in ONNX Runtime sessions where those
weights and masks are inputs, so one session serves every trial that masks the same readers.
A removal masking cannot simulate (hidden width, which changes normalization statistics; kept
weights changed from data by mean compensation or reconstruction) is pruned for real instead
(`TrialGraph.maskable`). The data-free compensation of channels that hold one value is a bias
change of their readers, fed like the masked weights.

Only what lies downstream of the masked readers changes. The graph is cut once per channel
group, ahead of that group's readers (the group *cuts*, ordered by depth), and the tensors
crossing a cut (its *frontier*) are computed by a fixed chain of segment sessions, each from the
previous frontier; a trial then runs only the part of the model below its cut. The chain and the
sessions depend on the model alone, never on which trials ran before or on which worker, so a
trial's result is the same whatever order, process or machine computes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import ExecutorError
from prunec.eval.slices import CLEAN
from prunec.graph.costs import totals_at
from prunec.graph.fold import graph_shapes
from prunec.graph.ir import export_graph, from_onnx
from prunec.graph.masking import (
    Masks,
    biasable,
    find_readers,
    maskable,
    masks_for,
    parametrized_graph,
    removal_shapes,
)
from prunec.graph.shapes import infer_shapes
from prunec.graph.subgraph import cut_graph, downstream, feeding_tensors, tensor_types
from prunec.passes import PassContext, build_passes
from prunec.runtime.runtimes import open_session

#: Frontier values (all samples, all variants) a worker keeps to continue the chain, in bytes.
DEFAULT_FRONTIER_BYTES = 2 << 30


@dataclass
class Cut:
    """The graph below one group's readers: the reader nodes, every node downstream of them
    (`below`, node ids), and the tensors that feed that part from above (`frontier`)."""

    readers: frozenset[str]
    below: set[int]
    frontier: list[str]
    depth: int


class TrialGraph:
    """The `channels` pass's view of a model, analysed once: groups, selection, costs and cuts."""

    def __init__(self, model: onnx.ModelProto, *, input_shapes: dict | None = None,
                 options: dict[str, Any] | None = None):
        options = {k: v for k, v in (options or {}).items() if k not in ("ratio", "plan")}
        self.pass_ = build_passes(["channels"], {"channels": options})[0]
        self.ctx = PassContext(input_shapes=dict(input_shapes or {}))
        graph = from_onnx(model)
        self.analysis = self.pass_.analyze(graph, self.ctx)
        self.graph = self.analysis.graph
        self.graph.toposort()
        self.shapes = graph_shapes(self.graph, input_shapes or None)
        self.readers = find_readers(self.analysis)
        self._base: onnx.ModelProto | None = None
        self._scores: np.ndarray | None = None
        self._compensation: dict[frozenset[int], dict[str, np.ndarray] | None] = {}
        self.cuts = self._group_cuts()

    # -- what a trial removes and saves

    def select(self, ratios: dict[str, float], ctx: PassContext | None = None, *, default: float = 0.0
               ) -> frozenset[int]:
        """Classes removed at `ratios` ({group id: ratio}; other groups `default`), as the pass
        picks them. Importance is computed on the first call (`ctx.data` for activations)."""
        ctx = ctx or self.ctx
        if self._scores is None:
            self._scores = self.pass_.scores(self.analysis, ctx)
        full = {g.id: float(ratios.get(g.id, default)) for g in self.analysis.groups}
        removed = self.pass_.select(self.analysis, ctx, ratios=full, scores=self._scores)
        return frozenset(c for v in removed.values() for c in v)

    @property
    def groups(self):
        """The channel groups, as the pass's group table lists them."""
        return self.analysis.groups

    @property
    def round(self) -> int:
        """The channel multiple the last `select` rounded to (it depends on the context's target)."""
        return self.pass_._round_to

    def costs(self, removed: frozenset[int]) -> tuple[int, int]:
        """(params, MACs) of the model with `removed` gone, counted as `prunec run` counts them."""
        if self._base is None:
            self._base = export_graph(self.graph.copy())
        shapes, consts = removal_shapes(self.analysis, self.shapes, set(removed))
        return totals_at(self._base, shapes, consts)

    def fingerprint(self) -> str:
        """Identifies the analysis, so a worker can check it sees the classes the driver numbered."""
        h = hashlib.sha256(self.analysis.roots.tobytes())
        for g in self.analysis.groups:
            h.update(f"{g.id}:{g.size}:{g.frozen is None};".encode())
        return h.hexdigest()[:16]

    def maskable(self, removed: frozenset[int], ctx: PassContext | None = None) -> bool:
        """Whether masking gives this removal's outputs as the pass would write them: not when it
        narrows the channels a normalization averages over (hidden width), nor when the pass
        changes kept weights from data (mean compensation, reconstruction). Removed channels
        that hold one value, which the pass folds into their readers' biases without data, mask
        with those bias changes fed to the readers (`compensation`)."""
        from prunec.passes.channel_recovery import compensate_mode

        if not removed:
            return True
        if self.pass_.options.reconstruct or not maskable(self.analysis, set(removed)):
            return False
        mode = compensate_mode(self.pass_.options.compensate, ctx or self.ctx)
        if mode == "mean":
            return False
        return mode == "none" or self.compensation(removed) is not None

    def compensation(self, removed: frozenset[int]) -> dict[str, np.ndarray] | None:
        """Bias changes (reader node -> delta) the pass folds in without data for removing
        `removed` (its `constant` compensation), or None when some reader's bias cannot be fed.
        Empty when the option is `none` or no removed channel is constant."""
        from prunec.graph.compensation import constant_classes
        from prunec.passes.channel_recovery import compensation_for

        removed = frozenset(removed)
        if removed not in self._compensation:
            deltas: dict[str, np.ndarray] | None = {}
            if self.pass_.options.compensate != "none" and constant_classes(self.analysis, set(removed)):
                comp = compensation_for(self.analysis, set(removed), self.ctx, "constant", None)
                deltas = dict(comp.deltas) if comp is not None else {}
                if not all(biasable(self.graph, name) for name in deltas):
                    deltas = None
            self._compensation[removed] = deltas
        return self._compensation[removed]

    # -- where a trial's changes start

    def masks(self, removed: frozenset[int]) -> Masks:
        """Where removing `removed` zeroes what (and which reader biases it changes)."""
        masks = masks_for(self.analysis, self.readers, set(removed))
        masks.biases = self.compensation(frozenset(removed)) or {}
        return masks

    def reader_nodes(self, masks: Masks) -> list[gs.Node]:
        """Nodes that read a masked weight or contraction, or whose bias changes."""
        tensors = self.graph.tensors()
        out = {}
        for name in masks.weights:
            for n in tensors[name].outputs:
                out[id(n)] = n
        for n in self.graph.nodes:
            if n.name in masks.contraction_nodes or n.name in masks.biases:
                out[id(n)] = n
        return list(out.values())

    def cut_for(self, masks: Masks) -> int:
        """Index of the deepest cut whose lower part holds every masked reader (0: none, the whole graph)."""
        ids = {id(n) for n in self.reader_nodes(masks)}
        for j in range(len(self.cuts) - 1, 0, -1):
            if ids <= self.cuts[j].below:
                return j
        return 0

    def _group_cuts(self) -> list[Cut]:
        order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        inputs = [t.name for t in self.graph.inputs]
        cuts = {frozenset(): Cut(frozenset(), {id(n) for n in self.graph.nodes}, inputs, -1)}
        for g in self.analysis.groups:
            if g.frozen:
                continue
            # The compensated readers of a removal are among its weight readers: no biases needed.
            masks = masks_for(self.analysis, self.readers, set(g.classes))
            nodes = self.reader_nodes(masks)
            if not nodes:
                continue
            key = frozenset(n.name for n in nodes)
            if key not in cuts:
                below = downstream(nodes)
                cuts[key] = Cut(key, below, feeding_tensors(self.graph, below),
                                min(order[id(n)] for n in nodes))
        return sorted(cuts.values(), key=lambda c: (c.depth, sorted(c.readers)))


@dataclass
class TrialTask:
    """Trials sharing one cut: (key, removed classes) each, scored on `variants`."""

    cut: int
    trials: list[tuple[str, tuple[int, ...]]]
    variants: list[str] = field(default_factory=lambda: [CLEAN])


@dataclass
class RunnerSpec:
    """Everything a worker needs to build a `MaskedRunner` (sent to each worker once)."""

    model: onnx.ModelProto
    evaluator: Any
    input_shapes: dict
    options: dict
    fingerprint: str
    frontier_bytes: int = DEFAULT_FRONTIER_BYTES
    #: In-process runs reuse the driver's analysis instead (never sent to other processes).
    local: TrialGraph | None = None

    def __getstate__(self):
        return {**self.__dict__, "local": None}


def build_runner(spec: RunnerSpec, threads: int | None = None) -> MaskedRunner:
    """Worker entry point: load the model and analyse it once (`threads`: ONNX Runtime's intra-op
    threads when the evaluator sets none)."""
    tg = spec.local or TrialGraph(spec.model, input_shapes=spec.input_shapes,
                                  options=spec.options)
    if tg.fingerprint() != spec.fingerprint:
        raise ExecutorError("a trial worker analysed the model differently from the driver "
                          f"({tg.fingerprint()} != {spec.fingerprint}); are prunec versions the same?")
    return MaskedRunner(tg, spec.evaluator, threads=threads, frontier_bytes=spec.frontier_bytes)


class MaskedRunner:
    """Scores trials of one model on an Evaluator's data by masking; callable on a `TrialTask`."""

    def __init__(self, tg: TrialGraph, evaluator, *, threads: int | None = None,
                 frontier_bytes: int = DEFAULT_FRONTIER_BYTES):
        self.tg = tg
        self.ev = evaluator
        #: The outputs the evaluator scores (all of them for a task metric).
        self.fetch = list(evaluator.fetch)
        self.batch = int(evaluator.run_kw.get("batch_size") or 64)
        #: The evaluator's runtime (--runtime/--provider/--device), with the worker's share of the
        #: cores when the user set no thread count.
        target = evaluator.target
        self.target = target if target.threads is not None or threads is None else target.with_threads(threads)
        #: Inputs fed whole with every batch (--feed), as `predict_outputs` does.
        self.fixed = dict(evaluator.run_kw.get("fixed") or {})
        self.frontier_bytes = frontier_bytes
        self.types = tensor_types(infer_shapes(export_graph(tg.graph.copy())))
        self.graph_inputs = [t.name for t in tg.graph.inputs]
        fixed = {t.shape[0] for t in tg.graph.inputs
                 if t.name not in self.fixed and t.shape and isinstance(t.shape[0], int)}
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        self._segments: dict[int, tuple[Any, list[str], list[str]] | None] = {}
        self._suffix: dict[tuple, tuple[Any, Any]] = {}
        #: The chain's position (a cut index) and the frontier there: variant -> chunk -> values.
        self._pos: int | None = None
        self._store: dict[str, list[dict[str, np.ndarray]]] | None = None

    # -- data in chunks, as `predict` batches it

    def _chunks(self, variant: str) -> list[tuple[dict[str, np.ndarray], int]]:
        inputs = self.ev.variants[variant]
        n = len(next(iter(inputs.values())))
        step = self.fixed_batch or self.batch
        out = []
        for start in range(0, n, step):
            feed = {k: v[start:start + step] for k, v in inputs.items()}
            got = len(next(iter(feed.values())))
            if self.fixed_batch and got < step:
                feed = {k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in feed.items()}
            out.append(({**feed, **self.fixed}, got))
        return out

    # -- the chain of frontiers

    def _learn_types(self, values: dict[str, np.ndarray]) -> None:
        """Types of computed tensors that shape inference could not give (it stops at contrib
        ops such as com.microsoft's QGemm): taken from their values, every dim symbolic."""
        for name, v in values.items():
            if name not in self.types:
                self.types[name] = (v.dtype, [None] * v.ndim)

    def _segment(self, j: int, known: dict[str, np.ndarray]):
        """Session computing cut j's frontier from cut j-1's frontier (whose values are among
        `known`) and the graph inputs."""
        if j not in self._segments:
            self._learn_types(known)
            prev = set(self.tg.cuts[j - 1].frontier) if j > 0 else set()
            want = [t for t in self.tg.cuts[j].frontier if t not in prev and t not in self.graph_inputs]
            if not want:
                self._segments[j] = None
            else:
                given = [t for t in prev if t not in self.graph_inputs]
                g = cut_graph(self.tg.graph, given, want, self.types)
                sess = open_session(export_graph(g), self.target)
                self._segments[j] = (sess, list(sess.input_names), want)
        return self._segments[j]

    def _frontier(self, j: int, variant: str, c: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cut j's frontier on one chunk, by the chain of segments from the nearest stored cut."""
        if self._pos is not None and self._pos <= j and self._store is not None:
            values, k = dict(self._store[variant][c]), self._pos
        else:
            values, k = {}, 0
        for step in range(k + 1, j + 1):
            known = {**feed, **values}
            seg = self._segment(step, known)
            if seg is not None:
                sess, names, want = seg
                got = sess.run({n: known[n] for n in names})
                values.update((w, got[w]) for w in want)
            keep = set(self.tg.cuts[step].frontier)
            values = {n: v for n, v in values.items() if n in keep}
        return values

    # -- suffix sessions: the part below a cut, with masked weights as inputs

    def _suffix_session(self, j: int, masks: Masks, outputs: tuple[str, ...]):
        key = (j, frozenset(masks.weights), frozenset(masks.contractions), outputs, frozenset(masks.biases))
        if key not in self._suffix:
            par = parametrized_graph(self.tg.analysis, self.tg.readers, set(masks.weights),
                                     set(masks.contractions), {n: t[0] for n, t in self.types.items()},
                                     biases=set(masks.biases))
            given = [t for t in self.tg.cuts[j].frontier if t not in self.graph_inputs]
            g = cut_graph(par.graph, given, list(outputs), self.types)
            sess = open_session(export_graph(g), self.target)
            self._suffix[key] = (sess, par)
        return self._suffix[key]

    def _changed_outputs(self, masks: Masks) -> tuple[str, ...]:
        """The fetched outputs that lie below the masked readers (the others keep the original's values)."""
        if not masks.readers:
            return ()
        below = downstream(self.tg.reader_nodes(masks))
        tensors = self.tg.graph.tensors()
        return tuple(o for o in self.fetch if any(id(p) in below for p in tensors[o].inputs))

    def __call__(self, task: TrialTask) -> dict[str, dict[str, float]]:
        """Score every trial of `task`: {trial key: {variant: metric in percent}}."""
        if self.ev.task is not None:  # a task metric scores whole outputs with all the targets
            outs = self.outputs(task)
            return {key: {v: float(self.ev.scores(v, outs[key][v])[1].mean() * 100) for v in task.variants}
                    for key, _ in task.trials}
        # Built-in metrics score each sample alone: score every chunk as it comes, so a trial never
        # holds its whole output (PP-OCRv4's recognizer: [400, 40, 6625] floats, 424 MB, per trial).
        per: dict[str, dict[str, list[np.ndarray]]] = {key: {v: [] for v in task.variants} for key, _ in task.trials}

        def collect(key, v, start, got, values):
            per[key][v].append(self.ev.chunk_scores(v, values, start))

        changed = self._run(task, collect)
        out = {}
        for key, _ in task.trials:
            out[key] = {}
            for v in task.variants:
                # Outputs no masked reader reaches keep the original's values (and scores).
                s = np.concatenate(per[key][v]) if changed[key] else self.ev.scores(v, self.ev.reference[v])[1]
                out[key][v] = float(s.mean() * 100)
        return out

    def outputs(self, task: TrialTask) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """The fetched outputs of every trial of `task`: {key: {variant: {output name: array}}}."""
        outs: dict[str, dict[str, list[dict[str, np.ndarray]]]] = {k: {v: [] for v in task.variants}
                                                                   for k, _ in task.trials}

        def collect(key, v, start, got, values):
            outs[key][v].append(values)

        changed = self._run(task, collect)
        result = {}
        for key, _ in task.trials:
            result[key] = {}
            for v in task.variants:
                # Outputs no masked reader reaches keep the original's values.
                got = dict(self.ev.reference[v])
                got.update({o: np.concatenate([c[o] for c in outs[key][v]]) for o in changed[key]})
                result[key][v] = {o: got[o] for o in self.fetch}
        return result

    def _run(self, task: TrialTask, collect) -> dict[str, tuple[str, ...]]:
        """Run every trial of `task` chunk by chunk, calling `collect(key, variant, first sample,
        samples, {changed output: values})` for each; returns the changed outputs per trial."""
        masks = {key: self.tg.masks(frozenset(removed)) for key, removed in task.trials}
        changed = {key: self._changed_outputs(m) for key, m in masks.items()}
        live = [key for key, _ in task.trials if changed[key]]
        keys = {(task.cut, frozenset(masks[k].weights), frozenset(masks[k].contractions), changed[k],
                 frozenset(masks[k].biases)) for k in live}
        self._suffix = {k: v for k, v in self._suffix.items() if k in keys}
        runs = {}
        untyped = [t for t in self.tg.cuts[task.cut].frontier if t not in self.types]
        if live and untyped:  # computed once on one chunk (kept by the chain if it fits)
            v0 = task.variants[0]
            self._learn_types(self._frontier(task.cut, v0, 0, self._chunks(v0)[0][0]))
        for k in live:
            sess, par = self._suffix_session(task.cut, masks[k], changed[k])
            runs[k] = (sess, list(sess.input_names), par.feeds(masks[k]))
        new_store: dict[str, list[dict[str, np.ndarray]]] | None = {} if live else None
        for v in task.variants:
            chunks = self._chunks(v) if live else []
            if new_store is not None:
                new_store[v] = []
            start = 0
            for c, (feed, got) in enumerate(chunks):
                front = self._frontier(task.cut, v, c, feed)
                if new_store is not None:
                    new_store[v].append(front)
                    if c == 0 and _nbytes(front) * len(chunks) * len(task.variants) > self.frontier_bytes:
                        new_store = None  # too big to keep: later cuts start the chain again
                known = {**feed, **front}
                for k in live:
                    sess, names, feeds = runs[k]
                    ys = sess.run({n: (known[n] if n in known else feeds[n]) for n in names})
                    collect(k, v, start, got, {o: ys[o][:got] for o in changed[k]})
                start += got
        if new_store is not None:
            self._pos, self._store = task.cut, new_store
        return changed


def _nbytes(values: dict[str, np.ndarray]) -> int:
    return sum(int(v.nbytes) for v in values.values())
