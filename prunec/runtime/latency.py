"""Latency measurement: warm-up, interleaved timed runs, and distribution-free statistics.

Models being compared run in one process, turn by turn in ABBA order, so machine noise (other
processes, clock changes, thermal drift) hits both alike and order effects cancel. Two things
keep an idle session from distorting the running one on a small machine: ONNX Runtime's
intra-op threads are told not to spin (`make_session(spin=False)`), and each timed run starts
after a short sleep so a previous run's threads have settled.

Two sessions of the very same model differ by about 1% in median latency on a busy machine
(measured: 2 of 15 self-comparisons had a paired-bootstrap interval excluding 1.0), more than
the run-to-run noise within one session. So the budget is split over several independently
built sessions per model (`TimingPlan.sessions`, default 4), and every interval is the union of
  - a within-session interval: order statistics (binomial) for the median, a bootstrap over the
    paired runs for the speedup, and
  - a between-session interval: Student t over the per-session values, on a log scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from prunec.errors import ModelRunError, OptionError
from prunec.runtime.session import first_line, is_ort_error

#: Called between timed runs (never inside one) with the fraction of the plan done, 0..1.
Progress = Callable[[float], None]


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure: a fixed number of runs per model, or a wall-clock budget."""

    runs: int | None = None
    seconds: float | None = 2.0
    warmup: int = 5
    gap_s: float = 0.001
    min_runs: int = 5
    max_runs: int = 100_000
    sessions: int = 4

    def __post_init__(self) -> None:
        if (self.runs is None) == (self.seconds is None):
            raise OptionError("a timing plan needs exactly one of runs and seconds")
        if self.runs is not None and self.runs < 1:
            raise OptionError(f"runs must be at least 1, got {self.runs}")
        if self.seconds is not None and self.seconds <= 0:
            raise OptionError(f"seconds must be positive, got {self.seconds}")
        if self.warmup < 0 or self.gap_s < 0:
            raise OptionError("warmup and gap must not be negative")
        if self.sessions < 1:
            raise OptionError(f"sessions must be at least 1, got {self.sessions}")

    def split(self) -> list["TimingPlan"]:
        """One plan per independently built session: the runs or seconds shared among them.

        With few runs, fewer sessions (at least 5 runs each) so each session's median means something.
        """
        if self.runs is not None:
            n = max(1, min(self.sessions, self.runs // 5))
            return [replace(self, runs=self.runs // n + (k < self.runs % n), sessions=1) for k in range(n)]
        return [replace(self, seconds=self.seconds / self.sessions, sessions=1)
                for _ in range(self.sessions)]

    @classmethod
    def of(cls, runs: int | None = None, seconds: float | None = None, **kw) -> "TimingPlan":
        """A plan from the user's --runs / --seconds (exclusive; neither means the default budget)."""
        if runs is not None and seconds is not None:
            raise OptionError("give --runs or --seconds, not both")
        if runs is not None:
            return cls(runs=runs, seconds=None, **kw)
        return cls(runs=None, seconds=seconds if seconds is not None else cls.seconds, **kw)


@dataclass
class LatencyStats:
    """Latency of one model at one batch size, in milliseconds, with the raw samples."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    median_ci_ms: tuple[float, float]
    confidence: float
    items_per_s: float
    sessions: int = 1  # independently built sessions the runs came from
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float] | Sequence[np.ndarray], batch: int, *,
                     confidence: float = 0.95) -> "LatencyStats":
        """Percentiles, mean, the median's interval and throughput (items/s at the median).

        `samples_ms` is one list of runs, or a list of arrays, one per independently built session.
        """
        segments = _segments(samples_ms)
        x = np.concatenate(segments)
        if x.size == 0:
            raise ValueError("no samples")
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        lo, hi = median_ci(x, confidence)
        rlo, rhi = replicate_ci(float(p50), [float(np.median(s)) for s in segments], confidence)
        return cls(batch=batch, runs=int(x.size), p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99), mean_ms=float(x.mean()), min_ms=float(x.min()),
                   median_ci_ms=(min(lo, rlo), max(hi, rhi)), confidence=confidence,
                   sessions=len(segments),
                   items_per_s=batch / (float(p50) / 1e3) if p50 > 0 else float("inf"),
                   samples_ms=[float(v) for v in x])

    def to_dict(self, samples: bool = False) -> dict:
        """JSON-ready dict; raw samples only when asked (they can be long)."""
        d = {"batch": self.batch, "runs": self.runs, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms,
             "p99_ms": self.p99_ms, "mean_ms": self.mean_ms, "min_ms": self.min_ms,
             "median_ci_ms": list(self.median_ci_ms), "confidence": self.confidence,
             "items_per_s": self.items_per_s, "sessions": self.sessions}
        if samples:
            d["samples_ms"] = list(self.samples_ms)
        return d


@dataclass
class SpeedupStats:
    """Speedup of `after` over `before` at one batch size: ratio of medians and its interval."""

    batch: int
    speedup: float
    ci: tuple[float, float]
    confidence: float
    pairs: int
    theoretical: float | None = None  # MACs before / MACs after
    sessions: int = 1

    @property
    def realized(self) -> float | None:
        """Measured speedup as a fraction of the speedup the MAC reduction predicts."""
        if not self.theoretical:
            return None
        return self.speedup / self.theoretical

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"batch": self.batch, "speedup": self.speedup, "ci": list(self.ci),
                "confidence": self.confidence, "pairs": self.pairs, "sessions": self.sessions,
                "theoretical": self.theoretical, "realized": self.realized}


def _segments(samples) -> list[np.ndarray]:
    if len(samples) and np.ndim(samples[0]) == 1:
        return [np.asarray(s, dtype=np.float64) for s in samples]
    return [np.asarray(samples, dtype=np.float64)]


def t_quantile(p: float, df: int) -> float:
    """Student t quantile without scipy: exact for df 1 and 2, a Cornish-Fisher series above
    (within 1% of the exact value from df 3 on)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def replicate_ci(center: float, per_session: Sequence[float], confidence: float = 0.95
                 ) -> tuple[float, float]:
    """Between-session interval around `center`: Student t over log(per-session values).

    With one session there is nothing to say about between-session spread: (center, center).
    """
    v = np.log(np.asarray(per_session, dtype=np.float64))
    if v.size < 2 or center <= 0:
        return center, center
    half = t_quantile(0.5 + confidence / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return center * math.exp(-half), center * math.exp(half)


def median_ci(samples: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median from order statistics (binomial with p=1/2).

    With too few samples for the requested confidence, the full range is returned (its
    coverage, 1 - 2/2**n, is then the best any order-statistic interval can do).
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("no samples")
    alpha = 1.0 - confidence
    k = np.arange(n)
    # log C(n, k) by the recurrence C(n, k+1) = C(n, k) (n-k)/(k+1); exact enough and O(n).
    logc = np.concatenate([[0.0], np.cumsum(np.log(n - k) - np.log(k + 1))])
    cdf = np.cumsum(np.exp(logc - n * np.log(2.0)))
    # j = how many k have P(B <= k) <= alpha/2; then x_(j) (1-based) is the lower bound.
    j = int(np.searchsorted(cdf, alpha / 2, side="right"))
    if j == 0:
        return float(x[0]), float(x[-1])
    return float(x[j - 1]), float(x[n - j])


def speedup_ci(before_ms: Sequence[float], after_ms: Sequence[float], *, confidence: float = 0.95,
               n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians before/after and a percentile bootstrap interval over paired runs.

    Run i of each model was measured back to back, so pairs share the machine's state at that
    moment; resampling pairs (not each list on its own) keeps that shared noise out of the ratio.
    """
    a = np.asarray(before_ms, dtype=np.float64)
    b = np.asarray(after_ms, dtype=np.float64)
    if a.size != b.size or a.size == 0:
        raise ValueError("need the same, non-zero number of runs for both models")
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    n = a.size
    chunk = max(1, 2_000_000 // n)  # bound memory: chunk x n indices at a time
    ratios = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        ratios.append(np.median(a[idx], axis=1) / np.median(b[idx], axis=1))
    r = np.concatenate(ratios)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return ratio, float(lo), float(hi)


def _order(n_models: int, pair: int) -> list[int]:
    # ABBA: even pairs run A then B, odd pairs B then A, so neither model is always first.
    seq = list(range(n_models))
    return seq if pair % 2 == 0 else seq[::-1]


def _runner(sess) -> Callable[[dict], object]:
    """A one-argument run: a prunec runtime Session's `infer`, or an InferenceSession's run."""
    if isinstance(sess, ort.InferenceSession):
        names = [o.name for o in sess.get_outputs()]
        return lambda feeds: sess.run(names, feeds)
    return sess.infer


def _first_run(run: Callable[[dict], object], feeds: dict[str, np.ndarray]) -> None:
    """Run once; a model that cannot run on these inputs fails here, in one line."""
    try:
        run(feeds)
    except Exception as exc:
        if not is_ort_error(exc):
            raise
        shapes = ", ".join(f"{n}={list(v.shape)}" for n, v in feeds.items())
        raise ModelRunError(f"ONNX Runtime cannot run the model on prunec's made-up inputs ({shapes}): "
                            f"{first_line(exc)}; give inputs that need real values with --feed NAME=VALUE"
                            ) from exc


def time_sessions(sessions: Sequence, feeds: Sequence[dict[str, np.ndarray]],
                  plan: TimingPlan, *, progress: Progress | None = None) -> list[np.ndarray]:
    """Warm up, then time the sessions interleaved; returns per-session latencies in ms.

    Sessions are prunec runtime sessions (`prunec.runtime.runtimes.Session`) or ONNX Runtime
    InferenceSessions. Every session gets the same number of runs, so run i of each forms a
    pair measured within the same few milliseconds.
    """
    if len(sessions) != len(feeds) or not sessions:
        raise ValueError("one feed dict per session")
    runners = [_runner(s) for s in sessions]
    for r, f in zip(runners, feeds):
        _first_run(r, f)  # also the first warm-up run
    for _ in range(plan.warmup - 1):
        for r, f in zip(runners, feeds):
            r(f)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    last_report = start
    pair = 0
    while True:
        for i in _order(len(sessions), pair):
            if plan.gap_s:
                time.sleep(plan.gap_s)
            t0 = time.perf_counter_ns()
            runners[i](feeds[i])
            times[i].append((time.perf_counter_ns() - t0) / 1e6)
        pair += 1
        now = time.perf_counter()
        if plan.runs is not None:
            done = pair / plan.runs
            finished = pair >= plan.runs
        else:
            done = (now - start) / plan.seconds
            finished = (done >= 1.0 and pair >= plan.min_runs) or pair >= plan.max_runs
        if progress is not None and (finished or now - last_report > 0.1):
            progress(min(done, 1.0) if not finished else 1.0)
            last_report = now
        if finished:
            break
    return [np.asarray(t) for t in times]
