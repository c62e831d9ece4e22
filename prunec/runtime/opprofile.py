"""Where the time goes: per-op-type and per-node times from the runtime's own profiler.

The profiler runs in its own session (profiling adds overhead, so it never shares a session
with the latency measurement). Node names and op types are the runtime's, after its graph
optimizations: a Conv followed by Relu usually shows up as one `FusedConv` in ONNX Runtime, one
`Convolution` named after a folded Multiply in OpenVINO. `onnx_nodes` names the ONNX nodes a
runtime node came from, where the runtime keeps those names. This module holds the ORT
profiler; OpenVINO's and TensorRT's live with their runtimes and share `aggregate`.
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

from prunec.runtime.runtimes import map_to_onnx, onnx_node_names
from prunec.runtime.session import make_session


@dataclass
class NodeTime:
    """One node of the optimized graph: its median kernel time per run."""

    name: str
    op_type: str
    provider: str
    ms: float
    kernel: str | None = None  # the implementation that ran, where the runtime says (OpenVINO, TensorRT)
    onnx_nodes: list[str] = field(default_factory=list)  # ONNX nodes it came from, where known


@dataclass
class OpProfile:
    """Kernel time per run (each node's median over runs) by op type and for the slowest nodes."""

    batch: int
    runs: int
    total_ms: float
    by_op_ms: dict[str, float]
    op_counts: dict[str, int]
    top_nodes: list[NodeTime] = field(default_factory=list)
    source: str = "ONNX Runtime profiler"
    #: Layers that ran sparse (2:4) kernels, where the runtime reports it (TensorRT); None elsewhere.
    sparse_layers: list[str] | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"batch": self.batch, "runs": self.runs, "total_ms": self.total_ms,
                "by_op_ms": dict(self.by_op_ms), "op_counts": dict(self.op_counts),
                "source": self.source, "sparse_layers": self.sparse_layers,
                "top_nodes": [{"name": n.name, "op_type": n.op_type, "provider": n.provider,
                               "ms": n.ms, "kernel": n.kernel, "onnx_nodes": list(n.onnx_nodes)}
                              for n in self.top_nodes]}


def aggregate(per_node: dict[str, np.ndarray], info: dict[str, NodeTime], *, runs: int, batch: int,
              top: int, source: str, sparse_layers: list[str] | None = None) -> OpProfile:
    """An OpProfile from per-run times (ms) of each node; `info` gives each node's type,
    provider, kernel and ONNX names (its `ms` is replaced by the median over runs)."""
    by_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    nodes = []
    for name, ms_runs in per_node.items():
        base = info[name]
        ms = float(np.median(ms_runs))
        by_op[base.op_type] += ms
        counts[base.op_type] += 1
        nodes.append(NodeTime(name, base.op_type, base.provider, ms, base.kernel, list(base.onnx_nodes)))
    nodes.sort(key=lambda n: -n.ms)
    ordered = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return OpProfile(batch=batch, runs=runs, total_ms=sum(by_op.values()), by_op_ms=ordered,
                     op_counts={k: counts[k] for k in ordered}, top_nodes=nodes[:top], source=source,
                     sparse_layers=sparse_layers)


def parse_trace(events: list[dict], *, runs: int, batch: int = 1, top: int = 10,
                model: onnx.ModelProto | None = None) -> OpProfile:
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
    info: dict[str, NodeTime] = {}
    index = onnx_node_names(model) if model is not None else None
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if k < 0 or e["ts"] > windows[k][1]:
            continue  # outside the measured runs
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        # A node runs once per run; the array is indexed by run so a missing event reads as 0.
        per_node.setdefault(name, np.zeros(runs))[k] += e["dur"] / 1e3
        info[name] = NodeTime(name, args.get("op_name", "?"), args.get("provider", "?"), 0.0,
                              # NCHWc-rewritten nodes are named after the ONNX output they compute
                              onnx_nodes=map_to_onnx([name, name.removesuffix("_nchwc")], None, index)
                              if index else [])
    return aggregate(per_node, info, runs=runs, batch=batch, top=top, source="ONNX Runtime profiler")


def op_profile(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray], *,
               provider: str = "cpu", threads: int | None = None, runs: int = 10, warmup: int = 2,
               batch: int = 1, top: int = 10, provider_options: dict | None = None,
               names_from: onnx.ModelProto | None = None) -> OpProfile:
    """Run the model under ORT's profiler and aggregate kernel times per op type and node."""
    with tempfile.TemporaryDirectory(prefix="prunec-prof-") as d:
        sess = make_session(model, provider=provider, threads=threads, spin=False,
                            profile_prefix=str(Path(d) / "ort"), provider_options=provider_options)
        names = [o.name for o in sess.get_outputs()]
        for _ in range(warmup + runs):
            sess.run(names, feeds)
        trace_path = sess.end_profiling()
        events = json.loads(Path(trace_path).read_text())
        del sess
    proto = names_from if names_from is not None else (model if isinstance(model, onnx.ModelProto) else None)
    return parse_trace(events, runs=runs, batch=batch, top=top, model=proto)
