"""The report of a sweep file (`kvscope report seq.csv`): its results table, the spread of TTFT and TPOT, one plot
per metric against sequence length and against batch size, and the KV cache's measured allocation against kv-math's
prediction.

A metric column holding text that is not a number is left out with a note (never plotted as categories); infinite
values are left out of the tables and plots with a note; configurations that ran out of memory are left out of the
plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kvscope.analysis.inputs import numeric_column, read_sweep
from kvscope.analysis.report_markdown import FIGURE_SIZE_IN, FIGURE_SUFFIX, Report, md_table, percent_change
from kvscope.analysis.schema import CLASSIC_COLUMNS

MIB_BYTES = 2**20
_SWEEP_PLOTS = (
    ("prefill_ms_per_tok", "prefill latency per prompt token (ms)", "prefill ms per token"),
    ("prefill_tok_s", "prefill throughput (tokens/s)", "prefill tokens/s"),
    ("decode_p50_ms_per_tok", "decode latency per token, median step (ms)", "decode ms per token"),
    ("decode_tok_s", "decode throughput (tokens/s)", "decode tokens/s"),
    ("vram_reserved_mb", "peak reserved GPU memory (MiB)", "VRAM"),
)
_SWEEP_AXES = (("seq_len", "batch"), ("batch", "seq_len"))  # (x axis, one line per value of)
_KV_COLUMNS = ("kv_predicted_bytes", "kv_alloc_bytes")
# numeric columns of a sweep file that the report shows or plots; a column holding text is left out with a note
_SWEEP_METRICS = tuple(dict.fromkeys([*(c for c in CLASSIC_COLUMNS if c not in ("seq_len", "batch", "flag")),
                                      *(c for c, _, _ in _SWEEP_PLOTS), *_KV_COLUMNS]))
# the spread of TTFT and TPOT per configuration, shown when the file has these columns
_SWEEP_SPREAD_COLUMNS = ("seq_len", "batch", "ttft_ms", "ttft_q1_ms", "ttft_q3_ms", "ttft_iqr_pct", "ttft_samples",
                         "tpot_p50_ms", "tpot_q1_ms", "tpot_q3_ms", "tpot_iqr_pct", "tpot_samples", "spread_flag")


def _is_pow2(values: pd.Series) -> bool:
    v = values.dropna()
    return len(v) > 1 and all(float(x).is_integer() and x > 0 and (int(x) & (int(x) - 1)) == 0 for x in v)


def _log2_axis(ax: Axes, values: pd.Series) -> None:
    """log2 x axis with the data's own values as tick labels."""
    ticks = sorted(int(v) for v in values.dropna().unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _axis_label(x: str) -> str:
    return "prompt length (tokens)" if x == "seq_len" else "batch size (sequences)"


def _line_plot(df: pd.DataFrame, x: str, y: str, group: str, title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    for key, g in df.groupby(group):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker="o", label=f"{group.replace('_len', '')} {key}")
    if _is_pow2(df[x]):
        _log2_axis(ax, df[x])
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _first_text(df: pd.DataFrame, col: str) -> str | None:
    if col not in df.columns:
        return None
    values = [str(v) for v in df[col] if not pd.isna(v) and str(v).strip()]
    return values[0] if values else None


def _sweep_numbers(df: pd.DataFrame, rep: Report) -> pd.DataFrame:
    """The sweep's metric columns as numbers: a column holding text is dropped, and infinite values become missing,
    each with a note."""
    df = df.copy()
    for col in _SWEEP_METRICS:
        if col not in df.columns:
            continue
        num = numeric_column(df, col)
        if num.values is None:
            rep.note(f"{num.problem}: left out of the tables and plots")
            df = df.drop(columns=col)
            continue
        infinite = np.isinf(num.values.to_numpy(np.float64, na_value=np.nan))
        if infinite.any():
            rep.note(f"column {col} holds {int(infinite.sum())} infinite value(s): left out of the tables and plots")
        df[col] = num.values.where(~infinite)
    return df


def sweep_report(path: Path) -> Report:
    raw = read_sweep(path)
    rep = Report()
    df = _sweep_numbers(raw, rep)
    if "flag" in df.columns:
        oom = df["flag"].str.contains("oom").to_numpy()
    else:
        oom = np.zeros(len(df), dtype=bool)
        rep.note("the file has no flag column: no configuration is known to have run out of memory")
    ok = df[~oom]
    model = _first_text(df, "model") or "unknown model"
    rep.text(f"# kvscope sweep: {model}",
             f"Source: `{path}` ({len(df)} configurations, {int(oom.sum())} out of memory).")
    device, dtype = _first_text(df, "device"), _first_text(df, "dtype")
    if device is not None:
        rep.text(f"Device: {device}; dtype {dtype or 'not recorded'}.")
    rep.section("Results", md_table(df[[c for c in CLASSIC_COLUMNS if c in df.columns]]))
    if set(_SWEEP_SPREAD_COLUMNS) <= set(df.columns):
        rep.section("Spread of TTFT (host clock) and TPOT",
                    md_table(df[list(_SWEEP_SPREAD_COLUMNS)],
                             formats={"ttft_samples": "{:,.0f}", "tpot_samples": "{:,.0f}"}),
                    "spread_flag names the quantities whose interquartile range exceeds a tenth of the median "
                    "(host-bound).")
    for x, group in _SWEEP_AXES:
        _sweep_axis_section(rep, ok, x, group, model)
    _sweep_kv_section(rep, ok, model)
    return rep


def _sweep_axis_section(rep: Report, ok: pd.DataFrame, x: str, group: str, model: str) -> None:
    """One plot per metric against `x`, a line per value of `group`; no section when nothing can be plotted."""
    if ok[x].nunique() < 2:
        return
    plots = [(col, ylabel, short) for col, ylabel, short in _SWEEP_PLOTS
             if col in ok.columns and ok[col].notna().any()]
    if not plots:
        return
    rep.section(f"Against {'sequence length' if x == 'seq_len' else 'batch size'}")
    for col, ylabel, short in plots:
        fig = _line_plot(ok, x, col, group, f"{model}: {short} vs {x.replace('_len', ' length')}", ylabel)
        rep.figure(f"{col}_vs_{x}{FIGURE_SUFFIX}", fig, short)


def _sweep_kv_section(rep: Report, ok: pd.DataFrame, model: str) -> None:
    if not set(_KV_COLUMNS) <= set(ok.columns):
        return
    kv = ok[["seq_len", "batch", *_KV_COLUMNS]].dropna(subset=list(_KV_COLUMNS), how="all").copy()
    if not len(kv):
        return
    kv["alloc_vs_predicted_pct"] = percent_change(kv["kv_alloc_bytes"], kv["kv_predicted_bytes"],
                                                  "predicted size")
    rep.section("KV cache: measured allocation vs prediction",
                md_table(kv, "{:,.4f}", formats=dict.fromkeys(_KV_COLUMNS, "{:,.0f}")))
    x = "seq_len" if ok["seq_len"].nunique() >= ok["batch"].nunique() else "batch"
    srt = kv.dropna(subset=list(_KV_COLUMNS)).sort_values([x])
    if not len(srt):
        return
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    ax.plot(srt[x], srt["kv_predicted_bytes"] / MIB_BYTES, marker="o", label="predicted (kv-math)")
    ax.plot(srt[x], srt["kv_alloc_bytes"] / MIB_BYTES, marker="x", linestyle="--", label="measured allocation")
    if _is_pow2(srt[x]):
        _log2_axis(ax, srt[x])
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(f"{model}: KV cache, measured vs predicted")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    rep.figure(f"kv_measured_vs_predicted{FIGURE_SUFFIX}", fig, "KV cache measured vs predicted")
