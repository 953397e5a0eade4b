"""The served load's summary row on the hand-built load (serving_frames), every number worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from serving_frames import META, iterations, requests

from kvscope.analysis.serving.summary import (
    SERVE_SUMMARY_COLUMNS,
    in_system,
    percentile_row,
    serve_summary,
    time_average,
)
from kvscope.schema import ITERATION_COLUMNS, REQUEST_COLUMNS


@pytest.fixture(scope="module")
def row() -> pd.Series:
    df = serve_summary(requests(), iterations(), META)
    assert list(df.columns) == list(SERVE_SUMMARY_COLUMNS) and len(df) == 1
    return df.iloc[0]


def test_settings_and_counts(row: pd.Series) -> None:
    assert (row["policy"], row["rps"], row["preempt"]) == ("chunked", 10.0, "recompute")
    assert math.isnan(row["concurrency"])
    assert (row["requests"], row["requests_finished"], row["requests_cut"], row["requests_refused"]) == (4, 3, 0, 1)
    assert (row["iterations"], row["iterations_prefill"], row["iterations_decode"], row["iterations_mixed"]) == (
        5, 1, 2, 2)
    assert (row["preemptions"], row["preemptions_recompute"], row["preemptions_swap"]) == (1, 1, 0)


def test_rates(row: pd.Series) -> None:
    assert row["duration_s"] == pytest.approx(0.5)  # first arrival 0.0 to last finish 0.5
    assert row["arrival_span_s"] == pytest.approx(0.3) and row["drain_s"] == pytest.approx(0.2)
    assert row["offered_rps"] == pytest.approx(10.0)  # 3 gaps over 0.3 s
    assert row["requests_per_s"] == pytest.approx(6.0)
    assert (row["output_tokens"], row["prompt_tokens"]) == (10, 28)  # the refused request's prompt is not served
    assert row["output_tok_s"] == pytest.approx(20.0) and row["total_tok_s"] == pytest.approx(76.0)


def test_latency_percentiles(row: pd.Series) -> None:
    assert row["ttft_p50_ms"] == 150.0 and row["ttft_n"] == 3
    assert math.isnan(row["ttft_p90_ms"]) and math.isnan(row["ttft_p99_ms"])  # gated: 3 samples
    assert row["tpot_p50_ms"] == pytest.approx(250 / 3) and row["tpot_n"] == 3
    assert row["itl_p50_ms"] == 80.0 and row["itl_n"] == 7  # 50, 80, 80, 80, 120, 120, 150 pooled
    assert (row["e2e_p50_ms"], row["e2e_n"], row["queue_p50_ms"], row["queue_n"]) == (400.0, 3, 0.0, 3)


def test_goodput(row: pd.Series) -> None:
    # SLO TTFT <= 160, TPOT <= 100: r1 misses TPOT (116.7), r3 misses TTFT (170), r2 meets both
    assert row["goodput_requests"] == 1
    assert row["goodput_rps"] == pytest.approx(2.0) and row["goodput_fraction"] == pytest.approx(0.25)


def test_goodput_without_slo() -> None:
    meta = {"serve": {**META["serve"], "slo_ttft_ms": None, "slo_tpot_ms": None}}
    r = serve_summary(requests(), iterations(), meta).iloc[0]
    assert all(math.isnan(r[c]) for c in ("goodput_rps", "goodput_fraction", "goodput_requests"))
    one = {"serve": {**META["serve"], "slo_tpot_ms": None}}  # TTFT only: r1 and r2 meet it
    assert serve_summary(requests(), iterations(), one).iloc[0]["goodput_requests"] == 2


def test_littles_law(row: pd.Series) -> None:
    # time in system 0.45 + 0.40 + 0.25 = 1.1 request-seconds over 0.5 s: L = 2.2; W = 1.1 / 3; lambda = 10/s
    assert row["mean_in_system"] == pytest.approx(2.2)
    assert row["mean_time_in_system_s"] == pytest.approx(1.1 / 3)
    assert row["little_predicted"] == pytest.approx(10 * 1.1 / 3)
    assert row["little_ratio"] == pytest.approx(2.2 / (11 / 3))


def test_step_function_time_average() -> None:
    """A schedule whose time average is known: arrivals 0, 1, 2, 3 leaving at 2, 2, 4, 5. The count is 1 on
    [0, 1), 2 on [1, 2), 1 on [2, 3), 2 on [3, 4), 1 on [4, 5): 7 request-seconds over 5 s."""
    times, counts = in_system(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 2.0, 4.0, 5.0]))
    assert counts[-1] == 0
    assert time_average(times, counts, 0.0, 5.0) == pytest.approx(7 / 5)
    assert time_average(times, counts, 1.0, 3.0) == pytest.approx((2 + 1) / 2)  # a window inside
    assert math.isnan(time_average(times, counts, 1.0, 1.0))
    # NaN pairs are left out
    times, counts = in_system(np.array([0.0, 1.0]), np.array([2.0, math.nan]))
    assert time_average(times, counts, 0.0, 2.0) == pytest.approx(1.0)


def test_iteration_columns(row: pd.Series) -> None:
    assert row["mean_running"] == pytest.approx(1050 / 500)  # time-weighted by dur_ms
    assert row["mean_waiting"] == pytest.approx(80 / 500)
    assert (row["kv_blocks_peak"], row["kv_blocks_total"]) == (11, 20)
    assert row["kv_slot_use_frac"] == pytest.approx(11940 / 14320)
    assert row["kv_fragmentation_frac"] == pytest.approx(1 - 11940 / 14320)
    assert row["host_p50_ms"] == 3.0 and math.isnan(row["host_p99_ms"])  # 5 samples: no p99
    assert row["host_share"] == pytest.approx(15 / 515)
    assert row["gpu_gap_p50_ms"] == pytest.approx(0.75)  # the first iteration has no gap
    assert row["gpu_gap_decode_ratio"] == pytest.approx(3 / 130)  # decode-only iterations 3 and 4


def test_percentiles_are_gated() -> None:
    r = percentile_row("x", np.arange(1, 11, dtype=float))  # 10 samples: p90 yes, p99 no
    assert r["x_p50_ms"] == 5.5 and r["x_p90_ms"] == pytest.approx(9.1) and math.isnan(r["x_p99_ms"])
    r = percentile_row("x", np.arange(0, 101, dtype=float))
    assert (r["x_p50_ms"], r["x_p90_ms"], r["x_p99_ms"], r["x_n"]) == (50.0, 90.0, 99.0, 101)


def test_empty_frames() -> None:
    """The run loop may call it on a load that served nothing: NaN and zeros, no error."""
    df = serve_summary(pd.DataFrame(columns=list(REQUEST_COLUMNS)), pd.DataFrame(columns=list(ITERATION_COLUMNS)),
                       None)
    r = df.iloc[0]
    assert r["requests"] == 0 and r["iterations"] == 0 and r["ttft_n"] == 0
    assert math.isnan(r["duration_s"]) and math.isnan(r["little_ratio"]) and math.isnan(r["mean_running"])
    assert r["policy"] is None


def test_littles_law_over_the_steady_window() -> None:
    """Arrivals every 0.1 s from 0 to 2 s, each request 0.3 s in the system: over the whole run (0 .. 2.3 s) the
    ramp and the drain pull the ratio below 1; over the steady window (0.3 .. 2.0 s: the first arrival plus the mean
    time in the system, to the last arrival) three requests are always in the system, 17 arrive at 10/s: exactly 1."""
    base = requests().iloc[[0]]
    rows = []
    for i in range(21):
        r = base.copy()
        r["request_id"], r["arrival_s"] = i, round(0.1 * i, 10)
        r["admitted_s"], r["first_token_s"], r["finish_s"] = r["arrival_s"], r["arrival_s"] + 0.1, r["arrival_s"] + 0.3
        rows.append(r)
    row = serve_summary(pd.concat(rows, ignore_index=True), iterations(), META).iloc[0]
    assert row["little_steady_s"] == pytest.approx(1.7)
    assert row["little_steady_ratio"] == pytest.approx(1.0)
    assert row["little_ratio"] == pytest.approx((21 * 0.3 / 2.3) / (10 * 0.3))  # 0.913: ramp and drain


def test_littles_law_without_a_steady_window(row: pd.Series) -> None:
    # mean time in system 0.367 s is longer than the 0.3 s of arrivals: no steady window
    assert math.isnan(row["little_steady_s"]) and math.isnan(row["little_steady_ratio"])
