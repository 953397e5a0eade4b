"""The report of a served load (`kvscope report FOLDER` on a `kvscope serve` run folder or serve sweep folder).

A run folder (or a `kvscope nsys -- serve` folder: its run/, and the per-iteration kernel classes beside it, which
then share the GPU time out to the requests): the summary (`kvscope.analysis.serving.summary`, recomputed from the
records), the latency percentiles and their distribution, the memory ledger, prefill interference on decode tokens,
the GPU time of each request (the most and least costly), the timeline of running / waiting requests and KV blocks,
and the "why" sentences (`kvscope.analysis.serving.explain`).

A sweep folder: its rows, TTFT p50/p99, TPOT p99 and goodput against the load per policy with each policy's knee
marked, the interference of every point whose run folder is found, the capacity planner against the measurement when
a plan is given (a `kvscope capacity --out` CSV passed in, or one inside the sweep folder), and the knee sentences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvscope.analysis.report.markdown import FIGURE_SIZE_IN, FIGURE_SUFFIX, Report, md_table
from kvscope.analysis.serving.explain import explain_run, explain_sweep, interference_finding, knee_points, load_axis
from kvscope.analysis.serving.interference import interference, interference_by_prefill
from kvscope.analysis.serving.iterations_nsys import nsys_kernel_classes
from kvscope.analysis.serving.planner import Slo, is_plan_file, planner_vs_measured, read_plan
from kvscope.analysis.serving.records import ServeRun, find_serve_run, read_serve_run, read_serve_sweep
from kvscope.analysis.serving.request_cost import request_gpu_cost
from kvscope.analysis.serving.summary import (
    LATENCY_NAMES,
    LATENCY_PERCENTILES,
    finished,
    in_system,
    itl_samples,
    serve_summary,
)
from kvscope.errors import KvscopeError
from kvscope.schema import MIB_BYTES

COST_ROWS_SHOWN = 5  # requests shown at each end of the GPU-cost ranking
_SUMMARY_GROUPS = (
    ("load and throughput", ("policy", "rps", "concurrency", "offered_rps", "requests", "requests_finished",
                             "requests_cut", "requests_refused", "duration_s", "drain_s", "requests_per_s",
                             "output_tok_s", "total_tok_s")),
    ("goodput", ("slo_ttft_ms", "slo_tpot_ms", "goodput_rps", "goodput_fraction", "goodput_requests")),
    ("Little's law", ("mean_in_system", "mean_time_in_system_s", "little_predicted", "little_ratio", "little_steady_s",
                      "little_steady_ratio")),
    ("scheduler and KV cache", ("mean_running", "mean_waiting", "preemptions", "preemptions_recompute",
                                "preemptions_swap", "kv_blocks_peak", "kv_blocks_total", "kv_slot_use_frac",
                                "kv_fragmentation_frac", "host_p50_ms", "host_p99_ms", "host_share",
                                "gpu_gap_p50_ms", "gpu_gap_p99_ms", "gpu_gap_decode_ratio", "iterations",
                                "iterations_prefill", "iterations_decode", "iterations_mixed")),
)
_SWEEP_TABLE = ("policy", "rps", "concurrency", "offered_rps", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms",
                "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms", "goodput_rps", "goodput_fraction", "little_ratio",
                "preemptions", "folder")
_LATENCY_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL (gaps pooled)", "e2e": "end to end", "queue": "queue"}


def _cell(v: Any) -> str:
    """A summary value as shown: whole numbers with thousands separators, fractions to four significant digits
    without an exponent, missing values blank."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None or math.isnan(v) else "n/a"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def _quantity_table(row: pd.Series, columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({"quantity": [c for c in columns if c in row.index],
                         "value": [_cell(row[c]) for c in columns if c in row.index]})


def _model_line(meta: dict[str, Any]) -> str:
    model = meta.get("model")
    name = (model.get("name") or model.get("spec")) if isinstance(model, dict) else model
    device = meta.get("device")
    device = device.get("name") if isinstance(device, dict) else device
    return f"Model {name or 'not recorded'} on {device or 'a device not recorded'}."


