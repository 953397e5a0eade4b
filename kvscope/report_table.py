"""Terminal table of a run's summary (rich)."""

from __future__ import annotations

import math

import pandas as pd
from rich.table import Table

_ROWS = (
    ("model", "model", "{}"), ("device", "device", "{}"), ("dtype / attn", None, None),
    ("batch x seq (+gen)", None, None),
    ("TTFT p50 / p90 / p99 (ms)", ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"), "{:.3f}"),
    ("TPOT p50 / p90 / p99 (ms)", ("tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms"), "{:.3f}"),
    ("prefill tok/s", "prefill_tok_s", "{:,.0f}"), ("decode tok/s", "decode_tok_s", "{:,.1f}"),
    ("total tok/s", "total_tok_s", "{:,.1f}"),
    ("decode: host clock vs event sum, max gap (%)", "decode_host_vs_events_max_pct", "{:.2f}"),
    ("peak allocated / reserved (MiB)", ("peak_allocated_mb", "peak_reserved_mb"), "{:,.0f}"),
    ("KV cache (bytes, measured)", ("kv_cache_bytes", "kv_alloc_bytes"), "{:,}"),
)


def _fmt(fmt: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def summary_table(summary: pd.DataFrame) -> Table:
    row = summary.iloc[0]
    table = Table(title=f"kvscope run {row['run_id']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for label, cols, fmt in _ROWS:
        if label == "dtype / attn":
            value = f"{row['dtype']} / {row['attn']} / granularity {row['granularity']}"
            if "cuda_graphs" in row.index:
                value += (f" / graphs {'on' if row['cuda_graphs'] else 'off'}, "
                          f"kernels {'on' if row['kernels'] else 'off'}")
        elif label == "batch x seq (+gen)":
            value = f"{row['batch']} x {row['seq_len']} (+{row['gen_tokens']}), {row['reps']} reps"
        elif isinstance(cols, tuple):
            value = " / ".join(_fmt(fmt, row[c]) for c in cols)
        else:
            value = _fmt(fmt, row[cols])
        table.add_row(label, value)
    return table
