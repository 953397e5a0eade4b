"""analysis.summary: percentiles only where the samples can carry them, and the spread flag of a host-bound phase."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvscope.analysis.summary import SPREAD_FLAG_PCT, percentile, spread


def test_percentile_gate_at_100_samples() -> None:
    assert math.isnan(percentile(list(range(99)), 99))
    assert percentile(list(range(100)), 99) == np.percentile(range(100), 99)
    assert percentile(list(range(10)), 90) == np.percentile(range(10), 90)
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 50) == 3.0


def test_spread_flag_marks_a_host_bound_phase() -> None:
    tight = spread([10.0, 10.1, 10.0, 9.9, 10.05])
    assert tight["iqr_pct"] < SPREAD_FLAG_PCT and not tight["wide"]
    wide = spread([10.0, 14.0, 20.0, 12.0, 25.0])
    assert wide["iqr_pct"] == pytest.approx((20.0 - 12.0) / 14.0 * 100)
    assert wide["wide"]
    assert math.isnan(spread([])["iqr_pct"]) and not spread([])["wide"]
