"""Whether consecutive GPU kernels of one stream overlapped in time, per pair and per step.

Programmatic dependent launch (PDL: `cudaLaunchAttributeProgrammaticStreamSerialization` on the launch,
`griddepcontrol.launch_dependents` / `.wait` in the kernels, compute capability 9.0 and later) lets a kernel's
prologue run during its predecessor's tail on the same stream. A launch that asks for it and never overlaps is a
silent failure: nothing errs, the time is just not saved. This module reads the answer off any Nsight Systems export.

Definitions (timestamps in ns, the GPU's own clock, as the export holds them):
- stream: one (pid, device, stream) of the kernels table (`join.label_kernels`; stream ids are per process).
- consecutive pair: two GPU operations of one stream next to each other when the stream's operations are ordered by
  start (then end, then correlation id). `gap_ns = next.start_ns - prev.end_ns` (negative: they overlapped);
  `overlap_ns = max(0, prev.end_ns - next.start_ns)`. Equal timestamps (`gap_ns == 0`) touch and do not overlap.
  The gap is taken from the previous operation's end only: if a kernel ran wholly inside its predecessor, the one
  after it is compared with it, not with the longer predecessor.
- memcpy and memset rows (`kind` other than `kernel`) are not kernels here, but they stay in the stream's order: a
  kernel, a memset, a kernel are two pairs (kernel-memset, memset-kernel), never one kernel-kernel pair across the
  memset (the two kernels were not neighbours on the stream, and no programmatic launch links them).
  `kernel_pair` says whether both sides are kernels; pair counts, overlapped pairs and overlap time count kernel
  pairs only, while idle gaps count every pair, so a memset's own time is never called idle.
- step: the kernels' labels (`run`, `rep`, `phase`, `step`: a prefill is step 0 of its phase, decode steps 1..N, per
  repetition; a phase map's labels for another engine's export). A pair belongs to a step when both operations
  carry that step's labels; a pair across two steps (the last operation of one step and the first of the next) or
  outside any step is kept in the pairs table with `in_step` false and counted in no step. A step's GPU span runs
  from its first operation's start to its last operation's end, over all its streams and kinds.

Without PDL (or another concurrency on one stream: concurrent branches of a CUDA graph, which Nsight may report on
the launching stream) CUDA runs the operations of one stream one after the other: a kernel starts after its
predecessor ended, so an ordinary export holds no overlapping pair, and its own kernels serve as the "none" case.

Functions return DataFrames (the finding a sentence); no torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis.align.join import ratio
from kvscope.errors import KvscopeError
from kvscope.schema import NS_PER_US

KERNEL_KIND = "kernel"  # the `kind` of a kernel row in the kernels table (the others: memcpy, memset)
_STREAM = ("pid", "device", "stream")
_STEP_KEYS = ("run", "rep", "phase", "step")
_REQUIRED = ("start_ns", "end_ns", *_STREAM)

PAIR_COLUMNS = (
    "pid", "device", "stream", "run", "rep", "phase", "step", "in_step", "kernel_pair",
    "prev_kind", "prev_name", "prev_class", "prev_corr", "prev_start_ns", "prev_end_ns",
    "next_kind", "next_name", "next_class", "next_corr", "next_start_ns", "next_end_ns",
    "gap_ns", "overlap_ns",
)
LEAN_PAIR_COLUMNS = ("pid", "device", "stream", "run", "rep", "phase", "step", "in_step", "kernel_pair", "gap_ns",
                     "overlap_ns")
STEP_COLUMNS = (
    "pid", "run", "rep", "phase", "step", "ops", "kernels", "kernel_pairs", "overlapped_pairs", "overlap_ns",
    "max_overlap_ns", "idle_gap_ns", "gpu_start_ns", "gpu_end_ns", "gpu_span_ns", "overlap_fraction",
)
_DTYPES = {
    "pid": "int64", "device": "int64", "stream": "int64", "run": "string", "rep": "Int64", "phase": "string",
    "step": "Int64", "in_step": "bool", "kernel_pair": "bool", "prev_kind": "string", "prev_name": "string",
    "prev_class": "string", "prev_corr": "Int64", "prev_start_ns": "int64", "prev_end_ns": "int64",
    "next_kind": "string", "next_name": "string", "next_class": "string", "next_corr": "Int64",
    "next_start_ns": "int64", "next_end_ns": "int64", "gap_ns": "int64", "overlap_ns": "int64",
    "ops": "int64", "kernels": "int64", "kernel_pairs": "int64", "overlapped_pairs": "int64",
    "max_overlap_ns": "int64", "idle_gap_ns": "int64", "gpu_start_ns": "int64", "gpu_end_ns": "int64",
    "gpu_span_ns": "int64", "overlap_fraction": "float64",
}


def stream_overlaps(kernels: pd.DataFrame, detail: bool = True) -> pd.DataFrame:
    """Every pair of consecutive GPU operations of one (pid, device, stream), ordered by start: the two operations'
    kind, name, class (`kernel_class`) and correlation id, their start and end, `gap_ns` (negative: overlap) and
    `overlap_ns`; `kernel_pair` (both are kernels), and the step labels with `in_step` where both share one step.
    Columns PAIR_COLUMNS; optional input columns (kind, name, kernel_class, corr, run, rep, phase, step) may be
    absent: then NA, and every row a kernel where `kind` is absent. Rows without a start, end or stream are left out.
    `detail` False: only what `step_overlap` and `overlap_finding` read (LEAN_PAIR_COLUMNS: no names, classes,
    correlation ids or times; a million operations in about half the time).
    Raises KvscopeError when a required column (start_ns, end_ns, pid, device, stream) is missing."""
    return _pairs(_ops(kernels, detail), detail)


def step_overlap(kernels: pd.DataFrame, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per step (pid, run, rep, phase, step; a prefill is its phase's step 0): its GPU operations (`ops`) and
    kernels, its consecutive same-stream kernel pairs, those that overlapped, the summed and the largest overlap
    (ns), the summed positive gaps between consecutive operations of its streams (`idle_gap_ns`: the stream idle),
    its GPU span (first start to last end of its operations) and the overlap's share of it (`overlap_fraction`,
    NaN where the span is 0; summed over streams, so several overlapping streams could exceed 1). Operations with
    no phase or no step are in no step. `pairs`: stream_overlaps(kernels), computed when not given.
    Columns STEP_COLUMNS, one row per step in the order of their first operation."""
    k = _ops(kernels, detail=False)
    return _steps(k, _pairs(k, detail=False) if pairs is None else pairs)


