"""The served load's `trace.json`: Chrome trace-event JSON (Perfetto, chrome://tracing) of its requests and of the
scheduler's iterations, on the load's host clock (seconds since its start, written in µs).

- process 1, "requests": one track (tid = request id) per request, with the spans `queue` (arrival -> admitted),
  `prefill` (admitted -> first token) and `decode` (first token -> finish). A span whose end never happened ends at
  the next time the request has (a request cut while waiting: `queue` from arrival to its finish); a span whose start
  never happened is left out. Where `requests` has a `preempt_s` column (a list of times per request), each is an
  instant event `preempted`.
- process 2, "iterations": one track of `iter N` spans (from `start_s`, `dur_ms` long: the CUDA-event duration, else
  `end_s - start_s`), each with the iteration's columns as args; an instant `preempted` where an iteration preempted
  sequences; counter tracks `running`, `waiting` and `blocks_used` at each iteration's start.

Columns are those of `kvscope.schema.REQUEST_COLUMNS` / `ITERATION_COLUMNS`; any missing one is treated as empty.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from kvscope.schema import iteration_name

REQUESTS_PID = 1
ITERATIONS_PID = 2
ITERATIONS_TID = 0
US_PER_S = 1e6
PHASES = (("queue", "arrival_s", "admitted_s"), ("prefill", "admitted_s", "first_token_s"),
          ("decode", "first_token_s", "finish_s"))
_TIMES = ("arrival_s", "admitted_s", "first_token_s", "finish_s")
# each request span's args: what the request was and what became of it
_REQUEST_ARGS = ("status", "reason", "prompt_tokens", "output_tokens", "generated_tokens", "preemptions",
                 "queue_ms", "ttft_ms", "tpot_ms", "e2e_ms")
COUNTERS = ("running", "waiting", "blocks_used")
# columns of an iteration that are not its args (its times and lists)
_NOT_ARGS = ("iteration", "start_s", "end_s")


def _plain(value: Any) -> Any:
    """A cell as a JSON value: numpy scalars as Python ones, NaN / NA / None as None, lists kept."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value if isinstance(value, str) else str(value)


def _time(value: Any) -> float | None:
    """A time in seconds (or a count) as a float, or None when it never happened (NaN, NA, None, not finite)."""
    v = _plain(value)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _meta(pid: int, name: str, tid: int | None = None, sort: int | None = None) -> list[dict[str, Any]]:
    """A process's or thread's name (and sort index) as metadata events."""
    kind = "process" if tid is None else "thread"
    where = {"pid": pid} if tid is None else {"pid": pid, "tid": tid}
    events = [{"ph": "M", **where, "name": f"{kind}_name", "args": {"name": name}}]
    if sort is not None:
        events.append({"ph": "M", **where, "name": f"{kind}_sort_index", "args": {"sort_index": sort}})
    return events


def request_events(requests: pd.DataFrame) -> list[dict[str, Any]]:
    """The "requests" process: one track per request, its spans and its preemptions."""
    events = _meta(REQUESTS_PID, "requests", sort=REQUESTS_PID)
    columns = set(requests.columns)
    for row in requests.to_dict("records"):
        rid = int(row["request_id"])
        events += _meta(REQUESTS_PID, f"request {rid}", tid=rid, sort=rid)
        args = {"request_id": rid, **{k: _plain(row[k]) for k in _REQUEST_ARGS if k in columns}}
        times = [_time(row.get(k)) for k in _TIMES]
        for i, (name, _, _) in enumerate(PHASES):
            start = times[i]
            end = next((t for t in times[i + 1:] if t is not None), None)
            if start is None or end is None:
                continue
            events.append({"ph": "X", "pid": REQUESTS_PID, "tid": rid, "name": name, "cat": "request",
                           "ts": start * US_PER_S, "dur": max(end - start, 0.0) * US_PER_S, "args": args})
        preempts = row.get("preempt_s")
        for t in preempts if isinstance(preempts, (list, tuple, np.ndarray)) else ():
            if (at := _time(t)) is not None:
                events.append({"ph": "i", "s": "t", "pid": REQUESTS_PID, "tid": rid, "name": "preempted",
                               "cat": "request", "ts": at * US_PER_S, "args": {"request_id": rid}})
    return events


def iteration_events(iterations: pd.DataFrame) -> list[dict[str, Any]]:
    """The "iterations" process: the `iter N` spans on one track, preemption instants, the counters."""
    events = _meta(ITERATIONS_PID, "iterations", sort=ITERATIONS_PID)
    events += _meta(ITERATIONS_PID, "iterations", tid=ITERATIONS_TID)
    columns = [c for c in iterations.columns if c not in _NOT_ARGS]
    for row in iterations.to_dict("records"):
        start = _time(row.get("start_s"))
        if start is None:
            continue
        ts = start * US_PER_S
        dur_ms, end = _time(row.get("dur_ms")), _time(row.get("end_s"))
        dur_us = dur_ms * 1e3 if dur_ms is not None else (end - start) * US_PER_S if end is not None else None
        n = int(row["iteration"])
        args = {"iteration": n, **{k: _plain(row[k]) for k in columns}}
        if dur_us is not None:
            events.append({"ph": "X", "pid": ITERATIONS_PID, "tid": ITERATIONS_TID, "name": iteration_name(n),
                           "cat": "iteration", "ts": ts, "dur": max(dur_us, 0.0), "args": args})
        preempted = _time(row.get("preempted"))  # a count: finite or absent, like a time
        if preempted is not None and preempted > 0:
            events.append({"ph": "i", "s": "t", "pid": ITERATIONS_PID, "tid": ITERATIONS_TID, "name": "preempted",
                           "cat": "iteration", "ts": ts, "args": {"iteration": n, "preempted": int(preempted)}})
        for name in COUNTERS:
            value = _time(row.get(name))  # a count: finite or absent, like a time
            if value is not None:
                events.append({"ph": "C", "pid": ITERATIONS_PID, "name": name, "ts": ts,
                               "args": {name: int(value) if value.is_integer() else value}})
    return events


def serve_trace(requests: pd.DataFrame, iterations: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """The served load's trace: the requests' and the iterations' processes, `meta` as JSON under `otherData`
    (as `kvscope.measure.output.chrome_trace` does for a run)."""
    events = request_events(requests) + iteration_events(iterations)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"kvscope": json.dumps(meta, default=str)}}
