"""Moment arithmetic: exact pooling whatever the batching, both variance conventions."""

import numpy as np
import pytest

from bnrepair.moments import Moments


def pooled(x, sizes, axis=-1):
    total, start = Moments(0, np.zeros(()), np.zeros(())), 0
    for size in sizes:
        total = total.merge(Moments.from_array(x[start:start + size], axis))
        start += size
    return total


def test_uneven_batches_pool_to_the_whole_set():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (101, 5, 4)).astype(np.float32)
    whole = Moments.from_array(x, -1)
    for sizes in ([101], [32, 32, 32, 5], [1] * 101, [50, 1, 50]):
        got = pooled(x, sizes)
        assert got.count == whole.count == 101 * 5
        np.testing.assert_allclose(got.mean, whole.mean, rtol=1e-12)
        np.testing.assert_allclose(got.m2, whole.m2, rtol=1e-10)


def test_variance_conventions_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    m = Moments.from_array(x, 1)
    np.testing.assert_allclose(m.variance(unbiased=False), x.var(axis=0, ddof=0))
    np.testing.assert_allclose(m.variance(unbiased=True), x.var(axis=0, ddof=1))


def test_large_offset_does_not_cancel():
    """Sum-of-squares formulas lose every digit here; the pairwise merge keeps them."""
    rng = np.random.default_rng(2)
    x = 1e6 + rng.normal(0, 1e-2, (4096, 2))
    got = pooled(x, [1000, 1000, 2096], axis=1)
    np.testing.assert_allclose(got.variance(False), x.var(axis=0), rtol=1e-6)


def test_non_finite_is_detected():
    assert not Moments.of(2, [np.nan], [0.0]).is_finite()
    assert Moments.of(2, [1.0], [0.5]).is_finite()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_from_array_axis(axis):
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    m = Moments.from_array(x, axis)
    np.testing.assert_allclose(m.mean, np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).mean(0))
