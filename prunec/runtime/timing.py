"""Interleaved latency measurement: candidates take turns, so machine noise hits them alike."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved_ms(runners: dict[str, Callable[[], object]], *, runs: int = 20,
                   warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each runner, calling them round-robin `runs` times."""
    return {k: float(np.median(v)) for k, v in interleaved_samples(runners, runs=runs, warmup=warmup).items()}


def interleaved_samples(runners: dict[str, Callable[[], object]], *, runs: int = 20,
                        warmup: int = 2) -> dict[str, list[float]]:
    """Every timed call in milliseconds, per runner, calling them round-robin `runs` times."""
    for _ in range(warmup):
        for f in runners.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(max(1, runs)):
        for k, f in runners.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: [t * 1e3 for t in v] for k, v in times.items()}