def serve_run_report(source: Path) -> Report:
    """The report of a serve run folder, or of a `kvscope nsys -- serve` folder (its run/ and the per-iteration
    kernel classes beside it); see the module docstring."""
    folder = find_serve_run(source) or source
    run = read_serve_run(folder)
    rep = Report()
    summary = serve_summary(run.requests, run.iterations, run.metadata)
    row = summary.iloc[0]
    load = f"{row['rps']:g} requests/s offered" if math.isfinite(row["rps"]) else (
        f"{row['concurrency']:g} requests in flight" if math.isfinite(row["concurrency"]) else "load not recorded")
    rep.text(f"# kvscope serve run: {row['policy'] or 'policy not recorded'}, {load}",
             f"Source: `{folder}`. {_model_line(run.metadata)} {len(run.requests):,} requests, "
             f"{len(run.iterations):,} iterations.")
    rep.section("Summary", *(f"**{title}**\n\n" + md_table(_quantity_table(row, cols))
                             for title, cols in _SUMMARY_GROUPS))
    _latency_section(rep, run, row)
    if len(run.ledger):
        ledger = run.ledger[["item", "bytes", "note"]].copy()
        ledger.insert(2, "mib", ledger["bytes"] / MIB_BYTES)
        rep.section("Memory ledger", md_table(ledger, formats={"bytes": "{:,.0f}", "mib": "{:,.1f}"}))
    interf = _interference_section(rep, run)
    _cost_section(rep, run, nsys_kernel_classes(folder))
    _timeline_section(rep, run)
    why = explain_run(summary, run.iterations, interf, run.metadata, run.requests)
    rep.section("Why", *_bullets(why))
    return rep


def _bullets(found: pd.DataFrame) -> list[str]:
    said = [f"- {s}" for s in found["sentence"] if s]
    missing = [f"- not said ({f}): {m}" for f, m in zip(found["finding"], found["missing"], strict=True) if m]
    return ["\n".join(said + missing)] if said or missing else ["Nothing to explain."]


def _latency_section(rep: Report, run: ServeRun, row: pd.Series) -> None:
    table = pd.DataFrame([{"quantity": _LATENCY_LABELS[n], **{f"p{q}_ms": row[f"{n}_p{q}_ms"]
                                                              for q in LATENCY_PERCENTILES}, "n": row[f"{n}_n"]}
                          for n in LATENCY_NAMES])
    rep.section("Latency (finished requests)", md_table(table, formats={"n": "{:,.0f}"}),
                "p90 is shown from 10 samples on and p99 from 100; below that they are n/a (blank). TPOT is (e2e - "
                "TTFT) / (generated - 1) for requests of two tokens or more.")
    done = finished(run.requests)
    series = {"TTFT": pd.to_numeric(done["ttft_ms"], errors="coerce"), "ITL": pd.Series(itl_samples(run.requests)),
              "end to end": pd.to_numeric(done["e2e_ms"], errors="coerce")}
    series = {k: np.sort(v.dropna().to_numpy(np.float64)) for k, v in series.items()}
    if not any(len(v) for v in series.values()):
        return
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    for label, v in series.items():
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{label} ({len(v):,})")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("fraction at or below")
    ax.set_title("latency distribution")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    rep.figure(f"serve_latency_cdf{FIGURE_SUFFIX}", fig, "latency distribution")


def _interference_section(rep: Report, run: ServeRun) -> pd.DataFrame | None:
    if not len(run.batches) or not len(run.iterations):
        return None
    interf = interference(run.batches, run.iterations, run.requests, run.metadata)
    binned = interference_by_prefill(run.batches, run.iterations, run.requests, run.metadata)
    ints = {"iterations": "{:,.0f}", "decode_tokens": "{:,.0f}", "itl_n": "{:,.0f}"}
    rep.section("Prefill interference on decode tokens",
                "Each decode token's latency two ways: the duration of the iteration that produced it (`step`) and "
                "its inter-token gap (`itl`). Ratios are with-prefill / decode-only (by bin: over the bin without "
                "prefill).", md_table(interf.drop(columns="policy"), formats=ints),
                md_table(binned.drop(columns=["policy", "bin_lo", "bin_hi"]), formats=ints))
    return interf


def _cost_section(rep: Report, run: ServeRun, kernel_classes: pd.DataFrame | None) -> None:
    if not len(run.batches):
        return
    try:
        cost = request_gpu_cost(run.batches, run.iterations, kernel_classes, run.metadata, run.requests)
    except KvscopeError as exc:
        rep.note(f"no GPU cost per request: {exc}")
        return
    ran = cost[cost["iterations"] > 0].sort_values("gpu_ms", ascending=False)
    if not len(ran):
        return
    shown = ran if len(ran) <= 2 * COST_ROWS_SHOWN else pd.concat([ran.head(COST_ROWS_SHOWN),
                                                                   ran.tail(COST_ROWS_SHOWN)])
    rep.section("GPU time per request",
                f"Each iteration's GPU time shared out to the requests it carried: attention by keys read, the rest by "
                f"tokens (`kvscope.analysis.serving.request_cost`; source `{'`, `'.join(sorted(set(ran['source'])))}`)."
                f" {cost.attrs['assigned_ms']:,.1f} ms assigned over {len(ran):,} requests"
                + (f"; {cost.attrs['unassigned_ms']:,.1f} ms of iterations that carried no request left out"
                   if cost.attrs["unassigned_ms"] else "") + ". The most and the least costly:",
                md_table(shown, formats={"iterations": "{:,.0f}", "generated_tokens": "{:,.0f}"}))


