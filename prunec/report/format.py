"""Number formatting shared by every report, so the same number always reads the same way."""

from __future__ import annotations


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'. None -> '?'."""
    if n is None:
        return "?"
    n = float(n)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}" if n != int(n) else f"{int(n)}{unit}"


def arrow(before: float | int | None, after: float | int | None) -> str:
    """'1.2M → 600k (-50.0%)'."""
    if before is None or after is None:
        return f"{human(before)} → {human(after)}"
    if before == after:
        return f"{human(before)} (=)"
    pct = (after - before) / before * 100 if before else 0.0
    return f"{human(before)} → {human(after)} ({pct:+.1f}%)"


def nbytes(n: int | None) -> str:
    """Bytes in KiB/MiB/GiB."""
    if n is None:
        return "?"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"


_METRICS = {"top1": "top-1 %", "agreement": "agreement %", "cosine": "cosine %"}


def metric_label(metric: str) -> str:
    """'top1' -> 'top-1 %'; a task metric 'task:exact_match' -> 'exact_match %'."""
    return _METRICS.get(metric, f"{metric.removeprefix('task:')} %")
