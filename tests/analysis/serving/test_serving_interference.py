"""Prefill interference on the hand-built load (serving_frames) and on a load large enough for p99s."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from serving_frames import META, batches, iterations, requests

from kvscope.analysis.serving.interference import (
    BINNED_COLUMNS,
    INTERFERENCE_COLUMNS,
    interference,
    interference_by_prefill,
    itl_samples_by_iteration,
    prefill_bins,
)
from kvscope.schema import BATCH_COLUMNS, ITERATION_COLUMNS, REQUEST_COLUMNS


def test_interference_table() -> None:
    df = interference(batches(), iterations(), requests(), META)
    assert list(df.columns) == list(INTERFERENCE_COLUMNS)
    dec, mix = (df[df["iteration_class"] == c].iloc[0] for c in ("decode-only", "with-prefill"))
    assert set(df["policy"]) == {"chunked"}
    # decode-only: iterations 3 (80 ms, 3 decode tokens) and 4 (50 ms, 1); with prefill: 1 (150 ms, 1), 2 (120 ms, 2)
    assert (dec["iterations"], dec["decode_tokens"], mix["iterations"], mix["decode_tokens"]) == (2, 4, 2, 3)
    assert dec["step_p50_ms"] == 80.0 and mix["step_p50_ms"] == 120.0
    assert math.isnan(dec["step_p90_ms"])  # 4 samples
    # gaps: r1 150 (it 1), 120 (it 2), 80 (it 3); r2 120 (it 2), 80 (it 3), 50 (it 4); r3 80 (it 3)
    assert (dec["itl_n"], mix["itl_n"]) == (4, 3)
    assert dec["itl_p50_ms"] == 80.0 and mix["itl_p50_ms"] == 120.0
    assert dec["mean_prefill_tokens"] == 0 and mix["mean_prefill_tokens"] == 10  # (16 + 4) / 2
    for r in (dec, mix):  # the policy's ratios on both rows
        assert r["step_p50_ratio"] == pytest.approx(1.5) and r["itl_p50_ratio"] == pytest.approx(1.5)
        assert math.isnan(r["itl_p99_ratio"]) and math.isnan(r["itl_tail_share"])  # too few gaps for a p99


def test_gaps_are_matched_to_the_iteration_of_their_token() -> None:
    g = itl_samples_by_iteration(requests(), iterations())
    r1 = g[g["request_id"] == 1]
    assert r1["iteration"].tolist() == [1, 2, 3] and r1["itl_ms"].tolist() == [150.0, 120.0, 80.0]
    assert len(g) == 7 and set(g[g["request_id"] == 4]["iteration"]) == set()


def test_binned() -> None:
    df = interference_by_prefill(batches(), iterations(), requests(), META)
    assert list(df.columns) == list(BINNED_COLUMNS)
    assert df["prefill_bin"].tolist() == ["0", "1-256"]  # iterations 1 (16) and 2 (4) share a bin
    assert df["step_p50_ratio"].tolist() == pytest.approx([1.0, 1.5])
    assert df["bin_hi"].tolist() == [0.0, 256.0]


def test_bins() -> None:
    which, bins = prefill_bins(np.array([0, 1, 256, 257, 1024, 1025, 4096, 16384, 16385], dtype=float))
    labels = [bins[i][0] for i in which]
    assert labels == ["0", "1-256", "1-256", "257-1024", "257-1024", "1025-4096", "1025-4096", "4097-16384",
                      "16385+"]


def _big_load(n_iter: int = 400, every: int = 4) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two requests decoding through `n_iter` iterations; every `every`-th iteration also carries a 512-token
    prefill chunk of a third request and lasts 30 ms instead of 10 (a gap of 30 for both tokens it produced)."""
    mixed = np.arange(n_iter) % every == every - 1
    dur = np.where(mixed, 30.0, 10.0)
    it = pd.DataFrame({c: 0 for c in ITERATION_COLUMNS}, index=range(n_iter))
    it["iteration"], it["kind"], it["dur_ms"] = range(n_iter), np.where(mixed, "mixed", "decode"), dur
    it["prefill_tokens"] = np.where(mixed, 512, 0)
    rows = [(i, r, "decode", 1, 100 + i) for i in range(n_iter) for r in (1, 2)]
    rows += [(i, 3, "prefill", 512, 512) for i in np.flatnonzero(mixed)]
    b = pd.DataFrame(rows, columns=list(BATCH_COLUMNS))
    req = pd.DataFrame({c: [0, 0, 0] for c in REQUEST_COLUMNS})
    req["request_id"], req["status"] = [1, 2, 3], ["finished", "finished", "cut"]
    its = [-1, *range(n_iter)]  # the first token came from an earlier prefill
    req["token_iterations"] = [its, its, []]
    req["itl_ms"] = [list(dur), list(dur), []]
    return b, it, req