def _timeline_section(rep: Report, run: ServeRun) -> None:
    it = run.iterations
    if not len(it):
        return
    # each iteration's state from its start to the next one's, the last one's to its end
    t = np.append(pd.to_numeric(it["start_s"], errors="coerce").to_numpy(np.float64),
                  pd.to_numeric(it["end_s"], errors="coerce").iloc[-1])

    def values(col: str) -> np.ndarray:
        v = pd.to_numeric(it[col], errors="coerce").to_numpy(np.float64)
        return np.append(v, v[-1])

    fig = Figure(figsize=(FIGURE_SIZE_IN[0] * 1.4, FIGURE_SIZE_IN[1]))
    ax = fig.add_subplot()
    for col in ("running", "waiting"):
        ax.step(t, values(col), where="post", label=col)
    times, counts = in_system(pd.to_numeric(run.requests["arrival_s"], errors="coerce").to_numpy(np.float64),
                              pd.to_numeric(run.requests["finish_s"], errors="coerce").to_numpy(np.float64))
    if len(times):
        ax.step(times, counts, where="post", label="in the system", alpha=0.5, linestyle=":")
    ax.set_xlabel("time since the load's start (s)")
    ax.set_ylabel("requests")
    ax2 = ax.twinx()
    ax2.step(t, values("blocks_used"), where="post", color="gray", alpha=0.6, label="KV blocks used")
    ax2.set_ylabel("KV blocks used")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    ax.set_title("running, waiting and KV blocks over the load")
    rep.section("Timeline")
    rep.figure(f"serve_timeline{FIGURE_SUFFIX}", fig, "timeline")


# ---- a serve sweep ------------------------------------------------------------------------------------------------
def _find_plan(folder: Path, plan: Path | None) -> Path | None:
    if plan is not None:
        return plan
    found = sorted(p for p in folder.glob("*.csv") if is_plan_file(p))
    return found[0] if found else None


def serve_sweep_report(folder: Path, plan: Path | None = None) -> Report:
    """The report of a serve sweep folder (see the module docstring); `plan`: a `kvscope capacity --out` CSV."""
    sweep = read_serve_sweep(folder)
    table = sweep.table
    rep = Report()
    axis = load_axis(table)
    rep.text(f"# kvscope serve sweep: {', '.join(str(p) for p in dict.fromkeys(table['policy']))} over {axis}",
             f"Source: `{folder}` ({len(table)} points, {len(sweep.points)} of them with their run folder). "
             f"{_model_line(sweep.metadata)}")
    rep.section("Results", md_table(table[[c for c in _SWEEP_TABLE if c in table.columns]], "{:,.4g}"))
    knees = knee_points(table)
    _sweep_plots(rep, table, axis, knees)
    interf = _sweep_interference(rep, sweep)
    plan_path = _find_plan(folder, plan)
    if plan_path is not None:
        _planner_section(rep, table, plan_path, interf)
    found = explain_sweep(table)
    lines = _bullets(found) if len(found) else ["No policy with two load points or more: no knee to look for."]
    lines += _interference_sentences(table, interf)
    rep.section("Why", *lines)
    return rep


