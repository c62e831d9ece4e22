"""Where the time goes: per-op-type and per-node times from ONNX Runtime's own profiler.

The profiler runs in its own session (profiling adds overhead, so it never shares a session
with the latency measurement). Node names and op types are the runtime's, after its graph
optimizations: a Conv followed by Relu usually shows up as one `FusedConv`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from prunec.runtime.session import make_session


@dataclass
class NodeTime:
    """One node of the optimized graph: its median kernel time per run."""

    name: str
    op_type: str
    provider: str
    ms: float


@dataclass
class OpProfile:
    """Kernel time per run (each node's median over runs) by op type and for the slowest nodes."""

    batch: int
    runs: int
    total_ms: float
    by_op_ms: dict[str, float]
    op_counts: dict[str, int]
    top_nodes: list[NodeTime] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"batch": self.batch, "runs": self.runs, "total_ms": self.total_ms,
                "by_op_ms": dict(self.by_op_ms), "op_counts": dict(self.op_counts),
                "top_nodes": [{"name": n.name, "op_type": n.op_type, "provider": n.provider,
                               "ms": n.ms} for n in self.top_nodes]}


def parse_trace(events: list[dict], *, runs: int, batch: int = 1, top: int = 10) -> OpProfile:
    """Aggregate an ORT trace (Chrome trace JSON events) over its last `runs` model runs.

    Only node kernel events inside those runs count, so warm-up runs and session setup drop out.
    Each node's time is its median over the runs: one run disturbed by another process must not
    make a cheap node look slow.
    """
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                         if e.get("cat") == "Session" and e.get("name") == "model_run")
    if runs <= 0 or len(run_windows) < runs:
        raise ValueError(f"trace has {len(run_windows)} model runs, asked for the last {runs}")
    windows = run_windows[-runs:]
    starts = [w[0] for w in windows]
    per_node: dict[str, np.ndarray] = {}
    info: dict[str, tuple[str, str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if k < 0 or e["ts"] > windows[k][1]:
            continue  # outside the measured runs
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        # A node runs once per run; the array is indexed by run so a missing event reads as 0.
        per_node.setdefault(name, np.zeros(runs))[k] += e["dur"]
        info[name] = (args.get("op_name", "?"), args.get("provider", "?"))
    by_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    nodes = []
    for name, us in per_node.items():
        op, prov = info[name]
        ms = float(np.median(us)) / 1e3
        by_op[op] += ms
        counts[op] += 1
        nodes.append(NodeTime(name, op, prov, ms))
    nodes.sort(key=lambda n: -n.ms)
    ordered = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return OpProfile(batch=batch, runs=runs, total_ms=sum(by_op.values()), by_op_ms=ordered,
                     op_counts={k: counts[k] for k in ordered}, top_nodes=nodes[:top])


def op_profile(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray], *,
               provider: str = "cpu", threads: int | None = None, runs: int = 10, warmup: int = 2,
               batch: int = 1, top: int = 10) -> OpProfile:
    """Run the model under ORT's profiler and aggregate kernel times per op type and node."""
    with tempfile.TemporaryDirectory(prefix="prunec-prof-") as d:
        sess = make_session(model, provider=provider, threads=threads, spin=False,
                            profile_prefix=str(Path(d) / "ort"))
        names = [o.name for o in sess.get_outputs()]
        for _ in range(warmup + runs):
            sess.run(names, feeds)
        trace_path = sess.end_profiling()
        events = json.loads(Path(trace_path).read_text())
        del sess
    return parse_trace(events, runs=runs, batch=batch, top=top)
