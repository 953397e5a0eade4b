"""A served load's run folder: requests.parquet, iterations.parquet, batches.parquet, memory.parquet (the ledger),
summary.parquet (one row, `kvscope.analysis.serving.summary`), timings.parquet (the instrument's regions: `iter N`
and any nested ones), nvml.parquet when NVML sampled, trace.json (one track per request, one for the iterations).
Names and columns: `kvscope.schema`'s served-load section. The folder is written whole or not at all
(`kvscope.io.AtomicFolder`, by the caller)."""

from __future__ import annotations

import math
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.serving.summary import serve_summary
from kvscope.io import write_json, write_parquet
from kvscope.measure.serve.run import ServeResult
from kvscope.measure.serve.scheduler import Sequence
from kvscope.measure.serve.trace import serve_trace
from kvscope.schema import (
    BATCH_COLUMNS,
    BATCHES_FILE,
    CUDA_CLOCK,
    ITERATION_COLUMNS,
    ITERATIONS_FILE,
    LEDGER_COLUMNS,
    LEDGER_FILE,
    MS_PER_S,
    NVML_FILE,
    REQUEST_COLUMNS,
    REQUESTS_FILE,
    SUMMARY_FILE,
    TIMING_COLUMNS,
    TIMINGS_FILE,
    TRACE_FILE,
)

NAN = math.nan


def default_out_dir(model: str, policy: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("traces") / f"{stamp}-serve-{model.replace('/', '_')}-{policy}"


def _request_row(seq: Sequence) -> dict[str, Any]:
    times = seq.token_s
    first = times[0] if times else NAN
    finish = seq.finish_s
    gaps = [(b - a) * MS_PER_S for a, b in pairwise(times)]
    n = len(seq.output)
    e2e = (finish - seq.arrival_s) * MS_PER_S
    return {
        "request_id": seq.spec.request_id, "status": seq.state, "reason": seq.reason, "arrival_s": seq.arrival_s,
        "admitted_s": seq.admitted_s, "first_token_s": first, "finish_s": finish,
        "queue_ms": (seq.admitted_s - seq.arrival_s) * MS_PER_S, "ttft_ms": (first - seq.arrival_s) * MS_PER_S,
        "tpot_ms": (finish - first) * MS_PER_S / (n - 1) if n > 1 and finish == finish else NAN, "e2e_ms": e2e,
        "prompt_tokens": len(seq.prompt), "output_tokens": seq.spec.output_tokens, "generated_tokens": n,
        "preemptions": seq.preempt_recompute + seq.preempt_swap, "preempt_recompute": seq.preempt_recompute,
        "preempt_swap": seq.preempt_swap, "itl_ms": gaps, "token_iterations": list(seq.token_iterations)}


def requests_frame(sequences: list[Sequence]) -> pd.DataFrame:
    rows = [_request_row(s) for s in sorted(sequences, key=lambda s: s.spec.request_id)]
    df = pd.DataFrame.from_records(rows, columns=list(REQUEST_COLUMNS))
    for col in ("request_id", "prompt_tokens", "output_tokens", "generated_tokens", "preemptions",
                "preempt_recompute", "preempt_swap"):
        df[col] = df[col].astype("int64")
    return df


def iterations_frame(rows: list[dict[str, Any]], regions: list[dict[str, Any]]) -> pd.DataFrame:
    """The iterations with their CUDA-event durations (host durations when no CUDA clock timed them) and the device
    idle time between consecutive iterations."""
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        return pd.DataFrame(columns=list(ITERATION_COLUMNS))
    timed = {r["step"]: r for r in regions if r.get("level") == "step" and r.get("step") is not None}
    cuda = [timed.get(i) for i in df["iteration"]]
    on_cuda = all(r is not None and r.get("clock") == CUDA_CLOCK for r in cuda)
    if on_cuda:
        start = np.array([r["start_ms"] for r in cuda])
        dur = np.array([r["dur_ms"] for r in cuda])
        df["dur_ms"] = dur
        gap = np.full(len(df), NAN)
        gap[1:] = start[1:] - (start[:-1] + dur[:-1])
        df["gpu_gap_ms"] = gap
    else:
        df["dur_ms"] = df["host_dur_ms"]
        df["gpu_gap_ms"] = NAN
    return df[list(ITERATION_COLUMNS)]


def timings_frame(regions: list[dict[str, Any]], run_id: str) -> pd.DataFrame:
    df = pd.DataFrame.from_records(regions)
    df["run_id"] = run_id
    for col in TIMING_COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df[list(TIMING_COLUMNS)]


def frames(result: ServeResult, run_id: str) -> dict[str, pd.DataFrame]:
    """Every table of the run folder, by file name."""
    requests = requests_frame(result.sequences)
    iterations = iterations_frame(result.iterations, result.regions)
    batches = pd.DataFrame.from_records(result.batches, columns=list(BATCH_COLUMNS))
    ledger = pd.DataFrame.from_records(result.ledger, columns=list(LEDGER_COLUMNS))
    summary = serve_summary(requests, iterations, result.meta)
    return {REQUESTS_FILE: requests, ITERATIONS_FILE: iterations, BATCHES_FILE: batches, LEDGER_FILE: ledger,
            SUMMARY_FILE: summary, TIMINGS_FILE: timings_frame(result.regions, run_id)}


def write_serve_run(result: ServeResult, tables: dict[str, pd.DataFrame], nvml: pd.DataFrame | None,
                    folder: Path) -> None:
    for name, df in tables.items():
        write_parquet(df, folder / name, result.meta)
    if nvml is not None:
        write_parquet(nvml, folder / NVML_FILE, result.meta)
    write_json(serve_trace(tables[REQUESTS_FILE], tables[ITERATIONS_FILE], result.meta), folder / TRACE_FILE)
