"""The served load's "why" sentences: each rule on rows whose answer is known."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from serving_frames import META, batches, iterations, requests, sweep_rows

from kvscope.analysis.serving.explain import (
    KNEE_COLUMNS,
    RUN_FINDING_COLUMNS,
    explain_run,
    explain_sweep,
    interference_finding,
    knee_points,
    kv_limit_finding,
    little_finding,
    preemption_finding,
    scheduler_finding,
)
from kvscope.analysis.serving.interference import interference
from kvscope.analysis.serving.summary import serve_summary


def test_explain_run_on_the_hand_built_load() -> None:
    summary = serve_summary(requests(), iterations(), META)
    found = explain_run(summary, iterations(), interference(batches(), iterations(), requests(), META), META)
    assert list(found.columns) == list(RUN_FINDING_COLUMNS)
    by = found.set_index("finding")
    assert set(by.index) == {"littles_law", "prefill_interference", "kv_limit", "preemptions", "scheduler_host"}
    assert by.loc["littles_law", "sentence"].startswith("Little's law does not hold within 5%")
    assert "draining after the last arrival" in by.loc["littles_law", "sentence"]
    assert by.loc["prefill_interference", "sentence"] == (
        "Under chunked the inter-token gaps that span an iteration with prefill tokens (43% of all gaps): such gaps "
        "are 1.50x the others at p50; too few gaps (p99 needs 100) to say what sets the tail.")
    assert by.loc["preemptions", "values"]["recompute"] == 1


def test_little() -> None:
    holds = little_finding({"little_ratio": 0.97, "mean_in_system": 3.2, "little_predicted": 3.3, "offered_rps": 10,
                            "mean_time_in_system_s": 0.33})
    assert holds.sentence.startswith("Little's law holds within 5%") and "ratio 0.970" in holds.sentence
    over = little_finding({"little_ratio": 1.2, "mean_in_system": 3.6, "little_predicted": 3.0, "offered_rps": 10,
                           "mean_time_in_system_s": 0.3, "drain_s": 0.1, "duration_s": 10})
    assert "does not hold" in over.sentence and "bursty" in over.sentence
    assert little_finding({"little_ratio": math.nan}).missing


def _interf(tail: float, n: int = 200) -> pd.DataFrame:
    return pd.DataFrame({"policy": "chunked", "iteration_class": ["decode-only", "with-prefill"],
                         "decode_tokens": [900, 100], "itl_n": [n, n], "itl_p50_ratio": 2.0, "itl_p99_ratio": 4.0,
                         "itl_tail_share": [1 - tail, tail]})


def test_interference_dominates() -> None:
    f = interference_finding(_interf(0.8), {"itl_p99_ms": 35.2})
    assert f.sentence == ("Prefill interference dominates the inter-token tail under chunked: 80% of the gaps at or "
                          "above the ITL p99 (35.20 ms) span an iteration with prefill tokens (50% of all gaps); such "
                          "gaps are 2.00x the others at p50 and 4.00x at p99.")
    f = interference_finding(_interf(0.3), {"itl_p99_ms": 35.2})
    assert "does not dominate" in f.sentence
    assert interference_finding(None, {}).missing
    assert interference_finding(_interf(0.5, n=0), {}).missing


def _waiting(free: list[int], tokens: list[int], prefill: list[int] | None = None,
             running: list[int] | None = None) -> pd.DataFrame:
    """Iterations after which a request waited, and a last one after which none did."""
    n = len(free)
    return pd.DataFrame({"start_s": [float(i) for i in range(n + 1)], "waiting": [1] * n + [0],
                         "blocks_free": [*free, 5], "tokens": [*tokens, 3],
                         "prefill_tokens": [*(prefill or [0] * n), 0], "running": [*(running or [1] * n), 1],
                         "swapped": 0})


def test_kv_limit() -> None:
    meta = {"serve": {"policy": "chunked", "block_size": 16, "max_batch_tokens": 64, "max_seqs": 8}}
    f = kv_limit_finding(_waiting([0, 0, 0, 3], [10, 10, 10, 10]), meta)
    assert f.values["memory_share"] == 0.75 and "KV memory (too few free blocks for the next request) limited" in (
        f.sentence)
    f = kv_limit_finding(_waiting([2, 2, 0, 3], [64, 64, 64, 10]), meta)  # chunked: the budget used up
    assert f.values["budget_share"] == 0.75
    assert "the token budget (max_batch_tokens) limited concurrency, not KV memory" in f.sentence
    f = kv_limit_finding(_waiting([2, 2, 2], [10, 10, 10], running=[8, 8, 1]), meta)
    assert f.values["max_seqs_share"] == pytest.approx(2 / 3) and "the sequence cap (max_seqs) limited" in f.sentence
    f = kv_limit_finding(_waiting([2, 2], [10, 10]), meta)
    assert "no one limit held the queue back" in f.sentence and "none of the limits" in f.sentence
    f = kv_limit_finding(pd.DataFrame({"waiting": [0, 0], "blocks_free": [1, 1], "tokens": [1, 1]}), meta)
    assert f.sentence.startswith("No request waited")


def test_kv_limit_with_the_head_of_the_queue() -> None:
    """Prefill-first, budget 64, blocks of 16: the head's prompt (40 tokens, 3 blocks) against what is left."""
    meta = {"serve": {"policy": "prefill-first", "block_size": 16, "max_batch_tokens": 64, "max_seqs": 8}}
    req = pd.DataFrame({"request_id": [1, 2], "status": "finished", "arrival_s": [0.0, 0.5],
                        "admitted_s": [0.0, 9.0], "prompt_tokens": [30, 40]})
    # after iteration 1 (30 prompt tokens) the head (40) does not fit the 34 left: the budget; after iteration 2
    # (decodes only: prefill-first ran no prefill) 2 blocks free are too few for 3
    its = _waiting([10, 2], [30, 2], prefill=[30, 0])
    its["start_s"] = [1.0, 2.0, 10.0]
    f = kv_limit_finding(its, meta, req)
    assert (f.values["budget_share"], f.values["memory_share"]) == (0.5, 0.5)
    assert "KV memory in 50%, the token budget in 50%" in f.sentence


