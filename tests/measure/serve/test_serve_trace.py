"""The served load's Chrome/Perfetto trace (`kvscope.measure.serve.trace.serve_trace`): one track per request with
its queue / prefill / decode spans (only what it has), one track of `iter N` spans with their args, the counters,
preemption instants, µs timestamps, and JSON that `json.dumps` writes strictly (no NaN)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from kvscope.measure.serve.trace import ITERATIONS_PID, REQUESTS_PID, serve_trace
from kvscope.schema import ITERATION_COLUMNS, REQUEST_COLUMNS

NAN = math.nan


def _requests() -> pd.DataFrame:
    rows = [  # request_id, status, arrival, admitted, first token, finish
        (0, "finished", 0.0, 0.1, 0.3, 1.0),
        (1, "finished", 0.2, 0.2, 0.5, 1.5),
        (7, "cut", 0.4, NAN, NAN, 2.0),  # cut while waiting: queue from arrival to the cut
        (3, "cut", 0.6, 0.9, NAN, NAN),  # admitted, nothing after: no span at all but what ends
    ]
    df = pd.DataFrame([{c: None for c in REQUEST_COLUMNS} | {
        "request_id": rid, "status": st, "reason": "", "arrival_s": a, "admitted_s": ad, "first_token_s": ft,
        "finish_s": fin, "prompt_tokens": 16, "output_tokens": 8, "generated_tokens": 8 if st == "finished" else 0,
        "preemptions": 1 if rid == 1 else 0, "ttft_ms": (ft - a) * 1e3, "itl_ms": [1.0, 2.0],
    } for rid, st, a, ad, ft, fin in rows])
    df["request_id"] = df["request_id"].astype("int64")
    df["preemptions"] = df["preemptions"].astype("Int64")
    df["preempt_s"] = [[], [0.7], [], [NAN]]  # optional: times of preemptions
    return df


def _iterations() -> pd.DataFrame:
    rows = []
    for n in range(4):
        row = {c: 0 for c in ITERATION_COLUMNS}
        row.update(iteration=n, kind="prefill" if n == 0 else "decode", start_s=0.1 + 0.25 * n,
                   end_s=0.1 + 0.25 * n + 0.02, dur_ms=20.0 if n != 2 else NAN, gpu_gap_ms=NAN if n == 0 else 0.5,
                   prefill_tokens=32 if n == 0 else 0, decode_seqs=0 if n == 0 else 2, blocks_used=4 + n,
                   running=2, waiting=2 - min(n, 2), preempted=1 if n == 3 else 0)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[1, "waiting"] = np.nan  # a counter with nothing to say at iteration 1
    return df


def _trace() -> dict:
    trace = serve_trace(_requests(), _iterations(), {"run_id": "r1", "policy": "chunked"})
    json.dumps(trace, allow_nan=False)  # strict JSON: every NaN became null or was left out
    return trace


def _by(trace: dict, **match: object) -> list[dict]:
    return [e for e in trace["traceEvents"] if all(e.get(k) == v for k, v in match.items())]


def test_one_track_per_request_with_its_spans() -> None:
    trace = _trace()
    names = {e["tid"]: e["args"]["name"] for e in _by(trace, ph="M", pid=REQUESTS_PID, name="thread_name")}
    assert names == {0: "request 0", 1: "request 1", 7: "request 7", 3: "request 3"}
    spans = {(e["tid"], e["name"]): (e["ts"], e["dur"]) for e in _by(trace, ph="X", pid=REQUESTS_PID)}
    approx = {k: (round(ts), round(dur)) for k, (ts, dur) in spans.items()}
    assert approx == {
        (0, "queue"): (0, 100_000), (0, "prefill"): (100_000, 200_000), (0, "decode"): (300_000, 700_000),
        (1, "queue"): (200_000, 0), (1, "prefill"): (200_000, 300_000), (1, "decode"): (500_000, 1_000_000),
        (7, "queue"): (400_000, 1_600_000),
        (3, "queue"): (600_000, 300_000),
    }
    span = _by(trace, ph="X", pid=REQUESTS_PID, tid=1, name="decode")[0]
    assert span["cat"] == "request" and span["args"]["status"] == "finished" and span["args"]["preemptions"] == 1
    assert span["args"]["ttft_ms"] == 300.0 and span["args"]["request_id"] == 1
    assert _by(trace, ph="X", pid=REQUESTS_PID, tid=7)[0]["args"]["ttft_ms"] is None  # NaN as null
    preempts = _by(trace, ph="i", pid=REQUESTS_PID)
    assert [(e["tid"], round(e["ts"])) for e in preempts] == [(1, 700_000)]  # the NaN time left out


def test_iteration_spans_args_and_counters() -> None:
    trace = _trace()
    assert _by(trace, ph="M", pid=ITERATIONS_PID, name="process_name")[0]["args"]["name"] == "iterations"
    assert _by(trace, ph="M", pid=REQUESTS_PID, name="process_name")[0]["args"]["name"] == "requests"
    spans = _by(trace, ph="X", pid=ITERATIONS_PID)
    assert [e["name"] for e in spans] == ["iter 0", "iter 1", "iter 2", "iter 3"]
    assert {e["tid"] for e in spans} == {0}
    assert [round(e["ts"]) for e in spans] == [100_000, 350_000, 600_000, 850_000]
    assert [round(e["dur"]) for e in spans] == [20_000, 20_000, 20_000, 20_000]  # iter 2: end_s - start_s
    first = spans[0]["args"]
    assert (first["kind"], first["prefill_tokens"], first["decode_seqs"], first["blocks_used"]) == ("prefill", 32, 0, 4)
    assert first["gpu_gap_ms"] is None and first["iteration"] == 0
    for name, want in (("running", [2, 2, 2, 2]), ("waiting", [2, 0, 0]), ("blocks_used", [4, 5, 6, 7])):
        counters = _by(trace, ph="C", pid=ITERATIONS_PID, name=name)
        assert [e["args"][name] for e in counters] == want, name
        assert all(type(e["args"][name]) is int for e in counters)
    assert [round(e["ts"]) for e in _by(trace, ph="C", name="waiting")] == [100_000, 600_000, 850_000]
    instants = _by(trace, ph="i", pid=ITERATIONS_PID)
    assert [(e["name"], e["args"]) for e in instants] == [("preempted", {"iteration": 3, "preempted": 1})]


def test_metadata_and_units() -> None:
    trace = _trace()
    assert trace["displayTimeUnit"] == "ms"
    assert json.loads(trace["otherData"]["kvscope"]) == {"run_id": "r1", "policy": "chunked"}


def test_empty_frames_and_missing_columns() -> None:
    trace = serve_trace(pd.DataFrame({"request_id": pd.Series([], dtype="int64")}),
                        pd.DataFrame({"iteration": [0], "start_s": [NAN]}), {})
    assert {e["ph"] for e in trace["traceEvents"]} == {"M"}
    few = serve_trace(pd.DataFrame({"request_id": [4], "arrival_s": [1.0], "finish_s": [1.5]}),
                      pd.DataFrame({"iteration": [0], "start_s": [1.0], "end_s": [1.25]}), {})
    assert [(e["name"], e["ts"], e["dur"]) for e in few["traceEvents"] if e["ph"] == "X"] == [
        ("queue", 1e6, 5e5), ("iter 0", 1e6, 2.5e5)]
