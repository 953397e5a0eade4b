"""A hand-built served load whose every number is known (the tests of kvscope.analysis.serving read it).

Five iterations back to back, each token coming out at the end of its iteration:

| it | kind | start..end (s) | dur ms | carries (request: kind, tokens, context) |
| 0 | prefill | 0.00..0.10 | 100 | r1 prefill 8 (ctx 8) |
| 1 | mixed | 0.10..0.25 | 150 | r1 decode (ctx 9), r2 prefill 16 (ctx 16) |
| 2 | mixed | 0.25..0.37 | 120 | r1 decode (ctx 10), r2 decode (ctx 17), r3 prefill 4 (ctx 4) |
| 3 | decode | 0.37..0.45 | 80 | r1 decode (ctx 11), r2 decode (ctx 18), r3 decode (ctx 5) |
| 4 | decode | 0.45..0.50 | 50 | r2 decode (ctx 19) |

r1 arrives at 0.0 (tokens at 0.10, 0.25, 0.37, 0.45: TTFT 100, gaps 150, 120, 80, e2e 450), r2 at 0.1 (tokens at 0.25,
0.37, 0.45, 0.50: TTFT 150, gaps 120, 80, 50, e2e 400, one preemption by recompute), r3 at 0.2, admitted at 0.25
(queue 50; tokens at 0.37, 0.45: TTFT 170, gap 80, e2e 250), r4 at 0.3 is refused (10,000-token prompt).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from kvscope.analysis.serving.planner import PLAN_COLUMNS
from kvscope.io import write_parquet
from kvscope.schema import (
    BATCH_COLUMNS,
    BATCHES_FILE,
    ITERATION_COLUMNS,
    ITERATIONS_FILE,
    LEDGER_COLUMNS,
    LEDGER_FILE,
    REQUEST_COLUMNS,
    REQUESTS_FILE,
    SERVE_SWEEP_FILE,
)

NAN = math.nan
META: dict[str, Any] = {
    "created_utc": "2026-12-07T00:00:00", "device": "cpu", "model": {"spec": "tiny"}, "dtype": "float32",
    "serve": {"policy": "chunked", "rps": 10.0, "concurrency": None, "block_size": 4, "max_batch_tokens": 32,
              "preempt": "recompute", "slo_ttft_ms": 160.0, "slo_tpot_ms": 100.0, "requests": 4, "duration_s": None,
              "seed": 0, "kv_bytes_per_token": 1000, "weights_bytes": 100_000},
}


def requests() -> pd.DataFrame:
    rows = [
        (1, "finished", "", 0.0, 0.0, 0.10, 0.45, 0.0, 100.0, 350 / 3, 450.0, 8, 4, 4, 0, 0, 0,
         [150.0, 120.0, 80.0], [0, 1, 2, 3]),
        (2, "finished", "", 0.1, 0.1, 0.25, 0.50, 0.0, 150.0, 250 / 3, 400.0, 16, 4, 4, 1, 1, 0,
         [120.0, 80.0, 50.0], [1, 2, 3, 4]),
        (3, "finished", "", 0.2, 0.25, 0.37, 0.45, 50.0, 170.0, 80.0, 250.0, 4, 2, 2, 0, 0, 0, [80.0], [2, 3]),
        (4, "refused", "prompt larger than the pool", 0.3, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 10_000, 4, 0, 0, 0,
         0, [], []),
    ]
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def iterations() -> pd.DataFrame:
    cols = {
        "iteration": [0, 1, 2, 3, 4], "kind": ["prefill", "mixed", "mixed", "decode", "decode"],
        "start_s": [0.0, 0.10, 0.25, 0.37, 0.45], "end_s": [0.10, 0.25, 0.37, 0.45, 0.50],
        "dur_ms": [100.0, 150.0, 120.0, 80.0, 50.0], "gpu_gap_ms": [NAN, 0.5, 0.5, 1.0, 2.0],
        "host_ms": [1.0, 2.0, 3.0, 4.0, 5.0], "prefill_tokens": [8, 16, 4, 0, 0], "prefill_seqs": [1, 1, 1, 0, 0],
        "decode_seqs": [0, 1, 2, 3, 1], "tokens": [8, 17, 6, 3, 1], "context_tokens": [8, 25, 31, 34, 19],
        "running": [1, 2, 3, 3, 1], "waiting": [0, 0, 0, 1, 0], "swapped": [0, 0, 0, 0, 0],
        "blocks_used": [2, 7, 10, 11, 5], "blocks_free": [18, 13, 10, 9, 15],
        "token_slots_used": [8, 25, 31, 34, 19], "block_slots_held": [8, 28, 40, 44, 20],
        "swap_out_bytes": [0, 0, 0, 0, 0], "swap_in_bytes": [0, 0, 0, 0, 0], "preempted": [0, 0, 0, 0, 0],
        "graph_batch": [0, 0, 0, 0, 0],
    }
    return pd.DataFrame(cols, columns=list(ITERATION_COLUMNS))


def batches() -> pd.DataFrame:
    rows = [(0, 1, "prefill", 8, 8),
            (1, 1, "decode", 1, 9), (1, 2, "prefill", 16, 16),
            (2, 1, "decode", 1, 10), (2, 2, "decode", 1, 17), (2, 3, "prefill", 4, 4),
            (3, 1, "decode", 1, 11), (3, 2, "decode", 1, 18), (3, 3, "decode", 1, 5),
            (4, 2, "decode", 1, 19)]
    return pd.DataFrame(rows, columns=list(BATCH_COLUMNS))


def ledger() -> pd.DataFrame:
    return pd.DataFrame([("weights", 100_000, "parameters"), ("kv pool", 80_000, "20 blocks of 4 tokens")],
                        columns=list(LEDGER_COLUMNS))


def write_run(folder: Path, meta: dict[str, Any] | None = None, **tables: pd.DataFrame) -> Path:
    """The run folder of the hand-built load (`tables` by file stem replace its frames: requests=..., ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = {REQUESTS_FILE: tables.get("requests", requests()), ITERATIONS_FILE: tables.get("iterations",
                                                                                             iterations()),
              BATCHES_FILE: tables.get("batches", batches()), LEDGER_FILE: tables.get("ledger", ledger())}
    for name, df in frames.items():
        write_parquet(df, folder / name, META if meta is None else meta)
    return folder


def sweep_rows(policy: str, rps: list[float], ttft_p99: list[float], goodput: list[float]) -> pd.DataFrame:
    """Rows of a serve sweep (the columns its report and planner read)."""
    return pd.DataFrame({"policy": policy, "rps": rps, "concurrency": NAN, "offered_rps": rps,
                         "requests_per_s": [min(r, 5.0) for r in rps], "ttft_p50_ms": [t / 2 for t in ttft_p99],
                         "ttft_p90_ms": ttft_p99, "ttft_p99_ms": ttft_p99, "tpot_p50_ms": 20.0, "tpot_p99_ms": 40.0,
                         "itl_p99_ms": 45.0, "goodput_rps": [g * r for g, r in zip(goodput, rps, strict=True)],
                         "goodput_fraction": goodput, "slo_ttft_ms": 160.0, "slo_tpot_ms": 100.0,
                         "little_ratio": 1.0, "preemptions": 0})


def write_sweep(folder: Path, table: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(table, folder / SERVE_SWEEP_FILE, META)
    return folder


def capacity_plan() -> pd.DataFrame:
    rows = []
    for sc, rate in (("contiguous bfloat16 KV", 3.0), ("paged bfloat16 KV", 4.0), ("paged fp8 KV", 8.0)):
        rows += [(sc, "max_batch_slo", 16, "requests", "measured", ""),
                 (sc, "ttft_ms", 120.0, "ms", "measured", ""), (sc, "tpot_ms", 25.0, "ms", "interpolated", ""),
                 (sc, "request_rate_per_s", rate, "requests/s", "computed", "concurrency / latency")]
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