def test_preemptions_and_scheduler() -> None:
    assert preemption_finding({"preemptions": 0}).sentence.startswith("No request was preempted")
    f = preemption_finding({"preemptions": 6, "preemptions_recompute": 4, "preemptions_swap": 2,
                            "requests_finished": 12})
    assert "6 preemptions (4 by recompute, 2 by swap; 0.50 per finished request)" in f.sentence
    f = scheduler_finding({"host_share": 0.25, "host_p50_ms": 2.0, "host_p99_ms": 3.0, "gpu_gap_decode_ratio": 0.4})
    assert "25% of host + iteration time" in f.sentence and "host-bound" in f.sentence and "idles 40%" in f.sentence
    assert "small" in scheduler_finding({"host_share": 0.01}).sentence


def test_knee() -> None:
    sweep = pd.concat([sweep_rows("chunked", [1.0, 2.0, 4.0, 8.0], [100.0, 150.0, 190.0, 900.0], [1.0] * 4),
                       sweep_rows("prefill-first", [4.0, 1.0, 2.0], [120.0, 100.0, 110.0], [1.0] * 3)],
                      ignore_index=True)
    knees = knee_points(sweep).set_index("policy")
    assert list(knee_points(sweep).columns) == list(KNEE_COLUMNS)
    c = knees.loc["chunked"]
    assert (c["axis"], c["metric"], c["knee_x"], c["next_x"], c["next_value"]) == ("rps", "ttft_p99_ms", 4.0, 8.0,
                                                                                   900.0)
    assert math.isnan(knees.loc["prefill-first", "next_x"]) and knees.loc["prefill-first", "knee_x"] == 4.0
    found = explain_sweep(sweep).set_index("policy")
    s = found.loc["chunked", "sentence"]
    assert s.startswith("Under chunked the knee lies between 4 and 8 rps: TTFT p99 is 190 ms at 4 rps")
    assert "900 ms (9.0x) at 8 rps, where 5.00 requests/s complete against 8.00/s offered (62%)" in s
    assert found.loc["prefill-first", "sentence"].startswith("Under prefill-first no knee within the sweep")


def test_knee_metric_falls_back() -> None:
    sweep = sweep_rows("chunked", [1.0, 2.0], [100.0, 300.0], [1.0, 1.0]).assign(ttft_p99_ms=[math.nan, 5.0])
    assert knee_points(sweep)["metric"].iloc[0] == "ttft_p90_ms"
    closed = sweep.assign(rps=math.nan, concurrency=[2, 4])
    k = knee_points(closed).iloc[0]
    assert k["axis"] == "concurrency" and k["next_x"] == 4
    assert "in flight" in explain_sweep(closed)["sentence"].iloc[0]


@pytest.mark.parametrize("cols", [["ttft_p99_ms", "ttft_p90_ms", "ttft_p50_ms"]])
def test_knee_without_ttft(cols: list[str]) -> None:
    sweep = sweep_rows("chunked", [1.0, 2.0], [1.0, 2.0], [1.0, 1.0]).drop(columns=cols)
    assert explain_sweep(sweep)["missing"].iloc[0].startswith("needs one of ttft_p99_ms")
