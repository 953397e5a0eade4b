"""The report of a run folder, or of a `kvscope nsys` folder (its run/ and the align results beside it): the run's
summary with the spread of TTFT, the prefill and TPOT, the KV cache, the decode step by layer and by op, and with
align results, kernel time by class and GPU busy vs idle per decode step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from kvscope.analysis.align.join import LAUNCH_BOUND_IDLE_FRACTION
from kvscope.analysis.inputs import KERNEL_CLASSES_COLUMNS, read_align_results, read_run
from kvscope.analysis.report.markdown import FIGURE_SIZE_IN, FIGURE_SUFFIX, Report, md_table, percent_of_total
from kvscope.schema import CLASSIC_COLUMNS, SUMMARY_FILE

LAYER_BAR_WIDTH_IN = 0.18  # decode-layer bar chart: inches of width per region
# latency percentiles, shown for run folders written before the spread columns existed
LATENCY_COLUMNS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms")
# the spread table: (label, median column, column prefix of q1/q3/p90/p99/iqr_pct/samples, spread_flag name)
_SPREAD_ROWS = (("TTFT: call to first tokens on the host", "ttft_ms", "ttft", "ttft"),
                ("prefill: timed region", "prefill_gpu_ms", "prefill_gpu", None),
                ("TPOT: one decode step", "tpot_p50_ms", "tpot", "tpot"))
KV_SUMMARY_COLUMNS = ("kv_predicted_bytes", "kv_cache_bytes", "kv_alloc_bytes")


def run_report(source: Path) -> Report:
    """The report of a run folder, or of a `kvscope nsys` folder (its run/ and the align results beside it)."""
    run = read_run(source)  # every file of the folder checked to be of one run
    run_dir, summary, timings = run.path, run.summary, run.timings
    align = read_align_results(run_dir, summary)
    rep = Report()
    row = summary.iloc[0]
    if len(summary) > 1:
        rep.note(f"{run_dir / SUMMARY_FILE} holds {len(summary)} rows; this report shows the first")
    _run_header(rep, summary)
    _run_summary_section(rep, summary)
    _decode_layers_section(rep, timings, str(row["model"]))
    _decode_ops_section(rep, timings)
    if align is not None:
        _align_sections(rep, *align, model=str(row["model"]))
    return rep


def _run_header(rep: Report, summary: pd.DataFrame) -> None:
    row = summary.iloc[0]
    rep.text(f"# kvscope run {row['run_id']}",
             f"{row['model']} on {row['device']}, {row['dtype']}, attention {row['attn']}, granularity "
             f"{row['granularity']}: batch {row['batch']}, prompt {row['seq_len']}, {row['gen_tokens']} new tokens, "
             f"{row['reps']} repetitions after {row['warmup']} warm-up.")


def _present(summary: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    return summary[[c for c in columns if c in summary.columns]].head(1)


def _run_summary_section(rep: Report, summary: pd.DataFrame) -> None:
    paragraphs = [md_table(_present(summary, CLASSIC_COLUMNS))]
    spread = _spread_table(summary.iloc[0])
    if spread is not None:
        paragraphs += [md_table(spread[0], formats={"samples": "{:,.0f}"}), *spread[1]]
    else:
        latency = _present(summary, LATENCY_COLUMNS)
        if len(latency.columns):
            paragraphs.append(md_table(latency))
    rep.section("Summary", *paragraphs)
    kv = _present(summary, KV_SUMMARY_COLUMNS)
    if len(kv.columns):
        rep.section("KV cache: measured allocation vs prediction", md_table(kv))


def _spread_table(row: pd.Series) -> tuple[pd.DataFrame, list[str]] | None:
    """Median, quartiles, interquartile range, p90/p99 (NaN below 10 / 100 samples) and sample count of TTFT, the
    prefill's timed region and TPOT, with a sentence for each quantity the run flagged as spread; None for a summary
    written before these columns existed."""
    needed = [f"{prefix}_{k}" for _, _, prefix, _ in _SPREAD_ROWS for k in ("q1_ms", "q3_ms", "samples")]
    if not set(needed) <= set(row.index):
        return None
    clock = str(row.get("clock", "cuda"))
    clocks = {"ttft": "host", "prefill_gpu": clock, "tpot": clock}
    flags = str(row.get("spread_flag", "") if pd.notna(row.get("spread_flag", "")) else "").split(",")
    table, sentences = [], []
    for label, median, prefix, flag in _SPREAD_ROWS:
        table.append({"quantity": label, "clock": clocks[prefix], "median_ms": row[median],
                      "q1_ms": row[f"{prefix}_q1_ms"], "q3_ms": row[f"{prefix}_q3_ms"],
                      "iqr_pct_of_median": row.get(f"{prefix}_iqr_pct", math.nan),
                      "p90_ms": row.get(f"{prefix}_p90_ms", math.nan), "p99_ms": row.get(f"{prefix}_p99_ms", math.nan),
                      "samples": row[f"{prefix}_samples"]})
        if flag is not None and flag in flags:
            sentences.append(f"{label.split(':')[0]} is spread: its interquartile range is "
                             f"{row[f'{prefix}_iqr_pct']:.0f}% of its median over {int(row[f'{prefix}_samples'])} "
                             f"samples. Such a phase is bound by the host (kernel launches, the host's own load); "
                             f"compare runs by their quartiles, not by one median.")
    sentences.append("p90 is shown from 10 samples on and p99 from 100; below that they are n/a.")
    return pd.DataFrame(table), sentences


def _decode_rows(timings: pd.DataFrame, level: str) -> pd.DataFrame:
    return timings[(timings["level"] == level) & (timings["phase"] == "decode") & timings["dur_ms"].notna()
                   & timings["name"].notna()]


def _decode_layers_section(rep: Report, timings: pd.DataFrame, model: str) -> None:
    layers = _decode_rows(timings, "layer")
    if not len(layers):
        return
    med = layers.groupby("name")["dur_ms"].median()
    med = med.reindex(sorted(med.index, key=lambda n: (not str(n).startswith("L"), str(n))))
    fig = Figure(figsize=(max(FIGURE_SIZE_IN[0], LAYER_BAR_WIDTH_IN * len(med)), FIGURE_SIZE_IN[1]))
    ax = fig.add_subplot()
    ax.bar(range(len(med)), med.to_numpy())
    ax.set_xticks(range(len(med)), [str(n) for n in med.index], rotation=90, fontsize=6)
    ax.set_xlabel("region inside a decode step")
    ax.set_ylabel("median CUDA-event time (ms)")
    ax.set_title(f"{model}: decode step by layer")
    rep.section("Decode step by layer")
    rep.figure(f"decode_layers{FIGURE_SUFFIX}", fig, "decode step by layer")


def _decode_ops_section(rep: Report, timings: pd.DataFrame) -> None:
    ops = _decode_rows(timings, "op")
    if not len(ops) or "op" not in ops.columns:
        return
    ops = ops[ops["op"].notna()]
    if not len(ops):
        return
    total = ops.groupby("op")["dur_ms"].sum().sort_values(ascending=False)
    df = pd.DataFrame({"op": total.index, "total_ms": total.to_numpy(),
                       "share_pct": percent_of_total(total, "the decode ops' total time")})
    rep.section("Decode time by op (CUDA events)", md_table(df))


def _align_sections(rep: Report, classes: pd.DataFrame, steps: pd.DataFrame, model: str) -> None:
    if len(classes):
        shown = classes[list(KERNEL_CLASSES_COLUMNS)].copy()
        shown["share_pct"] = [v if math.isfinite(v) else "n/a (phase total 0 ms)" for v in shown["share_pct"]]
        shown["ops"] = [int(v) if math.isfinite(v) else v for v in shown["ops"]]
        rep.section("Kernel time by class (Nsight Systems)", md_table(shown))
    dec = steps[(steps["phase"] == "decode") & steps["gpu_busy_ms"].notna() & steps["gpu_idle_ms"].notna()]
    dec = dec.reset_index(drop=True)
    if not len(dec):
        return
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    x = range(len(dec))
    ax.bar(x, dec["gpu_busy_ms"], label="GPU busy")
    ax.bar(x, dec["gpu_idle_ms"], bottom=dec["gpu_busy_ms"], label="GPU idle", alpha=0.6)
    ax.set_xlabel("decode step (all repetitions, in order)")
    ax.set_ylabel("ms")
    ax.set_title(f"{model}: GPU busy vs idle per decode step")
    ax.legend(fontsize=8)
    bound = int(dec["launch_bound"].fillna(False).astype(bool).sum())
    rep.section("GPU busy vs idle per decode step",
                f"{bound} of {len(dec)} decode steps are launch-bound (GPU idle above "
                f"{LAUNCH_BOUND_IDLE_FRACTION:.0%} of the step's span).")
    rep.figure(f"decode_busy_idle{FIGURE_SUFFIX}", fig, "busy vs idle")
