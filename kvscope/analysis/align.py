"""Line projected NVTX ranges up with a run's CUDA-event timings, and say where the time goes.

Region names are the contract (docs/architecture.md): `run bs=.. seq=.. gen=..`, `rep N`, `prefill`, `decode`,
`decode step N`, `L07`, `L07.qkv`, `embed`, `lm_head`, `sample`, in the NVTX domain `kvscope`. Every range gets
the keys of the enclosing ones (run, rep, phase, step, layer, op), so it joins `timings.parquet` on
(run, rep, step, name).

Functions return DataFrames:
- `label_ranges`: the projection plus keys, kvscope ranges only.
- `label_kernels`: every GPU operation with its innermost kvscope range's keys and its kernel class.
- `align_regions`: per timed region, CUDA-event ms against projected GPU span, kernel busy time, kernel count.
- `step_activity`: per prefill and decode step, GPU busy vs idle within the step's span, and launch-bound or not.
- `class_breakdown`: per phase, kernel time by kernel class.

Ratios and percentages are NaN (never infinite) where their denominator is not positive: a zero-length GPU span, a
zero CUDA-event time, a phase whose kernels sum to zero time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis.kernel_classes import classify
from kvscope.analysis.nsys import NsysExport
from kvscope.analysis.projection import Projection
from kvscope.analysis.schema import GRAPH_CLOCK, NAME_PATTERNS, NS_PER_MS, NVTX_DOMAIN
from kvscope.errors import KvscopeError

# a step is launch-bound when its GPU is idle for more than this share of the step's GPU span: the kernels wait for
# the host to launch them rather than for memory or math
LAUNCH_BOUND_IDLE_FRACTION = 0.2
KVSCOPE_DOMAIN = NVTX_DOMAIN
_KIND_PATTERNS = NAME_PATTERNS
_KEYS = ("run", "rep", "phase", "step", "layer", "op")


def ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    """num / den, NaN (NA for nullable columns) where den is not positive or missing: never inf."""
    return (num / den).where(den > 0)


def label_ranges(proj: Projection) -> pd.DataFrame:
    """kvscope ranges with their level name (`kind`) and the keys inherited from enclosing ranges."""
    r = proj.ranges
    r = r.loc[r["domain"] == KVSCOPE_DOMAIN].copy()
    names = r["name"].fillna("")
    kind = pd.Series(pd.NA, index=r.index, dtype="string")
    own = {k: pd.Series(pd.NA, index=r.index, dtype="object") for k in _KEYS}
    for k, pat in _KIND_PATTERNS:
        m = names.str.extract(pat)
        hit = m.notna().any(axis=1) & kind.isna()
        kind[hit] = k
        if k == "run":
            own["run"][hit] = names[hit]
        elif k == "rep":
            own["rep"][hit] = m.loc[hit, 0].astype(int)
        elif k == "phase":
            own["phase"][hit] = m.loc[hit, 0]
            own["step"][hit & (m[0] == "prefill")] = 0
        elif k == "step":
            own["phase"][hit] = "decode"
            own["step"][hit] = m.loc[hit, 0].astype(int)
        elif k == "op":
            own["layer"][hit] = m.loc[hit, 0].astype(int)
            own["op"][hit] = m.loc[hit, 1]
        elif k == "layer":
            numbered = hit & m[0].notna()
            own["layer"][numbered] = m.loc[numbered, 0].astype(int)
    r["kind"] = kind
    # inherit keys from the parent, level by level (outer ranges first)
    r = r.sort_values(["level", "start_ns"], kind="stable")
    values = {k: own[k].reindex(r.index) for k in _KEYS}
    pos = pd.Series(np.arange(len(r)), index=r["range_id"].to_numpy())
    parent_pos = r["parent_id"].map(pos)
    for lvl in sorted(r["level"].unique()):
        at = np.flatnonzero((r["level"] == lvl).to_numpy() & parent_pos.notna().to_numpy())
        if not len(at):
            continue
        ppos = parent_pos.iloc[at].astype(int).to_numpy()
        for k in _KEYS:
            col = values[k].to_numpy(dtype=object, copy=True)
            mine = col[at]
            fill = pd.isna(mine)
            col[at[fill]] = col[ppos[fill]]
            values[k] = pd.Series(col, index=r.index)
    for k in _KEYS:
        r[k] = values[k].to_numpy()
    for k in ("rep", "step", "layer"):
        r[k] = pd.array(r[k].to_numpy(), dtype="Int64")
    for k in ("run", "phase", "op"):
        r[k] = r[k].astype("string")
    return r.sort_values("start_ns", kind="stable").reset_index(drop=True)


def label_kernels(exp: NsysExport, proj: Projection, labeled: pd.DataFrame) -> pd.DataFrame:
    """Every GPU operation, its innermost kvscope range and that range's keys, its class and duration."""
    ops = exp.gpu_ops
    k = pd.DataFrame({
        "kind": ops["kind"], "name": ops["name"], "start_ns": ops["start_ns"], "end_ns": ops["end_ns"],
        "dur_ns": ops["end_ns"] - ops["start_ns"], "device": ops["device"], "stream": ops["stream"],
        "pid": ops["pid"], "corr": ops["corr"], "graph_node_id": ops["graph_node_id"],
        "range_id": pd.array(np.where(proj.op_range >= 0, proj.op_range, 0), dtype="Int64"),
    })
    k.loc[proj.op_range < 0, "range_id"] = pd.NA
    k["kernel_class"] = classify(ops["kind"], ops["name"])
    keys = labeled[["range_id", "name", "kind", *_KEYS]].rename(columns={"name": "range_name", "kind": "range_kind"})
    k = k.merge(keys, on="range_id", how="left")
    return k


