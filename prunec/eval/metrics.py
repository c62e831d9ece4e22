"""Per-sample scores and their means with bootstrap confidence intervals.

Every metric here is a mean of per-sample scores (1/0 for correct/agree, a cosine, a relative
error), so one bootstrap over samples gives every interval, and the paired difference between
two models on the same samples gives a tighter interval for the drop than two separate ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Below this many samples a slice's numbers are flagged as too few to trust.
MIN_SAMPLES = 30


@dataclass
class Estimate:
    """A mean with its bootstrap interval and the number of samples behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, conf: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (nan, nan when empty)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Resample in chunks so a large slice does not allocate n_boot x n at once.
    means = []
    chunk = max(1, 2_000_000 // v.size)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, v.size, size=(min(chunk, n_boot - start), v.size))
        means.append(v[idx].mean(axis=1))
    m = np.concatenate(means)
    alpha = (1 - conf) / 2
    lo, hi = np.quantile(m, [alpha, 1 - alpha])
    # Interpolation can put a bound a hair past the mean on degenerate data; keep it enclosing.
    mean = float(v.mean())
    return min(float(lo), mean), max(float(hi), mean)


def estimate(values: np.ndarray, *, n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-sample `values` with its bootstrap interval and sample count."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = bootstrap_ci(v, n_boot=n_boot, conf=conf, seed=seed)
    return Estimate(float(v.mean()), lo, hi, int(v.size))


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """Per sample: is the label among the k highest scores? For sequences (N, T, C): all T right (k=1)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim == 2:
        k = min(k, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        return (top == labels[:, None]).any(axis=1)
    return (logits.argmax(-1) == labels).reshape(len(labels), -1).all(axis=1)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample: does the candidate's top-1 class equal the reference's (all positions for sequences)?"""
    a = np.asarray(reference).argmax(-1).reshape(len(reference), -1)
    b = np.asarray(candidate).argmax(-1).reshape(len(candidate), -1)
    return (a == b).all(axis=1)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of two outputs (1.0 where both are all zero)."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = dot / (na * nb)
    return np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, c))


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-sample ||candidate - reference|| / ||reference|| (0 when both are zero)."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    num, den = np.linalg.norm(b - a, axis=1), np.linalg.norm(a, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.where(den == 0, np.where(num == 0, 0.0, np.inf), r)


def is_classifier(output: np.ndarray, labels: np.ndarray | None) -> bool:
    """Classification outputs: labels whose shape is the output's minus the class axis, or (N, C) logits."""
    if output.dtype.kind != "f" or output.ndim < 2 or output.shape[-1] < 2:
        return False
    if labels is not None:
        return labels.shape == output.shape[:-1]
    return output.ndim == 2
