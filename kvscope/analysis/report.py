"""`kvscope report`: a Markdown report with PNG plots, for a run folder or a sweep file.

Three steps, so that bad input never leaves a half-written folder:
1. read and check the input (`kvscope.analysis.inputs`): a missing, empty, truncated or foreign file, missing
   columns, or text where a key column needs numbers is a one-line `KvscopeError` naming the path the user gave;
2. build the report in memory (`Report`: Markdown lines, figures, notes), one function per section;
3. write it into a temporary folder renamed into place at the end (`kvscope.io.AtomicFolder`); a failed write (a
   full disk) is a one-line error and leaves nothing.

Numbers: a metric column holding text that is not a number is left out, with a note at the end of the report (never
plotted as categories); missing values and infinities are left out of plots, and a section with no data is not
written. Percentages whose base is missing, zero or negative are printed as "n/a (reason)", never inf or nan.

The output folder (`--out`, default `<source>-report` beside the source) may be new, empty, or an earlier report
(only `report.md` and `.png` files), which is replaced whole; any other folder is refused before anything is read.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvscope.analysis.align import LAUNCH_BOUND_IDLE_FRACTION
from kvscope.analysis.inputs import (
    CLASSIC_COLUMNS,
    find_run_folder,
    numeric_column,
    read_parquet,
    read_summary,
    read_sweep,
    read_timings,
    require_columns,
    require_numbers,
)
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder

REPORT_FILE = "report.md"
FIGURE_SUFFIX = ".png"
MIB_BYTES = 2**20
FIGURE_DPI = 110
FIGURE_SIZE_IN = (6.4, 4.0)
LAYER_BAR_WIDTH_IN = 0.18  # decode-layer bar chart: inches of width per region
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
# run summary: latency percentiles and KV-cache sizes, each shown when the summary has it
# (run folders written before the spread columns existed: a plain percentile table)
LATENCY_COLUMNS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms")
# the spread table: (label, median column, column prefix of q1/q3/p90/p99/iqr_pct/samples, spread_flag name)
_SPREAD_ROWS = (("TTFT: call to first tokens on the host", "ttft_ms", "ttft", "ttft"),
                ("prefill: timed region", "prefill_gpu_ms", "prefill_gpu", None),
                ("TPOT: one decode step", "tpot_p50_ms", "tpot", "tpot"))
# sweep files: the spread of TTFT and TPOT per configuration, shown when the file has these columns
_SWEEP_SPREAD_COLUMNS = ("seq_len", "batch", "ttft_ms", "ttft_q1_ms", "ttft_q3_ms", "ttft_iqr_pct", "ttft_samples",
                         "tpot_p50_ms", "tpot_q1_ms", "tpot_q3_ms", "tpot_iqr_pct", "tpot_samples", "spread_flag")
KV_SUMMARY_COLUMNS = ("kv_predicted_bytes", "kv_cache_bytes", "kv_alloc_bytes")
# results of `kvscope nsys` / `kvscope align` beside or in a run folder
CLASSES_FILE = "kernel_classes.parquet"
STEPS_FILE = "steps.parquet"
CLASSES_COLUMNS = ("phase", "kernel_class", "ops", "time_ms", "share_pct")
STEPS_COLUMNS = ("phase", "gpu_busy_ms", "gpu_idle_ms", "launch_bound")


# ---- Markdown ----------------------------------------------------------------------------------------------------
def md_table(df: pd.DataFrame, floatfmt: str = "{:,.3f}", formats: dict[str, str] | None = None) -> str:
    """A Markdown table. Floats in `floatfmt` (or the column's format in `formats`), missing values blank,
    infinities "n/a"; text cells (such as "n/a (reason)") as they are."""

    def cell(v: object, fmt: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return fmt.format(v) if math.isfinite(v) else "n/a"
        if isinstance(v, int | np.integer) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    fmts = [(formats or {}).get(str(c), floatfmt) for c in df.columns]
    body = ["| " + " | ".join(cell(v, f) for v, f in zip(row, fmts, strict=True)) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def percent_change(value: pd.Series, base: pd.Series, base_name: str) -> list[float | str]:
    """(value / base - 1) * 100 per row, or "n/a (reason)" where that has no meaning: a missing value, or a base
    that is zero or negative."""
    out: list[float | str] = []
    for v, b in zip(value, base, strict=True):
        if pd.isna(v) or pd.isna(b):
            out.append("n/a (missing value)")
        elif b == 0:
            out.append(f"n/a ({base_name} is 0)")
        elif b < 0:
            out.append(f"n/a ({base_name} is negative)")
        else:
            out.append(float((v / b - 1) * 100))
    return out


def percent_of_total(values: pd.Series, total_name: str) -> list[float | str]:
    """Each value's share of their sum in percent, or "n/a (reason)" for all when the sum is not positive."""
    total = float(values.sum())
    if not total > 0:
        reason = f"n/a ({total_name} is {'0' if total == 0 else 'negative'})"
        return [reason] * len(values)
    return [float(v / total * 100) for v in values]


@dataclass
class Report:
    """A report built in memory: Markdown lines, figures by file name, and notes on data left out (written last,
    under "Notes")."""

    lines: list[str] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def section(self, title: str, *paragraphs: str) -> None:
        self.text(f"## {title}", *paragraphs)

    def figure(self, name: str, fig: Figure, alt: str) -> None:
        FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend
        fig.tight_layout()
        self.figures[name] = fig
        self.text(f"![{alt}]({name})")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        notes = ["## Notes", "", *(f"- {n}" for n in self.notes), ""] if self.notes else []
        return "\n".join([*self.lines, *notes])

    def write(self, folder: Path) -> Path:
        for name, fig in self.figures.items():
            fig.savefig(folder / name, dpi=FIGURE_DPI)
        path = folder / REPORT_FILE
        path.write_text(self.markdown())
        return path


# ---- plots -------------------------------------------------------------------------------------------------------
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


# ---- sweep report ------------------------------------------------------------------------------------------------
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


# ---- run report --------------------------------------------------------------------------------------------------
def run_report(source: Path) -> Report:
    """The report of a run folder, or of a `kvscope nsys` folder (its run/ and the align results beside it)."""
    run_dir = find_run_folder(source)
    summary = read_summary(run_dir)
    timings = read_timings(run_dir)
    align = _read_align_results(run_dir)
    rep = Report()
    row = summary.iloc[0]
    if len(summary) > 1:
        rep.note(f"{run_dir / 'summary.parquet'} holds {len(summary)} rows; this report shows the first")
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


def _read_align_results(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """kernel_classes.parquet and steps.parquet of `kvscope nsys` (DIR/run/ + DIR/*.parquet) or `kvscope align`
    written into the run folder; None when there are none. Present but damaged is an error."""
    for base in (run_dir, run_dir.parent):
        if (base / CLASSES_FILE).exists() and (base / STEPS_FILE).exists():
            break
    else:
        return None
    classes_path, steps_path = base / CLASSES_FILE, base / STEPS_FILE
    classes = read_parquet(classes_path)
    require_columns(classes, classes_path, CLASSES_COLUMNS, "kvscope align kernel classes")
    classes = require_numbers(classes, classes_path, ("ops", "time_ms", "share_pct"), "kvscope align kernel classes")
    steps = read_parquet(steps_path)
    require_columns(steps, steps_path, STEPS_COLUMNS, "kvscope align steps")
    steps = require_numbers(steps, steps_path, ("gpu_busy_ms", "gpu_idle_ms"), "kvscope align steps")
    return classes, steps


def _align_sections(rep: Report, classes: pd.DataFrame, steps: pd.DataFrame, model: str) -> None:
    if len(classes):
        shown = classes[list(CLASSES_COLUMNS)].copy()
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


# ---- entry point -------------------------------------------------------------------------------------------------
def is_report_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but files `kvscope report` writes (so a new report may replace it)."""
    return all(p.is_file() and not p.is_symlink() and (p.name == REPORT_FILE or p.suffix == FIGURE_SUFFIX)
               for p in folder.iterdir())


def default_out(source: Path) -> Path:
    """`<source>-report` beside the source (a file's name without its suffix)."""
    named = source if source.name else source.resolve()
    if not named.name:
        raise KvscopeError(f"{source} has no name to derive a report folder from; give --out")
    return named.with_name((named.name if named.is_dir() else named.stem) + "-report")


def make_report(source: Path, out: Path | None) -> Path:
    """Read `source` (a run folder, a `kvscope nsys` folder, or a sweep .csv/.parquet), build the report, and write
    it into `out` (default `default_out(source)`); returns the path of report.md."""
    if not source.exists():
        raise KvscopeError(f"not found: {source}")
    target = out if out is not None else default_out(source)
    folder = AtomicFolder(target, "--out" if out is not None else "report folder", replaceable=is_report_output)
    report = run_report(source) if source.is_dir() else sweep_report(source)
    with folder as tmp:
        report.write(tmp)
    return target / REPORT_FILE
