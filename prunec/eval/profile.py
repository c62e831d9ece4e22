"""Profile a model, or compare two, on the target runtime: latency, costs, op times, memory.

This is where "fewer MACs" meets "runs faster": the same counter as `inspect` gives the MACs,
the target runtime (ONNX Runtime on a provider, OpenVINO, TensorRT; `prunec.runtime.runtimes`)
gives the time, and the report puts them side by side
(realized / theoretical speedup). It lives above `graph/` because it needs the cost counter.

JSON (`ProfileReport.to_dict()`; field by field in docs/profile-schema.md)::

    {"schema_version": 1, "model": str, "provider": str, "threads": int|null,
     "runtime": "ort"|"openvino"|"tensorrt", "target": {"runtime", "provider", "device",
     "precision", "threads", "key"}, "machine": {...}, "settings": {...},
     "costs": {"params": int, "macs": {"<batch>": int}, "weight_bytes": int,
               "file_bytes": int|null, "unknown_mac_layers": int},
     "latency": [{"batch", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms",
                  "median_ci_ms": [lo, hi], "confidence", "items_per_s", "sessions"}],
     "ops": {"batch", "runs", "total_ms", "by_op_ms": {op: ms}, "op_counts": {op: n},
             "source": str, "sparse_layers": [str]|null,
             "top_nodes": [{"name", "op_type", "provider", "ms", "kernel", "onnx_nodes"}]} | null,
     "memory": {"batch", "baseline_rss_bytes", "peak_rss_bytes", "session_bytes",
                "cpu_arena"} | null}

`CompareReport.to_dict()` is ``{"schema_version": 1, "before": <profile>, "after": <profile>,
"speedups": [{"batch", "speedup", "ci": [lo, hi], "confidence", "pairs", "sessions",
"theoretical", "realized"}]}``, where speedup = median latency before / after (> 1 means `after` is faster), theoretical =
MACs before / MACs after, realized = speedup / theoretical.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from prunec.errors import OptionError
from prunec.graph.costs import analyze_costs
from prunec.graph.io import load_model, weight_bytes
from prunec.runtime.inputs import graph_inputs, random_inputs, resolve_input_shapes, typed_feeds
from prunec.runtime.latency import (LatencyStats, SpeedupStats, TimingPlan, replicate_ci, speedup_ci,
                                    time_sessions)
from prunec.runtime.memory import MemoryStats, peak_memory
from prunec.runtime.opprofile import OpProfile
from prunec.runtime.runtimes import check_target
from prunec.runtime.target import Target, as_target

#: Bumped when a JSON field is removed or changes meaning (docs/profile-schema.md).
SCHEMA_VERSION = 1
ModelLike = onnx.ModelProto | str | os.PathLike
#: Progress callback: (what is being measured, overall fraction done 0..1).
Progress = Callable[[str, float], None]


@dataclass
class ModelCosts:
    """Static costs: params, MACs per batch size (the one counter), weight and file bytes."""

    params: int
    macs: dict[int, int]
    weight_bytes: int
    file_bytes: int | None
    unknown_mac_layers: int

    def to_dict(self) -> dict:
        """JSON-ready dict (batch keys become strings)."""
        return {"params": self.params, "macs": {str(k): v for k, v in self.macs.items()},
                "weight_bytes": self.weight_bytes, "file_bytes": self.file_bytes,
                "unknown_mac_layers": self.unknown_mac_layers}


@dataclass
class ProfileReport:
    """Everything measured about one model on one provider."""

    model: str
    provider: str
    threads: int | None
    machine: dict
    settings: dict
    costs: ModelCosts
    latency: list[LatencyStats] = field(default_factory=list)
    ops: OpProfile | None = None
    memory: MemoryStats | None = None
    target: Target = field(default_factory=Target)

    def at(self, batch: int) -> LatencyStats:
        """Latency stats at one batch size."""
        return next(s for s in self.latency if s.batch == batch)

    def to_dict(self, samples: bool = False) -> dict:
        """JSON-ready dict, schema in the module docstring."""
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "provider": self.provider,
                "threads": self.threads, "runtime": self.target.runtime, "target": self.target.to_dict(),
                "machine": dict(self.machine), "settings": dict(self.settings),
                "costs": self.costs.to_dict(),
                "latency": [s.to_dict(samples) for s in self.latency],
                "ops": self.ops.to_dict() if self.ops else None,
                "memory": self.memory.to_dict() if self.memory else None}


@dataclass
class CompareReport:
    """Two models measured interleaved in one process, and the speedup at each batch size."""

    before: ProfileReport
    after: ProfileReport
    speedups: list[SpeedupStats]

    def to_dict(self, samples: bool = False) -> dict:
        """JSON-ready dict, schema in the module docstring."""
        return {"schema_version": SCHEMA_VERSION, "before": self.before.to_dict(samples),
                "after": self.after.to_dict(samples),
                "speedups": [s.to_dict() for s in self.speedups]}


def machine_info(provider: str, threads: int | None, target: Target | None = None) -> dict:
    """What a timing depends on: CPU, core count, runtime versions, provider, threads, date (UTC)."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "provider": provider, "threads": threads, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if target is not None and target.runtime != "ort":
        info[target.runtime] = check_target(target).version()
        info["devices"] = check_target(target).devices()
    return info


