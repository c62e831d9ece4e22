"""Peak resident memory of a session, measured in a fresh child process.

A child process is the only clean way to measure it: the parent already holds other sessions,
the ONNX model protos and numpy arrays, and a process's peak never goes down. The child imports
ONNX Runtime, notes its resident set, builds the session, runs it twice and reports its peak.

The peak is the child's own high-water mark (VmHWM in /proc/self/status), not `ru_maxrss`:
Linux carries `ru_maxrss` across fork and exec, so a child of a 1 GiB parent (measured: the
benchmark script holding torch and ResNet-50) reports at least 1 GiB whatever it does itself.
`ru_maxrss` is only the fallback where /proc is missing.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from prunec.errors import ProviderError
from prunec.runtime.target import Target, as_target


@dataclass
class MemoryStats:
    """Resident memory of a child process before and after building and running one session."""

    batch: int
    baseline_rss_bytes: int  # after importing onnxruntime, before the session
    peak_rss_bytes: int  # the child's peak (VmHWM) after building the session and running it twice
    session_bytes: int  # peak - baseline: what the session (weights, arena, buffers) added
    cpu_arena: bool  # ORT's CPU memory arena was on (its size is not exposed by the Python API); False on other runtimes

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    kib = _status_kib("VmHWM")
    # Linux reports ru_maxrss in KiB.
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child() -> None:
    """Entry point of the measuring child: JSON job on stdin, JSON result on stdout."""
    job = json.loads(sys.stdin.read())
    import onnxruntime  # noqa: F401  (counted in the baseline)

    from prunec.runtime.runtimes import get_runtime
    from prunec.runtime.target import Target

    target = Target.from_dict(job["target"])
    runtime = get_runtime(target.runtime)  # imports the runtime's package: counted in the baseline
    feeds = {name: np.zeros(shape, dtype=np.dtype(dt)) for name, (shape, dt) in job["inputs"].items()}
    shapes = {name: tuple(shape) for name, (shape, _) in job["inputs"].items()}
    for name, value in job.get("values", {}).items():  # fixed values (--feed, model-named)
        feeds[name] = np.broadcast_to(np.array(value, dtype=feeds[name].dtype), feeds[name].shape).copy()
    baseline = _current_rss()
    sess = runtime.open(job["model"], target, shapes=shapes, spin=False)
    for _ in range(2):
        sess.run(feeds)
    peak = _peak_rss()
    json.dump({"baseline": baseline, "peak": peak}, sys.stdout)


def peak_memory(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, tuple[tuple[int, ...], np.dtype]],
                *, provider: str = "cpu", threads: int | None = None, batch: int = 1,
                timeout: float = 300.0, values: dict[str, np.ndarray] | None = None,
                target: Target | None = None) -> MemoryStats:
    """Peak RSS of a session on `inputs` ({name: (shape, dtype)}), measured in a child process on
    `target` (default: ONNX Runtime on `provider`); inputs are zeros except those with fixed
    `values` (broadcast to their shape)."""
    target = as_target(target, provider=provider, threads=threads)
    with tempfile.TemporaryDirectory(prefix="prunec-mem-") as d:
        if isinstance(model, onnx.ModelProto):
            path = Path(d) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**30,
                            location="model.onnx.data")
        else:
            path = Path(model)
        job = {"model": str(path), "target": target.to_dict(),
               "inputs": {k: [list(s), np.dtype(dt).str] for k, (s, dt) in inputs.items()},
               "values": {k: np.asarray(v).tolist() for k, v in (values or {}).items() if k in inputs}}
        # The child must import this very prunec, wherever it was imported from.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        proc = subprocess.run([sys.executable, "-c", "from prunec.runtime.memory import _child; _child()"],
                              input=json.dumps(job), capture_output=True, text=True, env=env,
                              timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "ProviderError" in last or "RuntimeUnavailableError" in last:
            raise ProviderError(last.split(":", 1)[-1].strip())
        raise RuntimeError(f"memory measurement child failed: {last}")
    out = json.loads(proc.stdout)
    return MemoryStats(batch=batch, baseline_rss_bytes=int(out["baseline"]), peak_rss_bytes=int(out["peak"]),
                       session_bytes=max(0, int(out["peak"]) - int(out["baseline"])),
                       cpu_arena=target.runtime == "ort")
