"""Intermediate activations on calibration data, reduced as they stream by, shared by passes.

A pass asks for `Request(tensor, reducer)` pairs; `ActivationStore.collect` adds every requested
tensor that is not already known as a graph output, runs ONNX Runtime over the calibration
samples in batches (one pass over the data for all requests made together), and feeds each
batch to each reducer, so only the reductions are kept, never the activations. Results are
memoized per (model fingerprint, tensor, reducer): a second pass asking for the same statistics
of the same model gets them without running anything.

Reducers see a batch as ONNX Runtime returns it (samples on axis 0) and the index of its first
sample, so anything sampled per sample (spatial positions) is drawn from a seed fixed per
sample: two models run over the same samples pick the same positions, which is what lets a
pass pair rows of one model's activations with rows of another's.

Padded sequences: a calibration `mask` ([samples, L], True at real positions) keeps padding out
of every reduction of a channels-last tensor whose axis 1 is that sequence axis ([N, L, ..., C],
a transformer's hidden states): padding tokens are not data, and in a batch padded to its
longest sentence they can outnumber the real ones.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Protocol

import numpy as np
import onnx

from prunec.errors import DataError


class Accumulator(Protocol):
    """Running state of one reducer over one pass."""

    def add(self, value: np.ndarray, first: int, mask: np.ndarray | None = None) -> None:
        """Fold in a batch; `first` is the index of the batch's first sample, `mask` the
        batch's rows of the calibration mask (see `valid_positions`)."""

    def result(self) -> Any:
        """The reduction over every batch added."""


class Reducer:
    """How to reduce one tensor over the calibration data. Subclasses are frozen dataclasses
    (so they are their own memo key) or override `key`."""

    def key(self) -> Hashable:
        return self

    def start(self) -> Accumulator:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Request:
    """A tensor of the model, and what to reduce it to."""

    tensor: str
    reducer: Reducer

    def key(self) -> tuple:
        return (self.tensor, self.reducer.key())


# ----------------------------------------------------------------------------------------------
# Reducers


@dataclass
class ChannelStats:
    """Per-channel statistics along one axis, over samples and every other axis."""

    count: int  # values per channel
    mean: np.ndarray
    var: np.ndarray  # population variance
    abs_mean: np.ndarray
    #: Shape of one sample (without the sample axis), as last seen.
    sample_shape: tuple[int, ...]


@dataclass(frozen=True)
class ChannelMoments(Reducer):
    """Running per-channel mean, variance and mean |x| along `axis` (negative counts from the
    end, so channels-last tensors such as [N, T, C] MatMul outputs use axis=-1)."""

    axis: int = 1

    def start(self) -> "_Moments":
        return _Moments(self.axis)


class _Moments:
    def __init__(self, axis: int):
        self.axis = axis
        self.n = 0
        self.mean = self.m2 = self.abs_sum = None
        self.shape: tuple[int, ...] = ()

    def add(self, value: np.ndarray, first: int, mask: np.ndarray | None = None) -> None:
        value = np.asarray(value)
        self.shape = tuple(value.shape[1:])
        valid = valid_positions(value, self.axis, mask)
        v = np.moveaxis(value, self.axis, -1)
        v = v.reshape(len(v), -1, v.shape[-1])
        v = (v[valid] if valid is not None else v.reshape(-1, v.shape[-1])).astype(np.float64)
        n_b = v.shape[0]
        if n_b == 0:
            return
        mean_b = v.mean(axis=0)
        m2_b = np.square(v - mean_b).sum(axis=0)
        abs_b = np.abs(v).sum(axis=0)
        if self.mean is None:
            self.n, self.mean, self.m2, self.abs_sum = n_b, mean_b, m2_b, abs_b
            return
        # Chan et al.'s pairwise merge: stable for long streams of batches.
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * n_b / n)
        self.abs_sum = self.abs_sum + abs_b
        self.n = n

    def result(self) -> ChannelStats:
        if self.mean is None:
            raise DataError("no calibration samples reached this tensor")
        return ChannelStats(self.n, self.mean, self.m2 / self.n, self.abs_sum / self.n, self.shape)


