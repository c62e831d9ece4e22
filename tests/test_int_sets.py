"""`int_sets` gives exactly numpy's `unique` and `isin` on integer arrays."""

from __future__ import annotations

import numpy as np
import pytest

from prunec.graph.int_sets import member, unique


@pytest.mark.parametrize("shape,high", [((0,), 5), ((1,), 5), ((7,), 3), ((40, 3), 10), ((5000,), 1 << 40)])
def test_unique_is_numpys(shape, high):
    x = np.random.default_rng(0).integers(0, high, size=shape)
    got, want = unique(x), np.unique(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n_ids", [0, 1, 9, 300])
def test_member_is_isin(n_ids):
    r = np.random.default_rng(1)
    x = r.integers(0, 500, size=(30, 4))
    ids = np.concatenate([r.choice(x.ravel(), size=(n_ids + 1) // 2), r.integers(0, 500, size=n_ids // 2)])
    got = member(x, ids, 500)
    assert got.shape == x.shape
    np.testing.assert_array_equal(got, np.isin(x, ids))
    np.testing.assert_array_equal(member(x, list(ids), 500), np.isin(x, ids))
