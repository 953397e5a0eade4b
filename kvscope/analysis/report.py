"""`kvscope report`: a Markdown report with PNG plots, for a run folder or a sweep file.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvscope.errors import KvscopeError
from kvscope.profiler.run import CLASSIC_COLUMNS

MIB_BYTES = 2**20
_SWEEP_PLOTS = (
    ("prefill_ms_per_tok", "prefill latency per prompt token (ms)", "prefill ms per token"),
    ("prefill_tok_s", "prefill throughput (tokens/s)", "prefill tokens/s"),
    ("decode_p50_ms_per_tok", "decode latency per token, median step (ms)", "decode ms per token"),
    ("decode_tok_s", "decode throughput (tokens/s)", "decode tokens/s"),
    ("vram_reserved_mb", "peak reserved GPU memory (MiB)", "VRAM"),
)


def md_table(df: pd.DataFrame, floatfmt: str = "{:,.3f}") -> str:
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return floatfmt.format(v)
        if isinstance(v, int):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _is_pow2(values: pd.Series) -> bool:
    v = values.dropna().astype(int)
    return len(v) > 1 and all(x > 0 and (x & (x - 1)) == 0 for x in v)


def _log2_axis(ax: object, values: pd.Series) -> None:
    """log2 x axis with the data's own values as tick labels."""
    ticks = sorted(int(v) for v in values.dropna().unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _line_plot(df: pd.DataFrame, x: str, y: str, group: str, title: str, ylabel: str, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for key, g in df.groupby(group):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker="o", label=f"{group.replace('_len', '')} {key}")
    if _is_pow2(df[x]):
        _log2_axis(ax, df[x])
    xlabel = "prompt length (tokens)" if x == "seq_len" else "batch size (sequences)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def sweep_report(path: Path, out: Path) -> Path:
    from kvscope.profiler.sweep import read_table

    df = read_table(path)
    if not {"seq_len", "batch"} <= set(df.columns) or not len(df):
        raise KvscopeError(f"{path} is not a kvscope sweep file (no rows with seq_len and batch)")
    ok = df[~df["flag"].fillna("").astype(str).str.contains("oom")]
    model = df["model"].iloc[0] if "model" in df.columns else "?"
    lines = [f"# kvscope sweep: {model}", "", f"Source: `{path}` ({len(df)} configurations, "
             f"{int((df['flag'].fillna('').astype(str) == 'oom').sum())} out of memory).", ""]
    if "device" in df.columns:
        lines += [f"Device: {df['device'].iloc[0]}; dtype {df.get('dtype', pd.Series(['?'])).iloc[0]}.", ""]
    lines += ["## Results", "", md_table(df[[c for c in CLASSIC_COLUMNS if c in df.columns]]), ""]
    axes = [("seq_len", "batch"), ("batch", "seq_len")]
    for x, group in axes:
        if ok[x].nunique() < 2:
            continue
        lines += [f"## Against {'sequence length' if x == 'seq_len' else 'batch size'}", ""]
        for col, ylabel, short in _SWEEP_PLOTS:
            if col not in ok.columns or ok[col].isna().all():
                continue
            name = f"{col}_vs_{x}.png"
            _line_plot(ok, x, col, group, f"{model}: {short} vs {x.replace('_len', ' length')}", ylabel,
                       out / name)
            lines += [f"![{short}]({name})", ""]
    if {"kv_predicted_bytes", "kv_alloc_bytes"} <= set(ok.columns):
        kv = ok[["seq_len", "batch", "kv_predicted_bytes", "kv_alloc_bytes"]].copy()
        kv["alloc_vs_predicted_pct"] = (kv["kv_alloc_bytes"] / kv["kv_predicted_bytes"] - 1) * 100
        lines += ["## KV cache: measured allocation vs prediction", "", md_table(kv, "{:,.4f}"), ""]
        x = "seq_len" if ok["seq_len"].nunique() >= ok["batch"].nunique() else "batch"
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        srt = kv.sort_values([x])
        ax.plot(srt[x], srt["kv_predicted_bytes"] / MIB_BYTES, marker="o", label="predicted (kv-math)")
        ax.plot(srt[x], srt["kv_alloc_bytes"] / MIB_BYTES, marker="x", linestyle="--", label="measured allocation")
        if _is_pow2(srt[x]):
            _log2_axis(ax, srt[x])
        ax.set_xlabel("prompt length (tokens)" if x == "seq_len" else "batch size (sequences)")
        ax.set_ylabel("KV cache (MiB)")
        ax.set_title(f"{model}: KV cache, measured vs predicted")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out / "kv_measured_vs_predicted.png")
        lines += ["![KV cache measured vs predicted](kv_measured_vs_predicted.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_report(run_dir: Path, out: Path) -> Path:
    summary_path = run_dir / "summary.parquet"
    if not summary_path.is_file():
        raise KvscopeError(f"{run_dir} is not a kvscope run folder (no summary.parquet)")
    s = pd.read_parquet(summary_path)
    t = pd.read_parquet(run_dir / "timings.parquet")
    row = s.iloc[0]
    lines = [f"# kvscope run {row['run_id']}", "",
             f"{row['model']} on {row['device']}, {row['dtype']}, attention {row['attn']}, granularity "
             f"{row['granularity']}: batch {row['batch']}, prompt {row['seq_len']}, {row['gen_tokens']} new tokens, "
             f"{row['reps']} repetitions after {row['warmup']} warm-up.", "",
             "## Summary", "", md_table(s[[c for c in CLASSIC_COLUMNS if c in s.columns]]), "",
             md_table(pd.DataFrame([{k: row[k] for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms",
                                                          "tpot_p90_ms", "tpot_p99_ms") if k in row}])), "",
             "## KV cache: measured allocation vs prediction", "",
             md_table(pd.DataFrame([{k: row[k] for k in ("kv_predicted_bytes", "kv_cache_bytes", "kv_alloc_bytes")
                                     if k in row}])), ""]
    layers = t[(t["level"] == "layer") & (t["phase"] == "decode")]
    if len(layers):
        med = layers.groupby("name")["dur_ms"].median()
        order = sorted(med.index, key=lambda n: (not n.startswith("L"), n))
        med = med.reindex(order)
        fig = Figure(figsize=(max(6.4, 0.18 * len(med)), 4.0))
        ax = fig.add_subplot()
        ax.bar(range(len(med)), med.to_numpy())
        ax.set_xticks(range(len(med)), med.index, rotation=90, fontsize=6)
        ax.set_xlabel("region inside a decode step")
        ax.set_ylabel("median CUDA-event time (ms)")
        ax.set_title(f"{row['model']}: decode step by layer")
        _save(fig, out / "decode_layers.png")
        lines += ["## Decode step by layer", "", "![decode step by layer](decode_layers.png)", ""]
    ops = t[(t["level"] == "op") & (t["phase"] == "decode")]
    if len(ops):
        share = ops.groupby("op")["dur_ms"].sum().sort_values(ascending=False)
        df = pd.DataFrame({"op": share.index, "total_ms": share.to_numpy(),
                           "share_pct": share.to_numpy() / share.sum() * 100})
        lines += ["## Decode time by op (CUDA events)", "", md_table(df), ""]
    lines += _align_sections(run_dir, out, str(row["model"]))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _align_sections(run_dir: Path, out: Path, model: str) -> list[str]:
    """Where `kvscope nsys` results sit beside the run (DIR/run/ + DIR/*.parquet) or in it, report them too."""
    for base in (run_dir, run_dir.parent):
        if (base / "kernel_classes.parquet").is_file() and (base / "steps.parquet").is_file():
            break
    else:
        return []
    classes = pd.read_parquet(base / "kernel_classes.parquet")
    steps = pd.read_parquet(base / "steps.parquet")
    lines = ["## Kernel time by class (Nsight Systems)", "",
             md_table(classes[["phase", "kernel_class", "ops", "time_ms", "share_pct"]]), ""]
    dec = steps[steps["phase"] == "decode"].reset_index(drop=True)
    if len(dec):
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        x = range(len(dec))
        ax.bar(x, dec["gpu_busy_ms"], label="GPU busy")
        ax.bar(x, dec["gpu_idle_ms"], bottom=dec["gpu_busy_ms"], label="GPU idle", alpha=0.6)
        ax.set_xlabel("decode step (all repetitions, in order)")
        ax.set_ylabel("ms")
        ax.set_title(f"{model}: GPU busy vs idle per decode step")
        ax.legend(fontsize=8)
        _save(fig, out / "decode_busy_idle.png")
        lines += ["## GPU busy vs idle per decode step", "",
                  f"{int(dec['launch_bound'].sum())} of {len(dec)} decode steps are launch-bound (GPU idle above "
                  "20% of the step's span).", "", "![busy vs idle](decode_busy_idle.png)", ""]
    return lines


def make_report(source: Path, out: Path | None) -> Path:
    if not source.exists():
        raise KvscopeError(f"not found: {source}")
    target = out or (source if source.is_dir() else source.with_suffix("")).with_name(
        (source.name if source.is_dir() else source.stem) + "-report")
    if target.exists() and not target.is_dir():
        raise KvscopeError(f"--out {target} is not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvscopeError(f"cannot write the report into {target}: {exc.strerror or exc}") from None
    if source.is_dir():
        return run_report(source if (source / "summary.parquet").is_file() else source / "run", target)
    return sweep_report(source, target)
