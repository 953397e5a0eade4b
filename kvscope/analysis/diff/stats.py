"""The intervals of `kvscope diff`: distribution-free 95% intervals of a ratio B / A, exact for small samples.

Two independent samples (`ratio_interval`: a region's time per repetition in run A and in run B): the Hodges-Lehmann
estimate of the shift of log B against log A (the median of every pairwise difference log b_j - log a_i) and its
confidence interval from the Mann-Whitney distribution (Lehmann 1963; Hollander & Wolfe, ch. 4.3): the k-th smallest
and k-th largest pairwise difference, k the largest whole number with P(U <= k - 1) <= alpha / 2 under the null, U
counted exactly (`mann_whitney_cdf`) up to MAX_EXACT samples a side, by the normal approximation beyond. On the log
scale the shift is a ratio, so the interval says "B takes 0.97 to 1.04 times A's time". It assumes only that B's
distribution is A's scaled (a shift of the logs), not normality: heavy tails and outliers (a repetition the host
interrupted) move it little, as they move ranks little.

Paired samples (`paired_interval`: a sweep's points, the same configuration measured in A and in B): the
Hodges-Lehmann estimate of the median of the log ratios log b_i - log a_i (the median of their Walsh averages) and its
interval from the exact Wilcoxon signed-rank distribution (`signed_rank_cdf`), assuming the ratios are symmetric
about their median.

An interval needs enough samples to reach 95%: with n and m repetitions the widest interval (the smallest to the
largest difference) holds with probability 1 - 2 / C(n + m, n), so 3 and 3 (90%) are too few and 4 and 4 (97.1%) the
fewest alike; paired, 6 points (96.9%). `Interval.level` is the exact coverage reached (>= 0.95: the rank statistics
are discrete). Everything here is deterministic: no resampling, no seed.

Large samples (a served load's inter-token gaps: tens of thousands a side) would make too many pairwise differences
to hold: beyond MAX_PAIRS the order statistics are found without them (`kth_difference`: bisection on the value,
counting the differences at or below it from the two sorted samples), to within a relative 1e-12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ALPHA = 0.05  # two-sided: 95% intervals
MIN_PER_SIDE = 3  # fewer repetitions on a side never make an interval, whatever the other side holds
MAX_EXACT = 100  # samples a side counted exactly; beyond, the normal approximation (with a continuity correction)
_Z = 1.959963984540054  # the standard normal's 97.5% quantile
MAX_PAIRS = 4_000_000  # pairwise differences held in memory; beyond, kth_difference selects them one by one


@dataclass(frozen=True)
class Interval:
    """A ratio B / A: the estimate and its interval's bounds (ratios, 1.0 = no change) and the interval's exact
    coverage."""

    estimate: float
    low: float
    high: float
    level: float


@lru_cache(maxsize=256)
def mann_whitney_cdf(n: int, m: int) -> np.ndarray:
    """P(U <= u) for u = 0 .. n * m, U the Mann-Whitney count of pairs (x_i < y_j) between independent samples of
    sizes n and m from one continuous distribution. By the recursion on the largest observation (it belongs to the
    second sample with probability m / (n + m), adding n to U): sums of positive terms only, stable in floats."""
    # p[j] holds the distribution for (i, j) while row i is built; p_prev the row i - 1
    p_prev = [np.ones(1)] + [np.ones(1) for _ in range(m)]  # i = 0: U = 0 whatever j
    for i in range(1, n + 1):
        row = [np.ones(1)]  # j = 0: U = 0
        for j in range(1, m + 1):
            a, b = p_prev[j], row[j - 1]  # the largest from x (U unchanged) / from y (U + i)
            out = np.zeros(i * j + 1)
            out[: a.size] += a * (i / (i + j))
            out[i: i + b.size] += b * (j / (i + j))
            row.append(out)
        p_prev = row
    return np.cumsum(p_prev[m])


@lru_cache(maxsize=256)
def signed_rank_cdf(n: int) -> np.ndarray:
    """P(T <= t) for t = 0 .. n(n+1)/2, T the Wilcoxon signed-rank statistic of n paired differences symmetric
    about 0 (each rank's sign a fair coin)."""
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1.0
    for r in range(1, n + 1):  # rank r positive (adds r to T) or negative, each with probability 1/2
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[:-r]
        counts = (counts + shifted) / 2.0
    return np.cumsum(counts)


def _rank_k(cdf: np.ndarray) -> tuple[int, float]:
    """(k, coverage): k the largest whole number >= 1 with P(stat <= k - 1) <= ALPHA / 2, 0 when none is (too few
    samples); the interval's coverage 1 - 2 * P(stat <= k - 1)."""
    ok = np.flatnonzero(cdf <= ALPHA / 2 + 1e-12)
    if not ok.size:
        return 0, math.nan
    k = int(ok[-1]) + 1
    return k, float(1.0 - 2.0 * cdf[k - 1])


def _normal_k(total: int, var: float) -> tuple[int, float]:
    """k for large samples: total / 2 - z * sqrt(var) - 1/2 rounded down (at least 1)."""
    k = max(1, math.floor(total / 2 - _Z * math.sqrt(var) - 0.5) + 1)
    return k, 1.0 - ALPHA


def min_samples_reached(n: int, m: int) -> bool:
    """Whether n and m repetitions hold a 95% interval: MIN_PER_SIDE a side, and enough together for the widest
    interval to reach 95% (see the module docstring)."""
    if n >= 4 and m >= 4:  # 2 / C(8, 4) < ALPHA already (and C(n + m, n) of large samples overflows a float)
        return True
    return n >= MIN_PER_SIDE and m >= MIN_PER_SIDE and 2.0 / math.comb(n + m, n) <= ALPHA


def ratio_interval(a: np.ndarray, b: np.ndarray) -> Interval | None:
    """The ratio of B's values to A's (both positive and finite) with its 95% interval (the module docstring), or
    None when the samples are too few for one."""
    la, lb = np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))
    n, m = la.size, lb.size
    if not min_samples_reached(n, m):
        return None
    if n <= MAX_EXACT and m <= MAX_EXACT:
        k, level = _rank_k(mann_whitney_cdf(n, m))
    else:
        k, level = _normal_k(n * m, n * m * (n + m + 1) / 12.0)
    if k == 0:
        return None
    total = n * m
    if total > MAX_PAIRS:
        sa, sb = np.sort(la), np.sort(lb)
        half = (total + 1) // 2
        mid = kth_difference(sa, sb, half) if total % 2 else \
            (kth_difference(sa, sb, half) + kth_difference(sa, sb, half + 1)) / 2.0
        return Interval(float(np.exp(mid)), float(np.exp(kth_difference(sa, sb, k))),
                        float(np.exp(kth_difference(sa, sb, total - k + 1))), level)
    d = np.sort((lb[None, :] - la[:, None]).ravel())
    return Interval(float(np.exp(np.median(d))), float(np.exp(d[k - 1])), float(np.exp(d[d.size - k])), level)


