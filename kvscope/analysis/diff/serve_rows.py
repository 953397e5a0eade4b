"""A served load's rows (`kvscope serve` run folders), in the long format of rows.py.

- `request` rows, one sample per finished request (unit_id: its request_id), from requests.parquet's columns:
  `ttft`, `tpot` (requests of two generated tokens or more), `e2e` (arrival to finish, queue included), `queue`,
  all ms, lower better; and `itl`, every inter-token gap of the finished requests pooled (unit_id: request_id:gap);
- `iteration` rows, one sample per scheduler iteration (unit_id: its number): the iteration's duration (`dur_ms`) by
  its kind, `decode iteration` (decode-only), `mixed iteration`, `prefill iteration`, and `iteration host` (host time
  per iteration, `host_ms`, every iteration);
- `load` rows, one value a side (the load's summary as `kvscope serve` computes it, `serving.summary.serve_summary`,
  from the tables read): `requests_per_s`, `output_tok_s`, `goodput_fraction` (higher better) and `little_ratio`
  (Little's law's check, 1 where it holds; shown, never judged). These never get a verdict ("one value a side")
  unless both sides hold the very same value.

The samples of one load are its requests and iterations, which share the scheduler's state (a slow iteration delays
every request it carries; an inter-token gap of one request is a gap of the others in its batch): an interval over
them says how this load's requests differ from the other load's, not how a rerun of the load would. Comparing
loads across reruns means rerunning both sides and reading the rows as a distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import HIGHER, LOWER, TIME_MS, frame
from kvscope.analysis.serving.records import ServeRun
from kvscope.analysis.serving.summary import finished, serve_summary

REQUEST_FAMILY, ITERATION_FAMILY, LOAD_FAMILY = "request", "iteration", "load"
REQUEST_ROWS = (("ttft", "ttft_ms"), ("tpot", "tpot_ms"), ("e2e", "e2e_ms"), ("queue", "queue_ms"))
ITERATION_ROWS = (("decode iteration", "decode"), ("mixed iteration", "mixed"), ("prefill iteration", "prefill"))
HOST_ROW = "iteration host"
# summary columns: (column, unit, better)
LOAD_ROWS = (("requests_per_s", "req/s", HIGHER), ("output_tok_s", "tok/s", HIGHER),
             ("goodput_fraction", "fraction", HIGHER), ("little_ratio", "ratio", HIGHER))
HEADLINE_ROW = "e2e"  # what a gate reads on served loads unless it names a row


def serve_rows(serve: ServeRun) -> pd.DataFrame:
    """A served load's rows (module docstring)."""
    records = _request_records(serve.requests) + _iteration_records(serve.iterations)
    records += _load_records(serve_summary(serve.requests, serve.iterations, serve.metadata))
    return frame(records)


def _time(row: str, family: str, uid: Any, value: float, phase: str = "") -> dict[str, Any]:
    return {"row": row, "family": family, "phase": phase, "metric": TIME_MS, "unit": "ms", "better": LOWER,
            "unit_id": uid, "value": value}


def _request_records(requests: pd.DataFrame) -> list[dict[str, Any]]:
    done = finished(requests)
    ids = [str(int(i)) for i in done["request_id"]]
    out: list[dict[str, Any]] = []
    for row, column in REQUEST_ROWS:
        values = done[column].to_numpy(np.float64)
        keep = np.isfinite(values)
        if row == "tpot":  # requests of two generated tokens or more (a one-token request has no TPOT)
            keep &= done["generated_tokens"].to_numpy(np.float64) >= 2
        out += [_time(row, REQUEST_FAMILY, uid, float(v)) for uid, v, k in zip(ids, values, keep, strict=True) if k]
    if "itl_ms" in done.columns:
        for uid, cell in zip(ids, done["itl_ms"], strict=True):
            gaps = np.asarray([] if cell is None or (isinstance(cell, float) and np.isnan(cell)) else list(cell),
                              dtype=np.float64)
            out += [_time("itl", REQUEST_FAMILY, f"{uid}:{j}", float(g)) for j, g in enumerate(gaps)
                    if np.isfinite(g)]
    return out


def _iteration_records(iterations: pd.DataFrame) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ids = [int(i) for i in iterations["iteration"]]
    kind = iterations["kind"].astype(str).to_numpy()
    dur = iterations["dur_ms"].to_numpy(np.float64)
    for row, which in ITERATION_ROWS:
        out += [_time(row, ITERATION_FAMILY, uid, float(v), which) for uid, v, k in zip(ids, dur, kind, strict=True)
                if k == which]
    host = iterations["host_ms"].to_numpy(np.float64)
    out += [_time(HOST_ROW, ITERATION_FAMILY, uid, float(v)) for uid, v in zip(ids, host, strict=True)
            if np.isfinite(v)]
    return out


def _load_records(summary: pd.DataFrame) -> list[dict[str, Any]]:
    row = summary.iloc[0]
    out = []
    for column, unit, better in LOAD_ROWS:
        value = float(row[column]) if column in row.index and pd.notna(row[column]) else np.nan
        out.append({"row": column, "family": LOAD_FAMILY, "phase": "", "metric": column, "unit": unit,
                    "better": better, "unit_id": "load", "value": value,
                    "note": "" if np.isfinite(value) else "not measured"})
    return out
