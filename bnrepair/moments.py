"""Per-channel moments of BN inputs, merged exactly across batches.

A runner reduces each batch on its device (two-pass: mean, then sum of squared deviations)
and hands back only ``count``, ``mean`` and ``m2`` per channel. Batches merge in float64 with
Chan et al.'s pairwise update, so the pooled result is the moment of the whole set, whatever
the batch sizes, and never suffers the cancellation of sum-of-squares formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, count, mean, m2) -> "Moments":
        return cls(int(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64))

    @classmethod
    def from_array(cls, x: np.ndarray, axis: int) -> "Moments":
        """Reference computation over every position but ``axis`` (used by tests and small inputs)."""
        x = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, np.shape(x)[axis])
        mean = x.mean(axis=0)
        return cls(x.shape[0], mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: "Moments") -> "Moments":
        n = self.count + other.count
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def variance(self, unbiased: bool) -> np.ndarray:
        """Biased (Keras ``moving_variance``) or unbiased (torch ``running_var``) variance."""
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / max(denom, 1)

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.mean).all() and np.isfinite(self.m2).all())


def moved(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    """How far new statistics moved from old ones: the largest |mean change| in units of the new std, and the
    smallest and largest new / old variance ratio (inf or nan where an old variance was 0)."""
    old_mean, old_var = (np.asarray(a, np.float64) for a in old)
    new_mean, new_var = (np.asarray(a, np.float64) for a in new)
    std = np.sqrt(np.maximum(new_var, np.finfo(np.float64).tiny))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = new_var / old_var
    return float(np.max(np.abs(new_mean - old_mean) / std)), float(np.min(ratio)), float(np.max(ratio))


def relative_change(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], eps: float) -> float:
    """Largest change of mean or variance, in units of the new std / variance as the layer normalises with
    them (eps included): a dead channel (variance 0) cannot make a tiny change look huge."""
    scale = np.asarray(new[1], np.float64) + eps
    return float(max(np.max(np.abs(new[0] - old[0]) / np.sqrt(scale)), np.max(np.abs(new[1] - old[1]) / scale)))