def align_regions(labeled: pd.DataFrame, timings: pd.DataFrame | None) -> pd.DataFrame:
    """Per kvscope range: projected GPU span, busy time and op count; with timings, the CUDA-event duration of the
    same region and the differences. Raises KvscopeError when the timings do not belong to the export."""
    r = labeled
    out = pd.DataFrame({
        "range_id": r["range_id"], "name": r["name"], "kind": r["kind"], "run": r["run"], "rep": r["rep"],
        "phase": r["phase"], "step": r["step"], "layer": r["layer"], "op": r["op"], "level": r["level"],
        "cpu_ms": (r["end_ns"] - r["start_ns"]) / NS_PER_MS,
        "gpu_start_ns": r["gpu_start_ns"], "gpu_end_ns": r["gpu_end_ns"],
        "gpu_span_ms": (r["gpu_end_ns"] - r["gpu_start_ns"]).astype("Float64") / NS_PER_MS,
        "gpu_busy_ms": r["gpu_busy_ns"] / NS_PER_MS,
        "gpu_ops": r["gpu_ops"], "kernels": r["gpu_op_rows"],
    })
    if timings is None or not len(timings):
        out["event_ms"] = np.nan
    else:
        out = _join_timings(out, timings)
    out["span_minus_event_ms"] = out["gpu_span_ms"] - out["event_ms"]
    out["busy_minus_event_ms"] = out["gpu_busy_ms"] - out["event_ms"]
    out["span_vs_event_pct"] = ratio(out["span_minus_event_ms"], out["event_ms"]) * 100
    return out


