"""Terminal table of a run's summary (rich)."""

from __future__ import annotations

import math

import pandas as pd
from rich.markup import escape
from rich.table import Table

_ROWS = (
    ("model", "model", "{}"), ("device", "device", "{}"), ("dtype / attn", None, None),
    ("batch x seq (+gen)", None, None),
    ("TTFT (host clock) p50 [q1, q3] (ms)", "ttft", None),
    ("prefill timed region p50 [q1, q3] (ms)", "prefill_gpu", None),
    ("TPOT p50 [q1, q3] (ms)", "tpot", None),
    ("p90 / p99: TTFT, TPOT (ms)", ("ttft_p90_ms", "ttft_p99_ms", "tpot_p90_ms", "tpot_p99_ms"), "{:.3f}"),
    ("prefill tok/s", "prefill_tok_s", "{:,.0f}"), ("decode tok/s", "decode_tok_s", "{:,.1f}"),
    ("total tok/s", "total_tok_s", "{:,.1f}"),
    ("decode: host clock vs event sum, max gap (%)", "decode_host_vs_events_max_pct", "{:.2f}"),
    ("peak allocated / reserved (MiB)", ("peak_allocated_mib", "peak_reserved_mib"), "{:,.0f}"),
    ("KV cache (bytes, measured)", ("kv_cache_bytes", "kv_alloc_bytes"), "{:,}"),
)


def _fmt(fmt: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def _dispersion(row: pd.Series, prefix: str) -> str:
    """`median [q1, q3], n samples`, and the spread when the interquartile range is wide (host-bound)."""
    median = row["ttft_ms"] if prefix == "ttft" else row[f"{prefix}_p50_ms" if prefix == "tpot" else f"{prefix}_ms"]
    n = int(row[f"{prefix}_samples"])
    if n == 0:
        return "n/a (not timed)"
    text = (f"{_fmt('{:.3f}', median)} [{_fmt('{:.3f}', row[f'{prefix}_q1_ms'])}, "
            f"{_fmt('{:.3f}', row[f'{prefix}_q3_ms'])}], {n} samples")
    iqr = row[f"{prefix}_iqr_pct"]
    if prefix in str(row.get("spread_flag", "")).split(","):
        text += f", SPREAD {iqr:.0f}% of the median (host-bound?)"
    return text


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
        elif fmt is None:
            value = _dispersion(row, cols)
            if cols == "tpot":
                label = f"TPOT ({'host clock' if row['clock'] == 'host' else 'CUDA events'}) p50 [q1, q3] (ms)"
        elif isinstance(cols, tuple):
            value = " / ".join(_fmt(fmt, row[c]) for c in cols)
        else:
            value = _fmt(fmt, row[cols])
        table.add_row(escape(label), escape(value))  # `[q1, q3]` is text, not rich markup
    return table
