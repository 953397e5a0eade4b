"""The report of a sweep file (`kvscope report seq.csv`): its results table, the spread of TTFT and TPOT, one plot
per metric against sequence length and against batch size, and the KV cache's measured allocation against kv-math's
prediction.

The file is read and checked by `kvscope.analysis.sweep_file` (the reader of `kvscope sweep --resume` and `kvscope
capacity` too): a number column holding text, an infinity or a negative value, or the rows of two models, is refused
in one line, never shown; a file of two engines' sweeps of one model is drawn an engine apart. Configurations that
ran out of memory are left out of the plots.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kvscope.analysis.align.attribution import LAUNCH_BOUND_IDLE_PCT
from kvscope.analysis.explain import (
    SweepGroup,
    bool_column,
    class_ms,
    column,
    engines,
    explain,
    first_of,
    not_oom,
    sweep_groups,
)
from kvscope.analysis.report.markdown import FIGURE_SIZE_IN, FIGURE_SUFFIX, Report, md_table, percent_change
from kvscope.analysis.sweep_file import read_sweep
from kvscope.errors import KvscopeError
from kvscope.schema import (
    ATTRIBUTION_CLASS_WORDS,
    ATTRIBUTION_COLUMNS,
    BYTES_PER_GB,
    CLASSIC_COLUMNS,
    MIB_BYTES,
    is_oom,
)

_SWEEP_PLOTS = (
    ("prefill_ms_per_tok", "prefill latency per prompt token (ms)", "prefill ms per token"),
    ("prefill_tok_s", "prefill throughput (tokens/s)", "prefill tokens/s"),
    ("decode_p50_ms_per_tok", "decode latency per token, median step (ms)", "decode ms per token"),
    ("decode_tok_s", "decode throughput (tokens/s)", "decode tokens/s"),
    ("vram_reserved_mb", "peak reserved GPU memory (MiB)", "VRAM"),
)
_SWEEP_AXES = (("seq_len", "batch"), ("batch", "seq_len"))  # (x axis, one line per value of)
_KV_COLUMNS = ("kv_predicted_bytes", "kv_alloc_bytes")
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
    eng = engines(df)
    several = eng.nunique() > 1  # a file with several engines: a line per (engine, group value)
    for (engine, key), g in df.groupby([eng, group], sort=True):
        g = g.sort_values(x)
        label = f"{group.replace('_len', '')} {key}" + (f" ({engine})" if several else "")
        ax.plot(g[x], g[y], marker="o", label=label)
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


def sweep_report(path: Path, compare: Path | None = None) -> Report:
    """The report of a sweep file; with `compare`, a second sweep file side by side (see `compare_section`)."""
    df = read_sweep(path)
    rep = Report()
    if "flag" in df.columns:
        oom = df["flag"].map(is_oom).to_numpy(bool)
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
    rep.section("Results", md_table(df[[c for c in (*CLASSIC_COLUMNS, "engine") if c in df.columns]]))
    if set(_SWEEP_SPREAD_COLUMNS) <= set(df.columns):
        rep.section("Spread of TTFT (host clock) and TPOT",
                    md_table(df[list(_SWEEP_SPREAD_COLUMNS)],
                             formats={"ttft_samples": "{:,.0f}", "tpot_samples": "{:,.0f}"}),
                    "spread_flag names the quantities whose interquartile range exceeds a tenth of the median "
                    "(host-bound).")
    for x, group in _SWEEP_AXES:
        _sweep_axis_section(rep, ok, x, group, model)
    _sweep_kv_section(rep, ok, model)
    attribution_sections(rep, df, model)
    if compare is not None:
        compare_section(rep, path, df, compare, model)
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


# ---- attribution (`kvscope sweep --nsys`): time by kernel class, idle share, roofline, prefill; the "why" ------------
CLASS_COLORS = {"gemm": "#4C72B0", "attention": "#DD8452", "norm": "#55A868", "elementwise": "#C44E52",
                "copy": "#8172B3", "communication": "#937860", "other": "#8C8C8C"}
_IDLE_COLUMNS = (("decode_idle_pct", "decode step"), ("prefill_idle_pct", "prefill"))


def _figure_name(base: str, g: SweepGroup, groups: list[SweepGroup]) -> str:
    """`base`, with the fixed key when its axis has several groups, and the engine when the file has several."""
    name = base
    other = "batch" if g.axis == "seq_len" else "seq"
    if sum(h.axis == g.axis and h.engine == g.engine for h in groups) > 1:
        name += f"_{other}{g.fixed}"
    if len({h.engine for h in groups}) > 1:
        name += f"_{g.engine}"
    return name + FIGURE_SUFFIX


def _categorical_x(ax: Axes, g: SweepGroup) -> np.ndarray:
    x = g.rows[g.axis].to_numpy()
    pos = np.arange(len(x))
    ax.set_xticks(pos, [f"{int(v):,}" for v in x], rotation=45 if len(x) > 6 else 0, fontsize=8)
    ax.set_xlabel(_axis_label(g.axis))
    return pos


def class_bars(g: SweepGroup, phase: str, model: str) -> Figure | None:
    """Stacked bars of the phase's GPU time by kernel class (ms) at every point of the group; None without data."""
    classes = class_ms(g.rows, phase)
    if not classes or not any(np.isfinite(v).any() for v in classes.values()):
        return None
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    pos = _categorical_x(ax, g)
    bottom = np.zeros(len(pos))
    for cls, v in classes.items():
        h = np.nan_to_num(v, nan=0.0)
        ax.bar(pos, h, bottom=bottom, label=cls, color=CLASS_COLORS.get(cls))
        bottom += h
    what = "decode step" if phase == "decode" else "prefill"
    ax.set_ylabel(f"GPU time per {what} by kernel class (ms)")
    ax.set_title(f"{model}: {what} by kernel class, {g.label}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def idle_plot(g: SweepGroup, model: str) -> Figure | None:
    lines = [(c, label, column(g.rows, c)) for c, label in _IDLE_COLUMNS]
    lines = [(c, label, v) for c, label, v in lines if v is not None and np.isfinite(v).any()]
    if not lines:
        return None
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    x = g.rows[g.axis].to_numpy()
    for _, label, v in lines:
        ax.plot(x, v, marker="o", label=label)
    if _is_pow2(g.rows[g.axis]):
        _log2_axis(ax, g.rows[g.axis])
    ax.axhline(LAUNCH_BOUND_IDLE_PCT, color="grey", linestyle=":", label=f"launch-bound ({LAUNCH_BOUND_IDLE_PCT:g}%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel(_axis_label(g.axis))
    ax.set_ylabel("GPU idle share of the span (%)")
    ax.set_title(f"{model}: GPU idle share, {g.label}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def prefill_plot(g: SweepGroup, model: str) -> Figure | None:
    """Prefill GPU span (else the timed prefill) against prompt tokens, launch-bound points shaded; drawn for a
    sweep with attribution columns (the shading is its point)."""
    found = first_of(g.rows, "prefill_span_ms", "prefill_p50_ms")
    if found is None or g.axis != "seq_len" or "prefill_launch_bound" not in g.rows.columns:
        return None
    col, t = found
    x = g.rows["seq_len"].to_numpy(np.float64)
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    ax.plot(x, t, marker="o", label=col)
    lb = bool_column(g.rows, "prefill_launch_bound")
    if lb is not None:
        edges = np.concatenate([[x[0] / 1.5], np.sqrt(x[1:] * x[:-1]), [x[-1] * 1.5]])
        first = True
        for i in np.flatnonzero(lb == 1.0):
            ax.axvspan(edges[i], edges[i + 1], color="orange", alpha=0.2, linewidth=0,
                       label="launch-bound (GPU idle >= " f"{LAUNCH_BOUND_IDLE_PCT:g}%)" if first else None)
            first = False
    if _is_pow2(g.rows["seq_len"]):
        _log2_axis(ax, g.rows["seq_len"])
    else:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(_axis_label("seq_len"))
    ax.set_ylabel("prefill time (ms)")
    ax.set_title(f"{model}: prefill time vs prompt tokens, {g.label}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def roofline_plot(ok: pd.DataFrame, model: str) -> Figure | None:
    """Every point of the file: decode bytes per step vs achieved GB/s (copy bandwidth as the ceiling), prefill
    arithmetic intensity vs achieved TFLOP/s (matmul rate and copy bandwidth as the roofs)."""
    dec_b, dec_r = column(ok, "decode_bytes"), column(ok, "decode_span_gb_s")
    pre_f, pre_b, pre_r = column(ok, "prefill_flops"), column(ok, "prefill_bytes"), column(ok, "prefill_span_tflop_s")
    has_dec = dec_b is not None and dec_r is not None and np.isfinite(dec_b * dec_r).any()
    has_pre = pre_f is not None and pre_b is not None and pre_r is not None and np.isfinite(pre_f * pre_b * pre_r).any()
    if not (has_dec or has_pre):
        return None
    fig = Figure(figsize=(FIGURE_SIZE_IN[0] * 1.8, FIGURE_SIZE_IN[1]))
    eng = engines(ok).to_numpy()
    copy = _median_ratio(ok, "decode_span_gb_s", "decode_mbu_pct")
    if has_dec:
        ax = fig.add_subplot(1, 2, 1)
        for e in dict.fromkeys(eng):
            m = eng == e
            ax.scatter(dec_b[m] / BYTES_PER_GB, dec_r[m], label=f"{e} decode steps", s=18)
        if copy is not None:
            ax.axhline(copy, color="grey", linestyle="--", label=f"calibrated copy {copy:,.0f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per decode step (GB: weights + KV read)")
        ax.set_ylabel("achieved GB/s (bytes / GPU span)")
        ax.set_title(f"{model}: decode bandwidth", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if has_pre:
        ax = fig.add_subplot(1, 2, 2)
        ai = pre_f / pre_b
        for e in dict.fromkeys(eng):
            m = eng == e
            ax.scatter(ai[m], pre_r[m], label=f"{e} prefills", s=18, marker="s")
        peak = _median_ratio(ok, "prefill_span_tflop_s", "prefill_mfu_pct")
        fin = ai[np.isfinite(ai)]
        if peak is not None and copy is not None and len(fin):
            xs = np.geomspace(fin.min() / 2, fin.max() * 2, 64)
            ax.plot(xs, np.minimum(peak, copy * xs / 1e3), color="grey", linestyle="--",
                    label=f"roofs: {peak:,.0f} TFLOP/s, {copy:,.0f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per byte)")
        ax.set_ylabel("achieved TFLOP/s (FLOPs / GPU span)")
        ax.set_title(f"{model}: prefill compute", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _median_ratio(ok: pd.DataFrame, rate: str, pct: str) -> float | None:
    """The calibrated ceiling behind a rate and its share in percent: median of rate / pct * 100."""
    r, p = column(ok, rate), column(ok, pct)
    if r is None or p is None:
        return None
    v = r / p * 100
    v = v[np.isfinite(v) & (p > 0)]
    return float(np.median(v)) if len(v) else None


def attribution_sections(rep: Report, df: pd.DataFrame, model: str) -> None:
    """The kernel-class, idle, prefill and roofline plots, then the "why" section."""
    ok = not_oom(df)
    groups = sweep_groups(df)
    figures: list[tuple[str, Figure, str]] = []
    for g in groups:
        for phase in ("decode", "prefill") if g.axis == "seq_len" else ("decode",):
            fig = class_bars(g, phase, model)
            if fig is not None:
                figures.append((_figure_name(f"{phase}_classes_vs_{g.axis}", g, groups), fig,
                                f"{phase} time by kernel class, {g.label}"))
        fig = idle_plot(g, model)
        if fig is not None:
            figures.append((_figure_name(f"idle_vs_{g.axis}", g, groups), fig, f"GPU idle share, {g.label}"))
        fig = prefill_plot(g, model)
        if fig is not None:
            figures.append((_figure_name("prefill_vs_tokens", g, groups), fig, f"prefill time, {g.label}"))
    roof = roofline_plot(ok, model)
    if roof is not None:
        figures.append((f"roofline{FIGURE_SUFFIX}", roof, "roofline of every point"))
    if figures:
        rep.section("Where the GPU time goes",
                    "Decode and prefill GPU time by kernel class, the GPU's idle share of each phase's span, prefill "
                    "time against prompt length with the launch-bound points shaded, and every point on the "
                    "roofline.")
        for name, fig, alt in figures:
            rep.figure(name, fig, alt)
    why_section(rep, df)


def why_section(rep: Report, df: pd.DataFrame) -> None:
    """The findings of kvscope.analysis.explain, as bullets per group; what could not be said, and why."""
    found = explain(df)
    head = ["Every sentence is computed from the file's numbers (kvscope.analysis.explain); where a sentence lacks its "
            "data, what it lacks is listed instead."]
    if not any(c in df.columns for c in ATTRIBUTION_COLUMNS):
        head.append("The file has no attribution columns (time by kernel class, idle share, bytes: `kvscope sweep "
                    "--nsys`): no kernel-class, idle-share or roofline plots, and only the sentences that need none "
                    "of them.")
    if not len(found):
        head.append("No seq sweep (two prompt lengths or more at one batch) or batch sweep (two batch sizes or more "
                    "at one prompt length) in the file: nothing to explain.")
    lines = []
    for (engine, axis, fixed), g in found.groupby(["engine", "axis", "fixed"], sort=False):
        label = SweepGroup(str(engine), str(axis), int(fixed), pd.DataFrame()).label
        said = [f"- {s}" for s in g["sentence"] if s]
        missing = [f"- not said ({f}): {m}" for f, m in zip(g["finding"], g["missing"], strict=True) if m]
        lines.append(f"### {label[0].upper()}{label[1:]}\n\n" + "\n".join(said + missing))
    rep.section("Why", *head, *lines)


# ---- two sweeps side by side (`kvscope report A.csv --compare B.csv`) ---------------------------------------------
def _labels(a: pd.DataFrame, b: pd.DataFrame, a_path: Path, b_path: Path) -> tuple[str, str]:
    """What the two sweeps are called: their engines when those differ, else their file names."""
    ea, eb = (sorted(set(engines(d))) for d in (a, b))
    la = ea[0] if len(ea) == 1 else a_path.stem
    lb = eb[0] if len(eb) == 1 else b_path.stem
    if la == lb:
        la, lb = a_path.name, b_path.name
    if la == lb:
        la, lb = f"A ({a_path})", f"B ({b_path})"
    return la, lb


def _check_comparable(a: pd.DataFrame, b: pd.DataFrame, a_path: Path, b_path: Path) -> None:
    for col in ("model_arch", "model", "dtype"):
        va, vb = (sorted({str(v) for v in d[col].dropna()}) if col in d.columns else [] for d in (a, b))
        if va and vb:
            if va != vb:
                raise KvscopeError(f"cannot compare {a_path} with {b_path}: their {col} differ ({', '.join(va)} vs "
                                   f"{', '.join(vb)})")
            return


def compare_frame(a: pd.DataFrame, b: pd.DataFrame, la: str, lb: str) -> pd.DataFrame:
    """Point by point (seq_len, batch) in both files and out of memory in neither: step time and its ratio, idle
    share, kernels per step, and where the second loses most time against the first (the kernel class or the
    idle time that grew most, in ms per step)."""
    keys = ["seq_len", "batch"]
    cols = ["decode_p50_ms_per_tok", "decode_idle_pct", "decode_kernels", "decode_span_ms", "decode_busy_ms",
            *(f"decode_{c}_ms" for c in ATTRIBUTION_CLASS_WORDS)]
    frames = []
    for d in (a, b):
        d = not_oom(d).drop_duplicates(subset=keys)
        f = d[keys].copy()
        for c in cols:
            v = column(d, c)
            f[c] = v if v is not None else np.nan
        frames.append(f)
    m = frames[0].merge(frames[1], on=keys, suffixes=("_a", "_b")).sort_values(keys)
    out = m[keys].copy()
    out[f"step_ms {la}"] = m["decode_p50_ms_per_tok_a"]
    out[f"step_ms {lb}"] = m["decode_p50_ms_per_tok_b"]
    ratio = m["decode_p50_ms_per_tok_b"] / m["decode_p50_ms_per_tok_a"]
    out[f"{lb} / {la}"] = ratio.where(m["decode_p50_ms_per_tok_a"] > 0)
    for c, short in (("decode_idle_pct", "idle %"), ("decode_kernels", "kernels/step")):
        out[f"{short} {la}"] = m[f"{c}_a"]
        out[f"{short} {lb}"] = m[f"{c}_b"]
    out[f"{la} loses most"] = [_loses_most(r, "a", "b") for _, r in m.iterrows()]
    out[f"{lb} loses most"] = [_loses_most(r, "b", "a") for _, r in m.iterrows()]
    return out.reset_index(drop=True)


def _loses_most(r: pd.Series, mine: str, theirs: str) -> str:
    """The class (or idle time) in which sweep `mine` spends the most ms per decode step more than sweep `theirs`."""
    diffs = {c: r[f"decode_{c}_ms_{mine}"] - r[f"decode_{c}_ms_{theirs}"] for c in ATTRIBUTION_CLASS_WORDS}
    diffs["idle"] = ((r[f"decode_span_ms_{mine}"] - r[f"decode_busy_ms_{mine}"])
                     - (r[f"decode_span_ms_{theirs}"] - r[f"decode_busy_ms_{theirs}"]))
    diffs = {k: float(v) for k, v in diffs.items() if pd.notna(v)}
    if not diffs:
        return "n/a (no attribution columns)"
    k = max(diffs, key=lambda c: diffs[c])
    return f"{k} {diffs[k]:+,.3f} ms" if diffs[k] > 0 else f"nothing (largest change {k} {diffs[k]:+,.3f} ms)"


def class_compare_frame(a: pd.DataFrame, b: pd.DataFrame, la: str, lb: str) -> pd.DataFrame:
    """Decode GPU time by kernel class, ms per step, of both sweeps at each common point (long form)."""
    keys = ["seq_len", "batch"]
    rows = []
    fa, fb = (not_oom(d).drop_duplicates(subset=keys).set_index(keys) for d in (a, b))
    for key in sorted(set(fa.index) & set(fb.index)):
        for c in (*ATTRIBUTION_CLASS_WORDS, "idle"):
            va, vb = (_class_or_idle(f, key, c) for f in (fa, fb))
            if pd.notna(va) or pd.notna(vb):
                rows.append((*key, c, va, vb, vb - va))
    return pd.DataFrame(rows, columns=[*keys, "class", f"ms {la}", f"ms {lb}", f"{lb} - {la} ms"])


def _class_or_idle(f: pd.DataFrame, key: tuple[int, int], c: str) -> float:
    if c == "idle":
        span, busy = (column(f.loc[[key]], x) for x in ("decode_span_ms", "decode_busy_ms"))
        return float(span[0] - busy[0]) if span is not None and busy is not None else math.nan
    v = column(f.loc[[key]], f"decode_{c}_ms")
    return float(v[0]) if v is not None else math.nan


def compare_section(rep: Report, a_path: Path, a: pd.DataFrame, b_path: Path, model: str) -> None:
    """The side-by-side section of two sweep files: one-line errors when they cannot be compared."""
    b = read_sweep(b_path)
    _check_comparable(a, b, a_path, b_path)
    la, lb = _labels(a, b, a_path, b_path)
    table = compare_frame(a, b, la, lb)
    if not len(table):
        raise KvscopeError(f"cannot compare {a_path} with {b_path}: no (seq_len, batch) point in common (out-of-memory "
                           "points left out)")
    rep.section(f"Side by side: {la} vs {lb}",
                f"Points in both `{a_path}` and `{b_path}`: the median decode step and its ratio, the GPU idle share "
                f"of the step's span, kernels per step, and for each the kernel class (or idle time) in which its step "
                "spends the most time more than the other's.",
                md_table(table, formats={f"{lb} / {la}": "{:,.2f}", f"idle % {la}": "{:,.1f}",
                                         f"idle % {lb}": "{:,.1f}", f"kernels/step {la}": "{:,.0f}",
                                         f"kernels/step {lb}": "{:,.0f}"}))
    classes = class_compare_frame(a, b, la, lb)
    if len(classes):
        rep.text("Decode GPU time by kernel class (ms per step):", md_table(classes))
    else:
        rep.note("the compared files have no attribution columns: no time by kernel class side by side")
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    pos = np.arange(len(table))
    ax.plot(pos, table[f"step_ms {la}"], marker="o", label=la)
    ax.plot(pos, table[f"step_ms {lb}"], marker="s", label=lb)
    ax.set_xticks(pos, [f"{s:,}x{bb}" for s, bb in zip(table["seq_len"], table["batch"], strict=True)],
                  rotation=45, fontsize=7)
    ax.set_xlabel("point (prompt tokens x batch)")
    ax.set_ylabel("median decode step (ms)")
    ax.set_title(f"{model}: decode step, {la} vs {lb}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    rep.figure(f"compare_step_time{FIGURE_SUFFIX}", fig, f"decode step {la} vs {lb}")
