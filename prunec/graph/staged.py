"""Run a graph over calibration samples segment by segment, editing weights in between.

Layer-wise recovery fits one layer at a time, each on the inputs that the model *with every
earlier fit applied* gives it. Re-running the whole model for every layer costs layers x one
forward pass; `StagedRunner` instead keeps the tensors live at the current cut (those that
nodes not yet run will read), for every sample, and runs only the next segment of nodes when
asked to advance. Over a whole recovery each node runs about once, at the price of holding one
cut's live tensors in memory.

Between two `advance` calls the caller may change the constants and attributes of nodes that
have not run yet, and insert nodes after them (a bias Add after a MatMul); nodes already run
must stay as they were.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import DataError
from prunec.graph.ir import export_graph
from prunec.runtime.session import make_session


def _outer_reads(node: gs.Node) -> set[str]:
    """Names of outer-scope tensors that a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for value in node.attrs.values():
        for g in (value if isinstance(value, list) else [value]):
            if isinstance(g, gs.Graph):
                inner = {t.name for n in g.nodes for t in n.outputs} | {t.name for t in g.inputs}
                for n in g.nodes:
                    names.update(t.name for t in n.inputs if t.name and t.name not in inner)
                    names |= _outer_reads(n) - inner
    return names


def node_reads(node: gs.Node, tensors: dict[str, gs.Tensor]) -> list[gs.Variable]:
    """Every non-constant tensor a node reads, subgraph reads included."""
    out = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    out += [tensors[n] for n in sorted(_outer_reads(node)) if isinstance(tensors.get(n), gs.Variable)]
    return out


class StagedRunner:
    """Holds, per batch of samples, every tensor that nodes not yet run will read."""

    def __init__(self, graph: gs.Graph, inputs: dict[str, np.ndarray], *, batch: int = 32,
                 mask: np.ndarray | None = None, provider: str = "cpu", threads: int | None = None):
        self.graph = graph
        self.mask = mask  # the calibration mask of padded sequences, see runtime.activations
        self.provider = provider
        self.threads = threads
        self.done: set[int] = set()  # ids of nodes already run
        names = [t.name for t in graph.inputs]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DataError(f"calibration data has no array for model input(s) {', '.join(missing)}")
        n = len(inputs[names[0]]) if names else 0
        self.starts = list(range(0, n, max(1, batch)))
        self.sizes = [min(batch, n - s) for s in self.starts]
        self.cache: dict[str, list[np.ndarray]] = {
            k: [inputs[k][s:s + m] for s, m in zip(self.starts, self.sizes)] for k in names}
        self.segments = 0  # segments run, for tests and reports

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def cached_bytes(self) -> int:
        """Bytes held by the cache now."""
        return sum(a.nbytes for parts in self.cache.values() for a in parts)

    def pending(self) -> list[gs.Node]:
        """Nodes not yet run, in topological order."""
        self.graph.toposort()
        return [nd for nd in self.graph.nodes if id(nd) not in self.done]

    def advance(self, before: gs.Node | None = None, *, keep: tuple[str, ...] = ()) -> None:
        """Run every pending node that comes before `before` in topological order (all of them
        when None). Afterwards the cache holds what the remaining nodes read, plus `keep`."""
        pending = self.pending()
        stop = next((i for i, nd in enumerate(pending) if nd is before), len(pending)) \
            if before is not None else len(pending)
        seg, rest = pending[:stop], pending[stop:]
        tensors = self.graph.tensors()
        needed = {t.name for nd in rest for t in node_reads(nd, tensors)} | set(keep)
        needed |= {t.name for t in self.graph.outputs} if before is None else set()
        if seg:
            produced = {t.name for nd in seg for t in nd.outputs if t.name}
            outs = sorted(produced & needed)
            for name, parts in self._run(seg, outs).items():
                self.cache[name] = parts
            self.done.update(id(nd) for nd in seg)
        for name in list(self.cache):
            if name not in needed:
                del self.cache[name]

    def batches(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first sample, values) of a cached tensor, batch by batch."""
        for s, v in zip(self.starts, self.cache[name]):
            yield s, v

    def mask_of(self, first: int, n: int) -> np.ndarray | None:
        """The calibration mask's rows for samples first..first+n-1 (None without a mask)."""
        return None if self.mask is None else self.mask[first:first + n]

    def peek(self, nodes: list[gs.Node], outputs: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Run `nodes` (reading only cached tensors and constants) batch by batch and yield
        (first sample, {output: values}) without caching anything or marking them run."""
        model, feeds = self._segment(nodes, outputs)
        sess = make_session(model, provider=self.provider, threads=self.threads)
        for b, s in enumerate(self.starts):
            values = sess.run(outputs, {k: self.cache[k][b] for k in feeds})
            yield s, dict(zip(outputs, values))

    def _run(self, seg: list[gs.Node], outs: list[str]) -> dict[str, list[np.ndarray]]:
        if not outs:
            return {}
        result: dict[str, list[np.ndarray]] = {o: [] for o in outs}
        for _, values in self.peek(seg, outs):
            for o in outs:
                result[o].append(values[o])
        self.segments += 1
        return result

    def _segment(self, nodes: list[gs.Node], outputs: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        tensors = self.graph.tensors()
        inside = {t.name for nd in nodes for t in nd.outputs if t.name}
        reads: dict[str, gs.Variable] = {}
        for nd in nodes:
            for t in node_reads(nd, tensors):
                if t.name not in inside:
                    reads[t.name] = t
        absent = [n for n in reads if n not in self.cache]
        if absent:
            raise ValueError(f"segment reads tensors that are not cached: {absent[:5]}")
        for name, t in reads.items():
            t.dtype = self.cache[name][0].dtype if self.cache[name] else t.dtype
        outs = [tensors[o] for o in outputs]
        sub = gs.Graph(nodes=list(nodes), inputs=list(reads.values()), outputs=outs,
                       opset=self.graph.opset, import_domains=self.graph.import_domains)
        model = export_graph(sub)
        # Shapes recorded on intermediate tensors may be stale after a rewrite; let ORT infer.
        del model.graph.value_info[:]
        for vi in list(model.graph.input) + list(model.graph.output):
            vi.type.tensor_type.ClearField("shape")
        for vi in model.graph.output:
            if not vi.type.tensor_type.elem_type:
                vi.ClearField("type")
        return model, list(reads)