def _sweep_plots(rep: Report, table: pd.DataFrame, axis: str, knees: pd.DataFrame) -> None:
    pcts = (("p50", "-"), ("p90", "--"), ("p99", ":"))  # p90 / p99 only where enough requests (10 / 100)
    plots = [("ttft", tuple((f"ttft_{p}_ms", p, ls) for p, ls in pcts), "TTFT (ms)"),
             ("tpot", tuple((f"tpot_{p}_ms", p, ls) for p, ls in pcts), "TPOT (ms)"),
             ("goodput", (("goodput_rps", "goodput", "-"), ("requests_per_s", "completed", "--")), "requests/s")]
    made = []
    for name, cols, ylabel in plots:
        cols = tuple(c for c in cols if c[0] in table.columns and pd.to_numeric(table[c[0]], errors="coerce")
                     .notna().any())
        if not cols:
            continue
        fig = Figure(figsize=FIGURE_SIZE_IN)
        ax = fig.add_subplot()
        for i, (policy, g) in enumerate(table.groupby("policy", sort=False)):
            g = g.sort_values(axis)
            color = f"C{i}"
            for col, label, style in cols:
                ax.plot(g[axis], pd.to_numeric(g[col], errors="coerce"), marker="o", linestyle=style, color=color,
                        label=f"{policy} {label}")
            knee = knees[knees["policy"] == policy]
            if len(knee) and math.isfinite(float(knee["next_x"].iloc[0])):
                ax.axvline(float(knee["knee_x"].iloc[0]), color=color, alpha=0.4, linestyle="-.",
                           label=f"{policy} knee")
        if name == "goodput" and axis == "rps":
            xs = pd.to_numeric(table[axis], errors="coerce").dropna()
            ax.plot([xs.min(), xs.max()], [xs.min(), xs.max()], color="gray", alpha=0.4, label="offered")
        ax.set_xlabel("offered requests/s" if axis == "rps" else "requests in flight")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} against the load")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        made.append((f"serve_{name}_vs_{axis}{FIGURE_SUFFIX}", fig, name))
    if made:
        rep.section("Against the load", "A dash-dotted line marks each policy's knee (the last point whose TTFT "
                                        "stays within 2x of the lightest load's).")
        for fname, fig, alt in made:
            rep.figure(fname, fig, alt)


def _sweep_interference(rep: Report, sweep: Any) -> pd.DataFrame | None:
    frames = []
    for i, path in sorted(sweep.points.items()):
        try:
            run = read_serve_run(path)
        except KvscopeError as exc:
            rep.note(f"point {i + 1} ({path.name}) left out of the interference: {exc}")
            continue
        if not len(run.batches):
            continue
        df = interference(run.batches, run.iterations, run.requests, run.metadata)
        df.insert(1, "rps", sweep.table["rps"].iloc[i])
        df.insert(2, "concurrency", sweep.table["concurrency"].iloc[i])
        frames.append(df)
    if not frames:
        rep.note("no point's run folder was found beside the sweep file: no interference per policy")
        return None
    interf = pd.concat(frames, ignore_index=True)
    rep.section("Prefill interference per policy",
                "Per point, decode tokens of decode-only iterations against those of iterations with prefill tokens "
                "(`step`: the iteration's duration; `itl`: the token's inter-token gap); ratios with-prefill / "
                "decode-only.", md_table(interf, "{:,.4g}", formats={"decode_tokens": "{:,.0f}", "itl_n": "{:,.0f}"}))
    return interf


def _interference_sentences(table: pd.DataFrame, interf: pd.DataFrame | None) -> list[str]:
    """Per policy, the interference finding at its heaviest point with a run folder."""
    if interf is None:
        return []
    axis = load_axis(table)
    out = []
    for policy, g in interf.groupby("policy", sort=False):
        heaviest = g[g[axis] == g[axis].max()]
        rows = table[(table["policy"] == policy) & (table[axis] == heaviest[axis].iloc[0])]
        f = interference_finding(heaviest.drop(columns=["rps", "concurrency"]), rows.iloc[0].to_dict())
        out.append(f"- {policy} at {axis} {heaviest[axis].iloc[0]:g}: {f.sentence or 'not said: ' + f.missing}")
    return ["\n".join(out)] if out else []


def _planner_section(rep: Report, table: pd.DataFrame, plan_path: Path, interf: pd.DataFrame | None) -> None:
    slo = [pd.to_numeric(table[c], errors="coerce").dropna() if c in table.columns else pd.Series(dtype=float)
           for c in ("slo_ttft_ms", "slo_tpot_ms")]
    if not all(len(s) for s in slo):
        rep.note(f"a capacity plan ({plan_path}) is given but the sweep records no TTFT and TPOT SLO: no planner vs "
                 "measured")
        return
    plan = read_plan(plan_path)
    found = planner_vs_measured(plan, table, Slo(float(slo[0].iloc[0]), float(slo[1].iloc[0])), interf)
    rep.section("Capacity planner vs measured",
                f"Plan: `{plan_path}`. The planner's sustainable rate beside the highest measured rate whose goodput "
                "fraction is at least 0.9 and the rate where it crosses 0.9 (interpolated).",
                md_table(found.drop(columns=["why"]), "{:,.4g}"),
                "\n".join(f"- {p}: {w}" for p, w in zip(found["policy"], found["why"], strict=True)))