@dataclass
class _Loaded:
    label: str
    model: onnx.ModelProto
    source: ModelLike  # what sessions are built from: the path keeps external data working
    file_bytes: int | None


def _load(model: ModelLike, label: str | None) -> _Loaded:
    if isinstance(model, onnx.ModelProto):
        return _Loaded(label or "<in-memory model>", model, model, model.ByteSize())
    loaded = load_model(model)
    # A model converted up from an old opset must run as converted, not as stored.
    source = loaded.model if loaded.converted_from_opset else loaded.path
    return _Loaded(label or str(loaded.path), loaded.model, source, loaded.path.stat().st_size)


def _batch_shapes(model: onnx.ModelProto, batches: Sequence[int],
                  input_shapes: dict[str, tuple[int, ...]] | None) -> dict[int, dict[str, tuple[int, ...]]]:
    """Concrete input shapes per batch label; the label is the first input's leading dim."""
    if not batches or any(int(b) < 1 for b in batches):
        raise OptionError(f"batch sizes must be positive integers, got {list(batches)}")
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for b in batches:
        shapes = resolve_input_shapes(model, input_shapes, batch=int(b))
        first = next(iter(shapes.values()), ())
        label = int(first[0]) if first else 1  # --input-shape may fix the batch itself
        out.setdefault(label, shapes)
    return out


def _costs(m: _Loaded, shapes_by_batch: dict[int, dict[str, tuple[int, ...]]]) -> ModelCosts:
    macs, unknown, params = {}, 0, 0
    for b, shapes in shapes_by_batch.items():
        c = analyze_costs(m.model, shapes)
        macs[b], unknown, params = c.macs, len(c.unknown_mac_layers), c.params
    return ModelCosts(params=params, macs=macs, weight_bytes=weight_bytes(m.model),
                      file_bytes=m.file_bytes, unknown_mac_layers=unknown)


def _measure(models: list[_Loaded], *, target: Target, batches: Sequence[int],
             input_shapes: dict[str, tuple[int, ...]] | None, plan: TimingPlan, ops: bool,
             ops_runs: int, memory: bool, top: int, confidence: float, seed: int,
             progress: Progress | None, fixed: dict[str, np.ndarray] | None = None
             ) -> tuple[list[ProfileReport], list, list[int]]:
    runtime = check_target(target)  # fail before any work if the runtime or device is missing
    full = runtime.describe(target)
    threads = target.threads
    shapes = [_batch_shapes(m.model, batches, input_shapes) for m in models]
    labels = list(shapes[0])
    for m, s in zip(models[1:], shapes[1:]):
        if list(s) != labels:
            raise OptionError(f"{m.label}: batch sizes resolve to {list(s)}, "
                              f"but {models[0].label} to {labels}")
    costs = [_costs(m, s) for m, s in zip(models, shapes)]  # before timing: a bad model fails fast
    segments = plan.split()
    settings = {"runs": plan.runs, "seconds": plan.seconds, "warmup": plan.warmup,
                "gap_ms": plan.gap_s * 1e3, "spin": False, "confidence": confidence,
                "sessions": len(segments), "interleaved": len(models) > 1, "target": target.key,
                "order": "ABBA" if len(models) > 1 else "A",
                "input_shapes": {str(b): {k: list(v) for k, v in shapes[0][b].items()} for b in labels}}
    feeds = {b: [random_inputs(m.model, s[b], seed=seed, feeds=fixed) for m, s in zip(models, shapes)]
             for b in labels}
    # samples[model][batch index][session index] -> latencies in ms
    samples: list[list[list[np.ndarray]]] = [[[] for _ in labels] for _ in models]
    steps = len(segments) * len(labels)
    def open_all(b: int | None):
        return [runtime.open(m.source, target, shapes=s[b] if b is not None else None, spin=False)
                for m, s in zip(models, shapes)]

    for k, seg_plan in enumerate(segments):
        # Fresh sessions for every segment: session-to-session spread is part of the noise. A
        # runtime that compiles for fixed shapes gets its sessions per batch size.
        sessions = None if runtime.static_shapes else open_all(None)
        for bi, b in enumerate(labels):
            done = k * len(labels) + bi
            step = (lambda f, b=b, done=done: progress(f"batch {b}", (done + f) / steps)) if progress else None
            current = open_all(b) if runtime.static_shapes else sessions
            for i, t in enumerate(time_sessions(current, feeds[b], seg_plan, progress=step)):
                samples[i][bi].append(t)
            if runtime.static_shapes:
                for sess in current:
                    sess.close()
        del sessions
    reports = []
    for i, m in enumerate(models):
        first = labels[0]
        rep = ProfileReport(model=m.label, provider=full, threads=threads,
                            machine=machine_info(full, threads, target), settings=settings,
                            costs=costs[i],
                            latency=[LatencyStats.from_samples(t, b, confidence=confidence)
                                     for t, b in zip(samples[i], labels)],  # t: one array per session
                            target=target)
        if ops:
            if progress:
                progress(f"op profile {i + 1}/{len(models)}", 1.0)
            rep.ops = runtime.op_profile(m.source, feeds[first][i], target,
                                         runs=ops_runs, batch=first, top=top, names_from=m.model)
        if memory:
            if progress:
                progress(f"memory {i + 1}/{len(models)}", 1.0)
            dtypes = {s.name: s.dtype for s in graph_inputs(m.model)}
            rep.memory = peak_memory(m.source, {k: (v, dtypes[k]) for k, v in shapes[i][first].items()},
                                     values=typed_feeds(m.model, fixed), batch=first, target=target)
        reports.append(rep)
    return reports, samples, labels


