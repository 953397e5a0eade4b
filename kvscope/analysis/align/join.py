"""Line projected NVTX ranges up with a run's CUDA-event timings, and say where the time goes.

Region names are the contract (docs/architecture.md): `run bs=.. seq=.. gen=..`, `rep N`, `prefill`, `decode`,
`decode step N`, `L07`, `L07.qkv`, `embed`, `lm_head`, `sample`, in the NVTX domain `kvscope`. Every range gets
the keys of the enclosing ones (run, rep, phase, step, layer, op), so it joins `timings.parquet` on
(run, rep, step, name).

Functions return DataFrames:
- `label_ranges`: the projection plus keys, for the ranges of the `kvscope` domain and those a phase map
  (phase_map.py) labels in another engine's export.
- `label_kernels`: every GPU operation with its innermost range (any domain), its innermost labelled range's keys
  and its kernel class.
- `align_regions`: per timed region, CUDA-event ms against projected GPU span, kernel busy time, kernel count.
- `step_activity`: per prefill and decode step, GPU busy vs idle within the step's span, and launch-bound or not.
- `class_breakdown`: per phase, kernel time by kernel class.

Ratios and percentages are NaN (never infinite) where their denominator is not positive: a zero-length GPU span, a
zero CUDA-event time, a phase whose kernels sum to zero time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis.align.kernel_classes import Rules, classify
from kvscope.analysis.align.phase_map import PhaseMap, mapped_keys
from kvscope.analysis.nsys.export import NsysExport
from kvscope.analysis.nsys.projection import Projection
from kvscope.errors import KvscopeError
from kvscope.schema import GRAPH_CLOCK, NS_PER_MS, NVTX_DOMAIN, parse

# a step is launch-bound when its GPU is idle for more than this share of the step's GPU span: the kernels wait for
# the host to launch them rather than for memory or math
LAUNCH_BOUND_IDLE_FRACTION = 0.2
KVSCOPE_DOMAIN = NVTX_DOMAIN
_KEYS = ("run", "rep", "phase", "step", "layer", "op")


def ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    """num / den, NaN (NA for nullable columns) where den is not positive or missing: never inf."""
    return (num / den).where(den > 0)


def label_ranges(source: Projection | pd.DataFrame, phase_map: PhaseMap | None = None) -> pd.DataFrame:
    """The labelled ranges with their level name (`kind`) and keys (run, rep, phase, step, layer, op), inherited
    from their nearest labelled enclosing range: ranges of the NVTX domain `kvscope` by kvscope's region names, and
    ranges of any domain that `phase_map` labels (phase_map.py). `source`: a projection or its (filtered) ranges."""
    r = source.ranges if isinstance(source, Projection) else source
    own = _kvscope_keys(r)
    if phase_map is not None:
        mapped = mapped_keys(r, phase_map)
        free = own["kind"].isna() & mapped["kind"].notna()
        for col in ("kind", "phase", "step", "layer"):
            own.loc[free, col] = mapped.loc[free, col]
    labelled = own["kind"].notna().to_numpy()
    keys = _inherit(r, own, labelled)
    out = r.loc[labelled].copy()
    out["kind"] = own.loc[labelled, "kind"].astype("string")
    for k in _KEYS:
        out[k] = keys.loc[labelled, k].to_numpy()
    mapped_step = (out["kind"] == "step").fillna(False) & out["phase"].isna()
    out.loc[mapped_step, "phase"] = "decode"  # a phase-map step outside any labelled phase
    for k in ("rep", "step", "layer"):
        out[k] = pd.array(out[k].to_numpy(), dtype="Int64")
    for k in ("run", "phase", "op"):
        out[k] = out[k].astype("string")
    return out.sort_values("start_ns", kind="stable").reset_index(drop=True)


def _kvscope_keys(r: pd.DataFrame) -> pd.DataFrame:
    """kind and own keys of the ranges in the `kvscope` domain by their names (NA elsewhere); each distinct name is
    parsed once."""
    own = pd.DataFrame({"kind": pd.Series(pd.NA, index=r.index, dtype="object"),
                        **{k: pd.Series(pd.NA, index=r.index, dtype="object") for k in _KEYS}})
    mine = (r["domain"] == KVSCOPE_DOMAIN).fillna(False).to_numpy(bool)
    if not mine.any():
        return own
    codes, uniques = pd.factorize(r.loc[mine, "name"].fillna("").astype(str))
    parsed = _name_keys(pd.Series(uniques, dtype=object))
    for col in own.columns:
        values = own[col].to_numpy(dtype=object, copy=True)
        values[mine] = parsed[col].to_numpy(dtype=object)[codes]
        own[col] = values
    return own


def _name_keys(names: pd.Series) -> pd.DataFrame:
    """kind and own keys of distinct kvscope region names (schema.parse; NA for names kvscope does not write)."""
    rows = []
    for name in names:
        keys = parse(name)
        if keys is None:
            rows.append((pd.NA,) * (1 + len(_KEYS)))
            continue
        own = (name if keys.level == "run" else pd.NA, keys.rep, keys.phase, keys.step, keys.layer, keys.op)
        rows.append((keys.level, *(pd.NA if v is None else v for v in own)))
    return pd.DataFrame(rows, columns=["kind", *_KEYS], index=names.index, dtype=object)


def _inherit(r: pd.DataFrame, own: pd.DataFrame, labelled: np.ndarray) -> pd.DataFrame:
    """Keys of every range: its own, else those of its nearest labelled enclosing range (outer levels first)."""
    level = r["level"].to_numpy(np.int64)
    pos = pd.Series(np.arange(len(r)), index=r["range_id"].to_numpy())
    parent = r["parent_id"].map(pos).fillna(-1).to_numpy(np.int64)
    anc = np.full(len(r), -1, dtype=np.int64)  # nearest labelled enclosing range
    cols = {k: own[k].to_numpy(dtype=object, copy=True) for k in _KEYS}
    for lvl in np.unique(level):
        at = np.flatnonzero((level == lvl) & (parent >= 0))
        if not len(at):
            continue
        par = parent[at]
        anc[at] = np.where(labelled[par], par, anc[par])
        fill_from = anc[at]
        ok = fill_from >= 0
        for k in _KEYS:
            col = cols[k]
            mine = col[at]
            take = ok & pd.isna(mine)
            col[at[take]] = col[fill_from[take]]
    return pd.DataFrame(cols, index=r.index)


def label_kernels(exp: NsysExport, proj: Projection, labeled: pd.DataFrame, keep_ranges: np.ndarray | None = None,
                  keep_ops: np.ndarray | None = None, rules: Rules | None = None) -> pd.DataFrame:
    """Every GPU operation (those of `keep_ops`) with its innermost enclosing range among `keep_ranges` (rows of
    proj.ranges; any domain): range_id, range_name, range_domain; its innermost labelled range (`region_id`) and that
    range's keys; its stream, graph node id, names, class (`rules`: kernel_classes.load_rules) and duration."""
    r = proj.ranges
    keep_r = np.ones(len(r), dtype=bool) if keep_ranges is None else keep_ranges
    inner = proj.innermost(keep_r)
    region = proj.innermost(keep_r & r["range_id"].isin(labeled["range_id"]).to_numpy(bool))
    ops = exp.gpu_ops
    k = pd.DataFrame({
        "kind": ops["kind"], "name": ops["name"], "short_name": ops["short_name"],
        "demangled_name": ops["demangled_name"], "start_ns": ops["start_ns"], "end_ns": ops["end_ns"],
        "dur_ns": ops["end_ns"] - ops["start_ns"], "device": ops["device"], "stream": ops["stream"],
        "pid": ops["pid"], "corr": ops["corr"], "graph_node_id": ops["graph_node_id"],
        "range_id": _nullable_id(inner), "region_id": _nullable_id(region),
    })
    k["kernel_class"] = classify(ops["name"], rules)
    at_range, at_region = _positions(r, inner), _positions(labeled, region)
    k["range_name"] = _take(r, "name", at_range)
    k["range_domain"] = _take(r, "domain", at_range)
    k["range_kind"] = _take(labeled, "kind", at_region)
    for key in _KEYS:
        k[key] = _take(labeled, key, at_region)
    if keep_ops is not None:
        k = k.loc[keep_ops].reset_index(drop=True)
    return k


