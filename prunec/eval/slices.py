"""Slices: named subsets of the evaluation samples on which accuracy is gated separately.

Built in: everything, each class, the rare classes together, user columns (`slice_<name>`),
short vs long inputs where an input has a dynamic length axis, and corrupted copies of image
inputs. A slice is sample indices plus the input *variant* they are read from ("clean" or a
corruption such as "gaussian_noise@3"), so each variant is run through a model only once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunec.eval.data import EvalData
from prunec.runtime.inputs import InputSpec

CLEAN = "clean"
#: Every slice kind, in the order build_slices makes them (also keys for per-kind thresholds).
KINDS = ("all", "class", "rare", "user", "length", "corruption")


@dataclass
class Slice:
    """A named subset of samples, read from one input variant."""

    name: str
    kind: str  # all | class | rare | user | length | corruption
    indices: np.ndarray
    variant: str = CLEAN

    @property
    def n(self) -> int:
        """Number of samples in the slice."""
        return len(self.indices)


def class_slices(classes: np.ndarray, *, prefix: str = "class", rare_quantile: float = 0.25,
                 rare_share: float = 0.5, max_classes: int = 50) -> list[Slice]:
    """One slice per class (when there are at most `max_classes`) and one `rare` slice.

    A class is rare when its sample count is below the `rare_quantile` quantile of the per-class
    counts and below `rare_share` times the median count, so (nearly) balanced data has none.
    """
    values, counts = np.unique(classes, return_counts=True)
    out = []
    if len(values) <= max_classes:
        out += [Slice(f"{prefix}={v}", "class", np.flatnonzero(classes == v)) for v in values]
    if len(values) > 1:
        threshold = np.quantile(counts, rare_quantile)
        rare = values[(counts < threshold) & (counts < rare_share * np.median(counts))]
        if len(rare):
            out.append(Slice("rare", "rare", np.flatnonzero(np.isin(classes, rare))))
    return out


def user_slices(columns: dict[str, np.ndarray], *, max_values: int = 50) -> list[Slice]:
    """One slice per distinct value of each user column (`slice_<name>` in the data)."""
    out = []
    for col, values in sorted(columns.items()):
        distinct = np.unique(values)
        if len(distinct) > max_values:
            continue  # an id-like column, not a grouping; nothing useful to gate per value
        out += [Slice(f"{col}={v}", "user", np.flatnonzero(values == v)) for v in distinct]
    return out


def sample_lengths(x: np.ndarray, axis: int) -> np.ndarray:
    """Per-sample length along `axis`: one past the last position holding any non-zero value."""
    moved = np.moveaxis(x, axis, 1).reshape(x.shape[0], x.shape[axis], -1)
    nonzero = np.any(moved != 0, axis=2)
    last = x.shape[axis] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0)


def length_slices(data: EvalData, specs: list[InputSpec]) -> list[Slice]:
    """`short` and `long` (split at the median) for the first input with a dynamic non-batch axis."""
    for s in specs:
        dyn = [i for i, d in enumerate(s.dims) if i > 0 and not isinstance(d, int)]
        if not dyn:
            continue
        lengths = data.lengths if data.lengths is not None else sample_lengths(data.inputs[s.name], dyn[0])
        lengths = np.asarray(lengths)
        if lengths.min() == lengths.max():
            return []
        mid = float(np.median(lengths))
        short = lengths <= mid if (lengths > mid).any() else lengths < mid
        return [Slice(f"short (len<={int(lengths[short].max())})", "length", np.flatnonzero(short)),
                Slice(f"long (len>={int(lengths[~short].min())})", "length", np.flatnonzero(~short))]
    return []


def corruption_names(corruptions: list[str], severities: list[int]) -> list[str]:
    """The variant (and slice) name of each corruption at each severity: `gaussian_noise@3`."""
    return [f"{c}@{sev}" for c in corruptions for sev in severities]


def corruption_slices(n: int, variants: list[str]) -> list[Slice]:
    """One slice over all samples per corruption variant, e.g. `gaussian_noise@3`."""
    return [Slice(v, "corruption", np.arange(n), variant=v) for v in variants]


def build_slices(data: EvalData, specs: list[InputSpec], *, classes: np.ndarray | None = None,
                 class_prefix: str = "class", corruption_variants: list[str] = (),
                 rare_quantile: float = 0.25) -> list[Slice]:
    """Every slice for this data: all, per class + rare, user, length, corruptions (in that order)."""
    n = data.n
    out = [Slice("all", "all", np.arange(n))]
    if classes is not None:
        out += class_slices(np.asarray(classes), prefix=class_prefix, rare_quantile=rare_quantile)
    out += user_slices(data.slices)
    out += length_slices(data, specs)
    out += corruption_slices(n, list(corruption_variants))
    return out
