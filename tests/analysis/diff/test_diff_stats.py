"""The intervals of `kvscope diff` (kvscope/analysis/diff/stats.py): the exact rank distributions against brute
force, the fewest samples that hold a 95% interval, intervals by hand, their coverage on simulated timings, and
their robustness to an outlier."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from kvscope.analysis.diff.stats import (
    MAX_EXACT,
    mann_whitney_cdf,
    min_samples_reached,
    paired_interval,
    ratio_interval,
    signed_rank_cdf,
)


def _brute_mann_whitney(n: int, m: int) -> np.ndarray:
    """P(U <= u) by listing every way to place n x's among n + m ranks."""
    counts: Counter[int] = Counter()
    for xs in itertools.combinations(range(n + m), n):
        counts[sum(sum(1 for x in xs if x < y) for y in range(n + m) if y not in xs)] += 1
    return np.cumsum([counts[u] / math.comb(n + m, n) for u in range(n * m + 1)])


def _brute_signed_rank(n: int) -> np.ndarray:
    counts: Counter[int] = Counter()
    for signs in itertools.product((0, 1), repeat=n):
        counts[sum(r + 1 for r, s in enumerate(signs) if s)] += 1
    return np.cumsum([counts[t] / 2**n for t in range(n * (n + 1) // 2 + 1)])


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 3), (3, 3), (4, 4), (3, 5), (5, 2), (6, 4)])
def test_mann_whitney_distribution_is_exact(n: int, m: int) -> None:
    np.testing.assert_allclose(mann_whitney_cdf(n, m), _brute_mann_whitney(n, m), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", range(1, 10))
def test_signed_rank_distribution_is_exact(n: int) -> None:
    np.testing.assert_allclose(signed_rank_cdf(n), _brute_signed_rank(n), rtol=0, atol=1e-12)


def test_the_fewest_repetitions_that_hold_a_95_percent_interval() -> None:
    # 2 / C(n + m, n) <= 0.05 and 3 a side at least
    assert [min_samples_reached(n, n) for n in (2, 3, 4)] == [False, False, True]
    assert (min_samples_reached(3, 4), min_samples_reached(3, 5), min_samples_reached(2, 30)) == (False, True, False)
    assert ratio_interval(np.ones(3), np.ones(3)) is None
    assert paired_interval(np.ones(5), np.ones(5)) is None and paired_interval(np.ones(6), np.ones(6)) is not None


def test_four_and_four_by_hand() -> None:
    """With 4 and 4 repetitions the interval runs from the smallest to the largest ratio b_j / a_i (coverage
    1 - 2/70), and the estimate is the median of the 16 ratios."""
    a, b = np.array([1.0, 1.1, 0.9, 1.05]), np.array([1.2, 1.3, 1.25, 1.22])
    iv = ratio_interval(a, b)
    assert iv is not None
    ratios = np.sort((b[None, :] / a[:, None]).ravel())
    assert (iv.low, iv.high) == pytest.approx((ratios[0], ratios[-1]))
    assert iv.estimate == pytest.approx(math.exp(np.median(np.log(ratios))))
    assert iv.level == pytest.approx(1 - 2 / 70)


def test_the_interval_is_of_the_ratio_whatever_the_scale() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0, 0.1, 8), rng.lognormal(0.05, 0.1, 8)
    one, scaled = ratio_interval(a, b), ratio_interval(a * 1000, b * 1000)
    assert one is not None and scaled is not None
    assert (one.low, one.estimate, one.high) == pytest.approx((scaled.low, scaled.estimate, scaled.high))


@pytest.mark.parametrize("n", [4, 6, 10, 25])
def test_coverage_of_simulated_timings(n: int) -> None:
    """Heavy-tailed timings (lognormal, every tenth repetition interrupted: 3x as long) with B 4% slower: the
    interval holds the true ratio at least 95% of the time, give or take the simulation's own error."""
    rng = np.random.default_rng(n)
    hits, trials = 0, 1500

    def timings() -> np.ndarray:
        x = rng.lognormal(0.0, 0.05, n)
        return np.where(rng.random(n) < 0.1, x * 3, x)

    for _ in range(trials):
        iv = ratio_interval(timings(), timings() * 1.04)
        assert iv is not None
        hits += iv.low <= 1.04 <= iv.high
    assert hits / trials >= 0.94


def test_an_outlier_moves_the_interval_little() -> None:
    a = np.array([1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 0.99])
    b = a * 1.10
    calm, hit = ratio_interval(a, b), ratio_interval(a, np.r_[b[:-1], 50.0])  # one repetition interrupted
    assert calm is not None and hit is not None
    assert hit.estimate == pytest.approx(calm.estimate, rel=0.01) and hit.low > 1.05


def test_large_samples_use_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    n = MAX_EXACT + 20
    iv = ratio_interval(rng.lognormal(0, 0.05, n), rng.lognormal(0, 0.05, n) * 1.02)
    assert iv is not None and iv.level == 0.95 and iv.low < 1.02 < iv.high


def test_paired_points_by_hand() -> None:
    """Six paired points, each B 5% above A: every Walsh average is log 1.05, so the interval is the point."""
    a = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    iv = paired_interval(a, a * 1.05)
    assert iv is not None and (iv.low, iv.estimate, iv.high) == pytest.approx((1.05, 1.05, 1.05))
    assert iv.level == pytest.approx(1 - 2 / 64)
