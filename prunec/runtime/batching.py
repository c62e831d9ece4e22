"""Choosing the evaluation batch size by measuring it.

The batch that runs a model fastest per sample is not the largest one. On the CPU a batch whose
activations outgrow the caches is slower per sample than a small one: PP-OCRv4's text recognizer
(48x320 inputs, ONNX Runtime 1.32, 2 threads) runs 400 words in 2.55 s at batch 8 and 4.30 s at
batch 64, the old default. Sensitivity sweeps and gates run a model over the same data many times,
so `fastest_batch` measures a ladder of batch sizes once on the first samples and keeps the
fastest. Which batch ran changes outputs only in float rounding; callers that compare outputs
run them all at the one chosen batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Batch sizes tried, smallest first. 64 was the fixed default before, so memory never grows.
CANDIDATES = (1, 2, 4, 8, 16, 32, 64)

#: Batches per-sample slower than the best so far by more than this, twice running, end the ladder.
_SLOWER = 1.1

#: Each batch size is timed over at least this many samples (small batches run several times), so
#: one run's jitter does not decide.
SPAN = 16


@dataclass(frozen=True)
class BatchChoice:
    """The batch an evaluation runs at, and why."""

    batch: int
    #: Measured milliseconds per sample, by batch size (empty when nothing was measured).
    ms_per_sample: dict[int, float] = field(default_factory=dict)
    #: Why nothing was measured, when the batch is a fallback.
    reason: str | None = None
    #: Wall-clock seconds the measuring took.
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for reports: the batch and the measurements behind it."""
        if not self.ms_per_sample:
            return f"batch {self.batch} ({self.reason})" if self.reason else f"batch {self.batch}"
        ladder = ", ".join(f"{b}: {ms:.3g}" for b, ms in sorted(self.ms_per_sample.items()))
        return (f"batch {self.batch}, the fastest measured in {self.seconds:.1f} s "
                f"(ms per sample at each batch: {ladder})")

    def to_dict(self) -> dict:
        return {"batch": self.batch, "ms_per_sample": {str(k): v for k, v in self.ms_per_sample.items()},
                "reason": self.reason, "seconds": self.seconds}


def fastest_batch(run: Callable[[dict[str, np.ndarray]], Any], inputs: dict[str, np.ndarray],
                  fixed: dict[str, np.ndarray] | None = None, *, candidates: tuple[int, ...] = CANDIDATES,
                  repeats: int = 2, fallback: int = 64,
                  clock: Callable[[], float] = time.perf_counter) -> BatchChoice:
    """The batch size (among `candidates`, at most the number of samples) with the least time per
    sample when `run` is called on the first samples of `inputs` (`fixed` inputs are fed whole).

    Each batch is run once to warm up (first runs at a new shape allocate), then timed over at
    least SPAN samples (a small batch runs several times). The ladder stops early once two batches
    in a row are more than 1.1x slower per sample than the best so far. Then the sizes measured are
    timed again, `repeats` passes in all, each keeping its best time. A batch the model cannot run
    at (a reshape that fixes the batch dim) is skipped; when none runs, the result is `fallback`,
    unmeasured, and the caller's own run reports the model's error.
    """
    fixed = dict(fixed or {})
    n = len(next(iter(inputs.values()))) if inputs else 0
    sizes = [b for b in sorted(set(candidates)) if 0 < b <= n]
    if not sizes:
        return BatchChoice(min(fallback, max(n, 1)), reason="no samples to measure on")
    measured: dict[int, float] = {}
    slower = 0
    start = time.perf_counter()
    feeds = {}
    for b in sizes:  # the ladder: warm up, time once, stop past the fastest
        feeds[b] = {**{k: v[:b] for k, v in inputs.items()}, **fixed}
        runs = -(-SPAN // b)
        try:
            run(feeds[b])
            measured[b] = _timed(run, feeds[b], clock, runs) / (b * runs) * 1e3
        except Exception:  # noqa: BLE001, S112  (the runtime's own error types; the real run reports them)
            continue
        slower = slower + 1 if measured[b] > _SLOWER * min(measured.values()) else 0
        if slower >= 2:
            break
    for _ in range(max(1, repeats) - 1):  # later passes over the same sizes: a disturbance in
        for b in list(measured):         # one pass does not decide, the best time of each counts
            runs = -(-SPAN // b)
            measured[b] = min(measured[b], _timed(run, feeds[b], clock, runs) / (b * runs) * 1e3)
    if not measured:
        return BatchChoice(fallback, reason="the model ran at none of the measured batch sizes",
                           seconds=time.perf_counter() - start)
    batch = min(measured, key=measured.get)
    return BatchChoice(batch, measured, seconds=time.perf_counter() - start)


def _timed(run: Callable[[dict[str, np.ndarray]], Any], feed: dict[str, np.ndarray],
           clock: Callable[[], float], runs: int) -> float:
    t0 = clock()
    for _ in range(runs):
        run(feed)
    return clock() - t0