def _join_timings(out: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    # regions timed by event nodes inside a CUDA graph have no NVTX range (their kernels fall in the replay's)
    t = timings[timings["clock"] != GRAPH_CLOCK].copy() if "clock" in timings else timings.copy()
    t["run"] = ("run bs=" + t["batch"].astype(str) + " seq=" + t["seq_len"].astype(str) + " gen="
                + t["gen_tokens"].astype(str))
    # run and rep rows carry no step; the decode phase row carries no step either
    for df in (t, out):
        df["_rep"] = df["rep"].fillna(-1).astype("int64")
        df["_step"] = df["step"].fillna(-1).astype("int64")
        df["_run"] = df["run"].fillna("").astype(str)
        df["_name"] = df["name"].fillna("").astype(str)
    key = ["_run", "_rep", "_step", "_name"]
    dup = out.duplicated(key, keep=False) & out["kind"].notna()
    if dup.any():
        example = out.loc[dup, "name"].iloc[0]
        raise KvscopeError(f"export holds several ranges named {example!r} for the same run, rep and step: "
                           "cannot match them to one timings row")
    ev = t[[*key, "dur_ms", "start_ms", "host_enqueue_ms"]].rename(
        columns={"dur_ms": "event_ms", "start_ms": "event_start_ms"})
    merged = out.merge(ev, on=key, how="left", indicator=True)
    unmatched = t.merge(out[key], on=key, how="left", indicator=True)
    missing = unmatched["_merge"] == "left_only"
    if missing.any():
        first = unmatched.loc[missing].iloc[0]
        raise KvscopeError(f"timings do not match the export: {int(missing.sum())} of {len(t)} timed regions have "
                           f"no NVTX range (first: {first['name']!r}, rep {first['_rep']}, in {first['run']!r})")
    timed_kinds = set(t["level"].dropna().astype(str))
    untimed = (merged["_merge"] == "left_only") & merged["kind"].isin(timed_kinds)
    if untimed.any():
        first = merged.loc[untimed].iloc[0]
        raise KvscopeError(f"timings do not match the export: {int(untimed.sum())} NVTX ranges of timed levels have "
                           f"no timings row (first: {first['name']!r}, rep {first['_rep']})")
    merged = merged.drop(columns=["_merge", *key])
    return merged


def step_activity(labeled: pd.DataFrame) -> pd.DataFrame:
    """Per prefill and decode step: GPU span, busy time, idle share of the span, host (CPU range) time, and
    whether it is launch-bound (idle share above LAUNCH_BOUND_IDLE_FRACTION)."""
    r = labeled
    steps = r[(r["kind"] == "step") | ((r["kind"] == "phase") & (r["phase"] == "prefill"))]
    span = (steps["gpu_end_ns"] - steps["gpu_start_ns"]).astype("Float64")
    idle = 1 - ratio(steps["gpu_busy_ns"], span)
    out = pd.DataFrame({
        "run": steps["run"], "rep": steps["rep"], "phase": steps["phase"], "step": steps["step"],
        "name": steps["name"], "cpu_ms": (steps["end_ns"] - steps["start_ns"]) / NS_PER_MS,
        "gpu_span_ms": span / NS_PER_MS, "gpu_busy_ms": steps["gpu_busy_ns"] / NS_PER_MS,
        "gpu_idle_ms": (span - steps["gpu_busy_ns"]) / NS_PER_MS, "gpu_idle_fraction": idle,
        "gpu_ops": steps["gpu_ops"], "kernels": steps["gpu_op_rows"],
    })
    out["launch_bound"] = out["gpu_idle_fraction"] > LAUNCH_BOUND_IDLE_FRACTION
    return out.reset_index(drop=True)


def class_breakdown(kernels: pd.DataFrame) -> pd.DataFrame:
    """Per phase (prefill, decode, and `outside` for operations in no kvscope phase): kernel count and summed
    kernel time by class, and each class's share of the phase's summed kernel time (shares add to 100% per
    phase; overlapping kernels on two streams are both counted; NaN where the phase's kernels sum to zero time)."""
    k = kernels.copy()
    k["phase"] = k["phase"].fillna("outside")
    g = k.groupby(["phase", "kernel_class"], observed=True).agg(ops=("dur_ns", "size"), time_ns=("dur_ns", "sum"))
    g = g.reset_index()
    g["time_ms"] = g["time_ns"] / NS_PER_MS
    g["share_pct"] = ratio(g["time_ns"], g.groupby("phase")["time_ns"].transform("sum")) * 100
    return g.sort_values(["phase", "time_ns"], ascending=[True, False]).reset_index(drop=True)