def _positions(table: pd.DataFrame, range_id: np.ndarray) -> np.ndarray:
    """Row position in `table` of each of `range_id` (-1 where -1 or absent)."""
    ids = table["range_id"].to_numpy(np.int64)
    if not len(ids):
        return np.full(len(range_id), -1, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    at = np.minimum(np.searchsorted(ids[order], range_id), len(ids) - 1)
    return np.where((range_id >= 0) & (ids[order][at] == range_id), order[at], -1)


def _take(table: pd.DataFrame, col: str, pos: np.ndarray) -> pd.Series:
    """`table[col]` at row positions `pos` (NA where -1)."""
    return pd.Series(pd.api.extensions.take(table[col].array, pos, allow_fill=True))


def _nullable_id(ids: np.ndarray) -> pd.arrays.IntegerArray:
    """Range ids as Int64, NA where -1 (no range)."""
    return pd.arrays.IntegerArray(np.where(ids >= 0, ids, 0).astype(np.int64), ids < 0)


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
    twice = t.duplicated(key, keep=False).to_numpy(bool)
    if twice.any():  # each would match the same range: every region counted as often
        first = t.loc[twice].iloc[0]
        where = ", ".join(f"{k} {first[k]}" for k in ("rep", "step") if pd.notna(first[k]))
        where += ("; " if where else "") + (f"in {first['run']!r}" if first["run"] != first["_name"] else "")
        per_rank = " (a tensor-parallel run's: align each rank with its own rows)" if "rank" in t.columns else ""
        raise KvscopeError(f"timings hold {int((t[key] == first[key]).all(axis=1).sum())} rows of the region "
                           f"{first['_name']!r}{f' ({where})' if where else ''}; a run's timings hold each region "
                           f"once{per_rank}")
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
    is_step = (r["kind"] == "step") | ((r["kind"] == "phase") & (r["phase"] == "prefill"))
    steps = r[is_step.fillna(False).to_numpy(bool)]
    span = (steps["gpu_end_ns"] - steps["gpu_start_ns"]).astype("Float64")
    idle = 1 - ratio(steps["gpu_busy_ns"], span)
    out = pd.DataFrame({
        **{k: steps[k] for k in ("pid", "range_id") if k in steps},
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