def profile_model(model: ModelLike, *, provider: str = "cpu", batches: Sequence[int] = (1,),
                  threads: int | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  runs: int | None = None, seconds: float | None = None, warmup: int = 5,
                  gap_s: float = 0.001, sessions: int = 4, ops: bool = True, ops_runs: int = 10,
                  memory: bool = True, top: int = 10, confidence: float = 0.95, seed: int = 0,
                  label: str | None = None, target: Target | None = None,
                  progress: Progress | None = None,
                  feeds: dict[str, np.ndarray] | None = None) -> ProfileReport:
    """Latency per batch size, costs, per-op times and peak memory of one model on `target`
    (default: ONNX Runtime on `provider`).

    `runs` (per batch) or `seconds` (per batch) bound the timing; neither means 2 s per batch,
    shared among `sessions` freshly built sessions. The op profile and the memory measurement
    use the first batch size. `feeds` fixes the values of some inputs (--feed).
    """
    plan = TimingPlan.of(runs, seconds, warmup=warmup, gap_s=gap_s, sessions=sessions)
    reports, _, _ = _measure([_load(model, label)], target=as_target(target, provider=provider, threads=threads),
                             batches=batches,
                             input_shapes=input_shapes, plan=plan, ops=ops, ops_runs=ops_runs,
                             memory=memory, top=top, confidence=confidence, seed=seed, progress=progress,
                             fixed=feeds)
    return reports[0]


def compare_models(before: ModelLike, after: ModelLike, *, provider: str = "cpu",
                   batches: Sequence[int] = (1,), threads: int | None = None,
                   input_shapes: dict[str, tuple[int, ...]] | None = None, runs: int | None = None,
                   seconds: float | None = None, warmup: int = 5, gap_s: float = 0.001,
                   sessions: int = 4, ops: bool = True, ops_runs: int = 10, memory: bool = True,
                   top: int = 10, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
                   labels: tuple[str | None, str | None] = (None, None), target: Target | None = None,
                   progress: Progress | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> CompareReport:
    """Profile two models with their timed runs interleaved (ABBA) in one process; speedup per batch.

    `runs`/`seconds` are per batch size for the pair together, shared among `sessions` freshly
    built session pairs. The speedup interval covers run-to-run noise (bootstrap over paired runs)
    and session-to-session spread (t over per-session ratios); realized = speedup / MAC ratio.
    """
    plan = TimingPlan.of(runs, seconds, warmup=warmup, gap_s=gap_s, sessions=sessions)
    models = [_load(before, labels[0]), _load(after, labels[1])]
    (rb, ra), samples, batch_labels = _measure(
        models, target=as_target(target, provider=provider, threads=threads), batches=batches,
        input_shapes=input_shapes,
        plan=plan, ops=ops, ops_runs=ops_runs, memory=memory, top=top, confidence=confidence,
        seed=seed, progress=progress, fixed=feeds)
    speedups = []
    for k, b in enumerate(batch_labels):
        before_runs, after_runs = samples[0][k], samples[1][k]
        ratio, lo, hi = speedup_ci(np.concatenate(before_runs), np.concatenate(after_runs),
                                   confidence=confidence, n_boot=n_boot, seed=seed)
        rlo, rhi = replicate_ci(ratio, [float(np.median(x) / np.median(y))
                                        for x, y in zip(before_runs, after_runs)], confidence)
        mb, ma = rb.costs.macs.get(b), ra.costs.macs.get(b)
        # A MAC count with layers of unknown shape is a lower bound; a ratio of two would mislead.
        known = not (rb.costs.unknown_mac_layers or ra.costs.unknown_mac_layers)
        theoretical = mb / ma if mb and ma and known else None
        speedups.append(SpeedupStats(batch=b, speedup=ratio, ci=(min(lo, rlo), max(hi, rhi)),
                                     confidence=confidence, pairs=sum(x.size for x in before_runs),
                                     theoretical=theoretical, sessions=len(before_runs)))
    return CompareReport(before=rb, after=ra, speedups=speedups)