def test_tail_share_and_p99_ratio() -> None:
    b, it, req = _big_load()
    df = interference(b, it, req, {"serve": {"policy": "prefill-first"}})
    dec, mix = (df[df["iteration_class"] == c].iloc[0] for c in ("decode-only", "with-prefill"))
    assert (dec["itl_n"], mix["itl_n"]) == (600, 200)
    # the pooled p99 of 600 tens and 200 thirties is 30: every gap at or above it is a mixed iteration's
    assert mix["itl_tail_share"] == 1.0 and dec["itl_tail_share"] == 0.0
    assert mix["itl_p99_ratio"] == pytest.approx(3.0) and mix["step_p99_ratio"] == pytest.approx(3.0)
    assert dec["itl_p99_ratio"] == pytest.approx(3.0)  # the policy's ratio on both rows
    # ten decode-only gaps of request 1 take 100 ms more: the tail (p99 110) is theirs
    gaps = np.asarray(req.at[0, "itl_ms"])
    gaps[np.flatnonzero(gaps == 10.0)[:10]] += 100.0
    req.at[0, "itl_ms"] = list(gaps)
    df = interference(b, it, req, {"serve": {"policy": "prefill-first"}})
    dec, mix = (df[df["iteration_class"] == c].iloc[0] for c in ("decode-only", "with-prefill"))
    assert mix["itl_tail_share"] == 0.0 and dec["itl_tail_share"] == 1.0


def test_prefill_first_gap_spans_a_prefill_iteration() -> None:
    """Prefill-first: iteration 1 prefills another request alone, between two decode iterations. The decode token
    of iteration 2 waited through it: its gap is with-prefill, though its own iteration carried no prefill."""
    it = pd.DataFrame({c: 0 for c in ITERATION_COLUMNS}, index=range(4))
    it["iteration"], it["kind"] = range(4), ["decode", "prefill", "decode", "decode"]
    it["dur_ms"], it["prefill_tokens"] = [10.0, 50.0, 10.0, 10.0], [0, 300, 0, 0]
    b = pd.DataFrame([(0, 1, "decode", 1, 9), (1, 2, "prefill", 300, 300), (2, 1, "decode", 1, 10),
                      (3, 1, "decode", 1, 11), (3, 2, "decode", 1, 301)], columns=list(BATCH_COLUMNS))
    req = pd.DataFrame({c: [0, 0] for c in REQUEST_COLUMNS})
    req["request_id"], req["status"] = [1, 2], ["finished", "finished"]
    req["token_iterations"] = [[-1, 0, 2, 3], [1, 3]]
    req["itl_ms"] = [[10.0, 60.0, 10.0], [20.0]]
    g = itl_samples_by_iteration(req, it)
    assert g["iteration_class"].tolist() == ["decode-only", "with-prefill", "decode-only", "decode-only"]
    assert g["prefill_tokens"].tolist() == [0, 300, 0, 0]
    df = interference(b, it, req, {"serve": {"policy": "prefill-first"}}).set_index("iteration_class")
    assert df.loc["with-prefill", "decode_tokens"] == 0 and df.loc["with-prefill", "itl_n"] == 1
    assert df.loc["with-prefill", "itl_p50_ratio"] == pytest.approx(60 / 10)
    assert math.isnan(df.loc["with-prefill", "step_p50_ratio"])
    binned = interference_by_prefill(b, it, req, {"serve": {"policy": "prefill-first"}})
    assert binned["prefill_bin"].tolist() == ["0", "257-1024"]
