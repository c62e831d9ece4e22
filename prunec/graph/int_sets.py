"""Sets of non-negative integers (atoms, class ids) as numpy arrays, by sorting and lookup tables.

numpy 2.4's `np.unique` on an integer array without extra outputs uses a hash table: on the
channel analysis's arrays (tens of thousands of int64 keys) it is some 30x slower than sorting,
and its first call in a run costs milliseconds more; `np.isin` pays the same for its `unique`.
These give the same arrays.
"""

from __future__ import annotations

import numpy as np


def unique(x) -> np.ndarray:
    """`np.unique(x)` (flattened, sorted, distinct), by one sort."""
    s = np.sort(np.asarray(x), axis=None)
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def member(x: np.ndarray, ids, size: int) -> np.ndarray:
    """`np.isin(x, ids)` for integers `x` and `ids` in [0, size): a lookup table of `size`."""
    table = np.zeros(size, dtype=bool)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size:
        table[ids] = True
    return table[x]