def kth_difference(a_sorted: np.ndarray, b_sorted: np.ndarray, k: int) -> float:
    """The k-th smallest (1-based) of the differences b_j - a_i of two sorted samples, without forming them: the
    smallest value v whose count of differences <= v reaches k, by bisection (to a relative 1e-12 of the range)."""
    n = a_sorted.size

    def count(v: float) -> int:  # pairs with b_j - a_i <= v, i.e. a_i >= b_j - v
        return int((n - np.searchsorted(a_sorted, b_sorted - v, side="left")).sum())

    lo, hi = float(b_sorted[0] - a_sorted[-1]), float(b_sorted[-1] - a_sorted[0])
    tol = 1e-12 * max(1.0, abs(lo), abs(hi))
    while hi - lo > tol:
        mid = (lo + hi) / 2.0
        if mid <= lo or mid >= hi:
            break
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid
    return hi


def paired_interval(a: np.ndarray, b: np.ndarray) -> Interval | None:
    """The typical ratio b_i / a_i of paired positive values with its 95% interval (the module docstring), or None
    when the pairs are too few for one."""
    x = np.log(np.asarray(b, dtype=np.float64)) - np.log(np.asarray(a, dtype=np.float64))
    n = x.size
    if n < 1:
        return None
    i, j = np.triu_indices(n)
    walsh = np.sort((x[i] + x[j]) / 2.0)
    if n <= MAX_EXACT:
        k, level = _rank_k(signed_rank_cdf(n))
    else:
        k, level = _normal_k(walsh.size, n * (n + 1) * (2 * n + 1) / 24.0)
    if k == 0:
        return None
    return Interval(float(np.exp(np.median(walsh))), float(np.exp(walsh[k - 1])),
                    float(np.exp(walsh[walsh.size - k])), level)