@functools.lru_cache(maxsize=1 << 16)
def sample_positions(total: int, count: int, seed: int, sample: int) -> np.ndarray:
    """`count` of `total` positions for sample number `sample`, drawn from a seed fixed per
    (seed, sample) and sorted; all of them when count >= total."""
    if count >= total:
        return np.arange(total)
    rng = np.random.default_rng((seed, sample))
    return np.sort(rng.choice(total, size=count, replace=False))


def batch_positions(total: int, count: int, seed: int, first: int, n: int) -> np.ndarray:
    """[n, min(count, total)] sampled positions for samples first..first+n-1."""
    return np.stack([sample_positions(total, count, seed, first + i) for i in range(n)])


def valid_positions(value: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray | None:
    """[n, positions] True where a position of `value` (channels on `axis`, every other
    non-sample axis flattened in order) is real, or None when all are: the calibration mask
    ([n, L]) applies to tensors whose axis 1 is the L-long sequence and whose channels are not
    on axis 1."""
    if mask is None or value.ndim < 3 or axis % value.ndim == 1 or value.shape[1] != mask.shape[1]:
        return None
    inner = int(np.prod([d for i, d in enumerate(value.shape[2:], 2) if i != axis % value.ndim]))
    return np.repeat(np.asarray(mask, dtype=bool), inner, axis=1)


@dataclass
class Rows:
    """Rows sampled from a tensor, sample after sample: `counts[i]` rows for sample i."""

    values: np.ndarray  # [rows, channels] float32
    counts: np.ndarray  # rows per sample

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def of_samples(self, first: int, n: int) -> np.ndarray:
        """The rows of samples first..first+n-1."""
        return self.values[self.offsets[first]:self.offsets[first + n]]


@dataclass(frozen=True)
class SampledRows(Reducer):
    """`positions` positions per sample (every axis but the sample and channel axes flattened),
    drawn with `seed`, as rows of channel values: the targets of a least-squares fit."""

    axis: int = 1
    positions: int = 32
    seed: int = 0

    def start(self) -> "_RowsAcc":
        return _RowsAcc(self)


def rows_at(value: np.ndarray, axis: int, positions: int, seed: int, first: int,
            mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `value` ([n, ...] with channels on `axis`) at `positions` sampled positions per
    sample (among its real ones, with a `mask`), and the row count of each sample."""
    value = np.asarray(value)
    valid = valid_positions(value, axis, mask)
    v = np.moveaxis(value, axis, -1)
    n, c = v.shape[0], v.shape[-1]
    v = v.reshape(n, -1, c)
    if valid is None:
        picks = batch_positions(v.shape[1], positions, seed, first, n)
        return v[np.arange(n)[:, None], picks].reshape(-1, c), np.full(n, picks.shape[1])
    rows, counts = [], []
    for i in range(n):
        real = np.flatnonzero(valid[i])
        pick = real[sample_positions(len(real), positions, seed, first + i)]
        rows.append(v[i, pick])
        counts.append(len(pick))
    return (np.concatenate(rows) if rows else np.zeros((0, c), v.dtype)), np.asarray(counts)


class _RowsAcc:
    def __init__(self, spec: SampledRows):
        self.spec = spec
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []

    def add(self, value: np.ndarray, first: int, mask: np.ndarray | None = None) -> None:
        rows, counts = rows_at(value, self.spec.axis, self.spec.positions, self.spec.seed, first, mask)
        self.parts.append((first, rows.astype(np.float32, copy=False), counts))

    def result(self) -> Rows:
        self.parts.sort(key=lambda p: p[0])
        if not self.parts:
            return Rows(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        values = np.concatenate([p[1] for p in self.parts])
        counts = np.concatenate([p[2] for p in self.parts])
        self.parts = []
        return Rows(values, counts)


# ----------------------------------------------------------------------------------------------
# The store


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the model's bytes: same graph and weights, same fingerprint."""
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()


def nbytes(obj: Any) -> int:
    """Bytes held by the arrays inside a result (dataclasses, tuples, dicts, lists)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


class ActivationStore:
    """Runs calibration samples through models and keeps reductions of their activations.

    `passes` counts the passes over the data actually made (a memo hit makes none)."""

    def __init__(self, inputs: dict[str, np.ndarray], *, mask: np.ndarray | None = None,
                 batch_bytes: int = 256 << 20, memo_bytes: int = 2 << 30, provider: str = "cpu",
                 threads: int | None = None):
        self.inputs = inputs
        self.mask = mask
        self.batch_bytes = batch_bytes
        self.memo_bytes = memo_bytes
        self.provider = provider
        self.threads = threads
        self.passes = 0
        self._memo: OrderedDict[tuple, Any] = OrderedDict()

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))

    def collect(self, model: onnx.ModelProto, requests: Iterable[Request], *, fp: str | None = None,
                samples: int | None = None, memo: bool = True) -> dict[Request, Any]:
        """Every request's result on `model` over the first `samples` samples (default: all),
        computing all missing ones in one pass. `memo=False` keeps big one-off results (rows)
        out of the memo."""
        requests = list(dict.fromkeys(requests))
        fp = fp or fingerprint(model)
        n = self.n if samples is None else min(samples, self.n)
        out: dict[Request, Any] = {}
        missing = []
        for r in requests:
            key = (fp, n) + r.key()
            if key in self._memo:
                self._memo.move_to_end(key)
                out[r] = self._memo[key]
            else:
                missing.append(r)
        if missing:
            fresh = self._run(model, missing, n)
            for r, res in fresh.items():
                out[r] = res
                if memo:
                    self._remember((fp, n) + r.key(), res)
        return out

    def forget(self, model_fp: str | None = None) -> None:
        """Drop memoized results (of one model fingerprint, or all)."""
        for key in [k for k in self._memo if model_fp is None or k[0] == model_fp]:
            del self._memo[key]

    def _remember(self, key: tuple, result: Any) -> None:
        self._memo[key] = result
        total = sum(nbytes(v) for v in self._memo.values())
        while total > self.memo_bytes and len(self._memo) > 1:
            _, old = self._memo.popitem(last=False)
            total -= nbytes(old)

    def _run(self, model: onnx.ModelProto, requests: list[Request], n: int) -> dict[Request, Any]:
        from prunec.runtime.session import make_session

        tensors = list(dict.fromkeys(r.tensor for r in requests))
        graph = model.graph
        known = {o.name for o in graph.output}
        added = [t for t in tensors if t not in known]
        produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        unknown = [t for t in added if t not in produced]
        if unknown:
            raise ValueError(f"tensors not in the model: {unknown[:5]}")
        n_out = len(graph.output)
        ir = model.ir_version
        try:
            graph.output.extend(onnx.ValueInfoProto(name=t) for t in added)
            model.ir_version = min(ir, 10)  # what this onnxruntime accepts
            sess = make_session(model, provider=self.provider, threads=self.threads)
        finally:
            del graph.output[n_out:]
            model.ir_version = ir
        accs = {r: r.reducer.start() for r in requests}
        by_tensor: dict[str, list[Request]] = {}
        for r in requests:
            by_tensor.setdefault(r.tensor, []).append(r)
        feeds_all = {k: v[:n] for k, v in feeds_for(sess, self.inputs).items()}
        for first, n_b, values in stream(sess, feeds_all, tensors, self.batch_bytes):
            mask = self.mask[first:first + n_b] if self.mask is not None else None
            for t, v in values.items():
                for r in by_tensor[t]:
                    accs[r].add(v, first, mask)
        self.passes += 1
        return {r: a.result() for r, a in accs.items()}


def feeds_for(sess, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibration arrays a session needs, or a DataError naming the missing inputs."""
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise DataError(f"calibration data has no array for model input(s) {', '.join(missing)}")
    return {n: inputs[n] for n in names}


def stream(sess, feeds: dict[str, np.ndarray], outputs: list[str], batch_bytes: int,
           first_batch: int = 4):
    """Yield (first sample, samples, {output: batch values}) over all samples. The batch size is
    chosen after a first small batch so that one batch's outputs stay near `batch_bytes`."""
    n = len(next(iter(feeds.values())))
    start, size = 0, min(first_batch, n)
    while start < n:
        part = {k: v[start:start + size] for k, v in feeds.items()}
        values = dict(zip(outputs, sess.run(outputs, part)))
        got = len(next(iter(part.values())))
        yield start, got, values
        if start == 0:
            per_sample = max(sum(v.nbytes for v in values.values()) / max(got, 1), 1.0)
            size = int(max(1, min(256, batch_bytes // per_sample)))
        start += got
