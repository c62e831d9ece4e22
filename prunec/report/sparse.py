"""The honest sparse profile: sparsity, bytes, and measured latency dense vs sparse, per layer.

`SparseProfile` is filled by `prunec.eval.sparse.profile_sparse`; this module only renders it.
A latency is shown only when it was measured; the verdict says plainly when sparse is slower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from prunec.report.format import nbytes


#: Relative latency difference below which dense and sparse are called equally fast.
NOISE = 0.05


@dataclass
class SparseLayer:
    """One weight layer of the sparse model."""

    name: str
    op: str
    weight: str
    shape: tuple[int, ...]
    sparsity: float
    dense_bytes: int
    stored_bytes: int
    #: "dense initializer", "sparse initializer" or "csr custom op"
    storage: str
    #: the kernel ONNX Runtime runs: "dense" (sparse initializers are densified at load) or "sparse"
    kernel: str
    #: this layer alone, timed by the csr pass (kernel=scipy), else None
    dense_ms: float | None = None
    sparse_ms: float | None = None


@dataclass
class SparseProfile:
    """Whole-model sparse numbers; latencies are None when not measured."""

    layers: list[SparseLayer] = field(default_factory=list)
    sparsity: float = 0.0
    file_bytes_dense: int = 0
    file_bytes_sparse: int = 0
    provider: str = "CPUExecutionProvider"
    threads: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    runs: int = 0
    latency_dense_ms: float | None = None
    latency_sparse_ms: float | None = None
    max_rel_deviation: float | None = None

    @property
    def file_ratio(self) -> float | None:
        return self.file_bytes_sparse / self.file_bytes_dense if self.file_bytes_dense else None

    @property
    def speedup(self) -> float | None:
        """Measured dense latency over sparse latency (>1 means sparse is faster)."""
        if self.latency_dense_ms is None or not self.latency_sparse_ms:
            return None
        return self.latency_dense_ms / self.latency_sparse_ms

    def verdict(self) -> str:
        """One plain sentence about speed, never a theoretical speedup."""
        where = (f"on {self.provider}, {_shapes(self.input_shapes)}, "
                 f"{self.threads or 'default'} threads, median of {self.runs} interleaved runs each")
        s = self.speedup
        if s is None:
            return "latency not measured: no speed claim is made for this model"
        at = f"at {self.sparsity:.0%} sparsity"
        if not any(layer.kernel == "sparse" for layer in self.layers):
            return (f"{s:.2f}x: no faster than dense {at} {where}: ONNX Runtime densifies sparse "
                    "initializers at load and runs the same dense kernels (the difference is noise)")
        if s < 1 - NOISE:
            return f"{s:.2f}x: slower than dense {at} {where}"
        if s <= 1 + NOISE:
            return f"{s:.2f}x: no faster than dense (within {NOISE:.0%} noise) {at} {where}"
        return f"{s:.2f}x: faster than dense {at} {where}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        d.update(file_ratio=self.file_ratio, speedup=self.speedup, verdict=self.verdict())
        return d


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()) or "no inputs"


_STORAGE = {"dense initializer": "dense", "sparse initializer": "sparse init",
            "csr custom op": "csr op"}


def _pair(dense: float | None, sparse: float | None) -> str:
    return "" if dense is None or sparse is None else f"{dense:.3g} / {sparse:.3g}"


def sparse_table(profile: SparseProfile, limit: int | None = 40) -> Group:
    """Per-layer sparsity, bytes and kernel, then the totals and the measured verdict (a line
    below the table: a caption would wrap at the table's width)."""
    t = Table(title="sparse weights", title_justify="left")
    for col in ("layer", "sparsity", "bytes dense → stored", "storage", "kernel", "ms dense/sparse"):
        t.add_column(col, justify="right" if col in ("sparsity", "ms dense/sparse") else "left")
    layers = profile.layers if limit is None else profile.layers[:limit]
    for layer in layers:
        t.add_row(f"{layer.name} ({layer.op})", f"{layer.sparsity:.1%}",
                  f"{nbytes(layer.dense_bytes)} → {nbytes(layer.stored_bytes)}",
                  _STORAGE.get(layer.storage, layer.storage), layer.kernel,
                  _pair(layer.dense_ms, layer.sparse_ms))
    if limit is not None and len(profile.layers) > limit:
        t.add_row("…", f"{len(profile.layers) - limit} more", "", "", "", "")
    t.add_section()
    ratio = f" ({profile.file_ratio:.2f}x)" if profile.file_ratio is not None else ""
    t.add_row("model file", f"{profile.sparsity:.1%}",
              f"{nbytes(profile.file_bytes_dense)} → {nbytes(profile.file_bytes_sparse)}{ratio}",
              "", "", _pair(profile.latency_dense_ms, profile.latency_sparse_ms))
    return Group(t, Text(profile.verdict()))