def overlap_summary(kernels: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """`step_overlap` and `overlap_finding` of `kernels`, its operations read and ordered once (`kvscope align`)."""
    k = _ops(kernels, detail=False)
    pairs = _pairs(k, detail=False)
    steps = _steps(k, pairs)
    return steps, overlap_finding(pairs, steps)


def _pairs(k: pd.DataFrame, detail: bool) -> pd.DataFrame:
    """`stream_overlaps` of operations `_ops` prepared (with the same `detail`)."""
    same = np.zeros(max(len(k) - 1, 0), dtype=bool)
    if len(k) > 1:
        same = np.ones(len(k) - 1, dtype=bool)
        for col in _STREAM:
            v = k[col].to_numpy(np.int64)
            same &= v[1:] == v[:-1]
    prev_at = np.flatnonzero(same)
    prev, nxt = k.iloc[prev_at].reset_index(drop=True), k.iloc[prev_at + 1].reset_index(drop=True)
    gap = nxt["start_ns"].to_numpy(np.int64) - prev["end_ns"].to_numpy(np.int64)
    in_step = _same_step(prev, nxt)
    out = pd.DataFrame({col: prev[col] for col in _STREAM})
    for key in _STEP_KEYS:
        out[key] = prev[key].where(in_step)
    out["in_step"] = in_step
    out["kernel_pair"] = (prev["kind"] == KERNEL_KIND).to_numpy(bool) & (nxt["kind"] == KERNEL_KIND).to_numpy(bool)
    out["gap_ns"] = gap
    out["overlap_ns"] = np.maximum(-gap, 0)
    if not detail:
        return _typed(out, LEAN_PAIR_COLUMNS)
    for side, df in (("prev", prev), ("next", nxt)):
        for col, src in (("kind", "kind"), ("name", "name"), ("class", "kernel_class"), ("corr", "corr"),
                         ("start_ns", "start_ns"), ("end_ns", "end_ns")):
            out[f"{side}_{col}"] = df[src]
    return _typed(out, PAIR_COLUMNS)


def _steps(k: pd.DataFrame, p: pd.DataFrame) -> pd.DataFrame:
    """`step_overlap` of operations `_ops` prepared and their pairs."""
    k = k[k["phase"].notna().to_numpy(bool) & k["step"].notna().to_numpy(bool)]
    if k.empty:
        return _typed(pd.DataFrame({c: [] for c in STEP_COLUMNS}), STEP_COLUMNS)
    keys = ["pid", *_STEP_KEYS]
    k = k.assign(is_kernel=(k["kind"] == KERNEL_KIND).to_numpy(bool))
    per = k.groupby(keys, dropna=False, sort=False).agg(
        ops=("start_ns", "size"), kernels=("is_kernel", "sum"), gpu_start_ns=("start_ns", "min"),
        gpu_end_ns=("end_ns", "max")).reset_index()
    p = p[p["in_step"].to_numpy(bool)]
    kp = p[p["kernel_pair"].to_numpy(bool)]
    pair_stats = kp.assign(overlapped=kp["overlap_ns"] > 0).groupby(keys, dropna=False, sort=False).agg(
        kernel_pairs=("gap_ns", "size"), overlapped_pairs=("overlapped", "sum"), overlap_ns=("overlap_ns", "sum"),
        max_overlap_ns=("overlap_ns", "max")).reset_index()
    idle = p.assign(idle=p["gap_ns"].clip(lower=0)).groupby(keys, dropna=False, sort=False).agg(
        idle_gap_ns=("idle", "sum")).reset_index()
    per = _join(_join(per, pair_stats, keys), idle, keys)
    for col in ("kernel_pairs", "overlapped_pairs", "overlap_ns", "max_overlap_ns", "idle_gap_ns"):
        per[col] = per[col].fillna(0).astype("int64")
    per["gpu_span_ns"] = per["gpu_end_ns"] - per["gpu_start_ns"]
    per["overlap_fraction"] = ratio(per["overlap_ns"].astype("float64"), per["gpu_span_ns"].astype("float64"))
    per = per.sort_values(["gpu_start_ns", "pid"], kind="stable").reset_index(drop=True)
    return _typed(per, STEP_COLUMNS)


def overlap_finding(pairs: pd.DataFrame, steps: pd.DataFrame) -> str:
    """One line on whether consecutive kernels of one stream overlapped: `pairs` from stream_overlaps, `steps` from
    step_overlap (of the same kernels). Nothing captured, no overlap (the programmatic launch, if asked for, did not
    take effect), or how many pairs overlapped and the median overlap per step."""
    kp = pairs[pairs["kernel_pair"].to_numpy(bool)]
    if kp.empty:
        return "no two consecutive kernels of one stream were captured: their overlap cannot be judged"
    n_pairs = len(kp)
    overlapped = int((kp["overlap_ns"] > 0).sum())
    judged = steps[steps["kernel_pairs"] > 0]
    in_steps = f" in {len(judged):,} step{'s' if len(judged) != 1 else ''}" if len(judged) else ""
    if not overlapped:
        return (f"no consecutive kernels of one stream overlapped{in_steps} (0 of {n_pairs:,} pairs; programmatic "
                "dependent launch, if requested, did not take effect)")
    head = f"{overlapped:,} of {n_pairs:,} pairs of consecutive kernels on one stream overlapped"
    if not len(judged):
        return f"{head}, {int(kp['overlap_ns'].sum()) / NS_PER_US:.1f} us in all (no labelled steps)"
    with_overlap = int((judged["overlapped_pairs"] > 0).sum())
    median_us = float(judged["overlap_ns"].median()) / NS_PER_US
    return (f"{head} ({with_overlap:,} of {len(judged):,} steps with overlap), median {median_us:.1f} us of overlap "
            "per step")


def _ops(kernels: pd.DataFrame, detail: bool = True) -> pd.DataFrame:
    """The GPU operations with the columns this module reads (absent optional ones as NA; every row a kernel without
    `kind`; `detail` False: no name or class), rows lacking a start, end or stream dropped, ordered by stream, then
    start, end and correlation id."""
    missing = [c for c in _REQUIRED if c not in kernels.columns]
    if missing:
        raise KvscopeError(f"kernel overlap: the kernels table lacks the column{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing)} (kvscope align's kernels.parquet has them)")
    k = kernels.dropna(subset=list(_REQUIRED))
    n = len(k)
    out = pd.DataFrame({c: k[c].to_numpy(np.int64) for c in _REQUIRED})
    out["kind"] = _column(k, "kind", "string", n, KERNEL_KIND)
    if detail:
        out["name"] = _column(k, "name", "string", n)
        out["kernel_class"] = _column(k, "kernel_class", "string", n)
    out["corr"] = _column(k, "corr", "Int64", n)
    for key in _STEP_KEYS:
        out[key] = _column(k, key, _DTYPES[key], n)
    order = ["pid", "device", "stream", "start_ns", "end_ns"]
    out["_corr"] = out["corr"].fillna(-1).astype("int64")
    return out.sort_values([*order, "_corr"], kind="stable").drop(columns="_corr").reset_index(drop=True)


def _column(k: pd.DataFrame, col: str, dtype: str, n: int, default: object = pd.NA) -> pd.Series:
    """`k[col]` as `dtype` (positions reset), or `default` in every row when `k` has no such column."""
    if col in k.columns:
        return k[col].astype(dtype).reset_index(drop=True)
    return pd.Series([default] * n, dtype=dtype)


def _same_step(prev: pd.DataFrame, nxt: pd.DataFrame) -> np.ndarray:
    """Whether each pair's two operations carry one step's labels (a phase and a step; run and rep equal, NA as
    equal to NA)."""
    ok = prev["phase"].notna() & prev["step"].notna()
    for key in _STEP_KEYS:
        a, b = prev[key], nxt[key]
        ok &= (a == b).fillna(False) | (a.isna() & b.isna())
    return ok.to_numpy(bool)


def _join(left: pd.DataFrame, right: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`left` with `right`'s columns on the step keys (NA keys match NA keys)."""
    if right.empty:
        for col in right.columns.difference(keys):
            left[col] = pd.NA
        return left
    return left.merge(right, on=keys, how="left")


def _typed(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """`df[columns]` with this module's dtypes (so empty tables have them too)."""
    return pd.DataFrame({c: df[c].astype(_DTYPES[c]) for c in columns}).reset_index(drop=True)
