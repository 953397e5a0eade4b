"""NVTX ranges projected onto the GPU, with the semantics of Nsight Systems' `nvtx_gpu_proj_trace` report.

- Ranges: push/pop and start/end (and NVTXT) ranges with no end thread recorded (`endGlobalTid` empty: they end
  on the thread where they started); a range never closed ends at the latest start or end of the export's ranges.
  Ranges that ended on another thread are kept as rows with `projected` false, `level` -1 and no GPU work.
- A GPU operation (kernel, memcpy, memset, graph) belongs to every range on its launching thread whose [start, end]
  encloses the launching API call's [start, end], not just the innermost one. Operations are joined to API calls on
  (process, correlation id): correlation ids repeat across processes.
- Projected GPU start / end: first start and last end of the range's operations; `gpu_ops`: distinct correlation
  ids; `gpu_busy_ns`: length of the union of the operations' intervals (so overlapping streams are not counted
  twice); `level`: ranges on the same thread that enclose the range (0 = outermost); `parent_id`: the tightest.

Vectorised: API calls of a thread are sorted by start, so the calls a range encloses are one contiguous block
found by binary search, block aggregates come from `ufunc.reduceat` and prefix sums, and interval unions are done
level by level (ranges of one level on one thread are disjoint). Partly overlapping start/end ranges, which break
that, are handled by a slower exact path for just those ranges. Several threads (or groups) are searched at once by
shifting each one's times above the previous one's; where those shifts would leave int64 (a long capture, many
groups), the times are replaced by their ranks first, or the union is taken per group without shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvscope.analysis.nsys.export import NsysExport

_BIG_NS = np.iinfo(np.int64).max
_SHIFT_LIMIT = 2**62  # times shifted by (run * span) stay below this, far from int64's end


def _shifts_fit(span: int, runs: int) -> bool:
    """Whether times in [0, span) shifted by up to `runs` spans stay below `_SHIFT_LIMIT`."""
    return int(span) * max(int(runs), 1) < _SHIFT_LIMIT


def _ranks(*arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays' values replaced by their ranks among all of them: order and equality kept, values small."""
    values = np.unique(np.concatenate(arrays))
    return [np.searchsorted(values, a).astype(np.int64) for a in arrays]


@dataclass
class Projection:
    ranges: pd.DataFrame  # one row per range, with the projection columns
    op_range: np.ndarray  # innermost enclosing range_id per row of export.gpu_ops (-1: none)
    op_call: np.ndarray  # row of export.calls that launched each GPU op (-1: no API call found)
    call_lo: np.ndarray  # per row of `ranges`: the block [call_lo, call_hi) of export.calls the range encloses
    call_hi: np.ndarray

    def innermost(self, keep: np.ndarray) -> np.ndarray:
        """Per row of export.gpu_ops, the range_id of its innermost enclosing range among the rows of `ranges`
        where `keep` (bool) is true; -1 where none encloses it."""
        r = self.ranges
        eligible = np.asarray(keep, dtype=bool) & (r["gpu_ops"].to_numpy() > 0)
        pos = _innermost_pos(self.op_call, r["level"].to_numpy(np.int64), eligible, self.call_lo, self.call_hi)
        range_id = r["range_id"].to_numpy(np.int64)
        return np.where(pos >= 0, range_id[np.maximum(pos, 0)], -1)


@dataclass
class _CallOps:
    """The GPU operations of every API call: which call launched each op, and per call (one sentinel entry past
    the last call, for reduceat) the first op start and last op end, with prefix sums over the calls of
    `has ops` and `op count`."""

    op_call: np.ndarray  # per op: row of export.calls, -1 when no call matches
    first_start: np.ndarray  # per call (+ sentinel): earliest start of its ops, _BIG_NS when none
    last_end: np.ndarray  # per call (+ sentinel): latest end of its ops, -_BIG_NS when none
    has_prefix: np.ndarray  # calls with at least one op among calls [0, i)
    ops_prefix: np.ndarray  # ops of calls [0, i)


def project(exp: NsysExport) -> Projection:
    calls = exp.calls  # sorted by (global_tid, start_ns)
    ops = exp.gpu_ops
    n_calls = len(calls)
    co = _call_ops(calls, ops)

    # eligible ranges (as nsys: those with no end thread recorded, which end where they started) and the block of
    # calls each encloses
    r = exp.ranges
    same_thread = r["end_global_tid"].to_numpy() < 0
    elsewhere = r.loc[~same_thread]
    r = r.loc[same_thread].sort_values(["global_tid", "start_ns", "end_ns"], ascending=[True, True, False],
                                       kind="stable").reset_index(drop=True)
    gtid = r["global_tid"].to_numpy(np.int64)
    rs, re = r["start_ns"].to_numpy(np.int64), r["end_ns"].to_numpy(np.int64)
    lo, hi = _call_blocks(calls, gtid, rs, re)
    nonempty = hi > lo
    gpu_ops = co.has_prefix[hi] - co.has_prefix[lo]
    n_kern = co.ops_prefix[hi] - co.ops_prefix[lo]
    idx = np.empty(2 * len(r), dtype=np.int64)
    idx[0::2], idx[1::2] = np.where(nonempty, lo, n_calls), np.where(nonempty, hi, n_calls)
    g_start = np.minimum.reduceat(co.first_start, idx)[0::2] if len(r) else np.empty(0, np.int64)
    g_end = np.maximum.reduceat(co.last_end, idx)[0::2] if len(r) else np.empty(0, np.int64)
    has_gpu = nonempty & (gpu_ops > 0)

    level, parent_pos = _nesting(gtid, rs, re)
    range_id = r["range_id"].to_numpy(np.int64)
    parent_id = np.where(parent_pos >= 0, range_id[np.maximum(parent_pos, 0)], -1)
    busy = _busy_time(ops, co.op_call, level, has_gpu, lo, hi, n_calls)
    op_range_pos = _innermost_pos(co.op_call, level, has_gpu, lo, hi)
    # nsys counts as children only the ranges its report lists: those with GPU operations
    counted = (parent_pos >= 0) & has_gpu

    out = pd.DataFrame({
        "range_id": range_id,
        "name": r["name"], "domain": r["domain"], "style": r["style"],
        "pid": r["pid"].to_numpy(np.int64), "tid": r["tid"].to_numpy(np.int64),
        "level": level, "parent_id": pd.array(np.where(parent_id >= 0, parent_id, 0), dtype="Int64"),
        "num_child": np.bincount(parent_pos[counted], minlength=len(r)),
        "range_stack": _stacks(range_id, level, parent_pos),
        "start_ns": rs, "end_ns": re,
        "gpu_start_ns": pd.array(np.where(has_gpu, g_start, 0), dtype="Int64"),
        "gpu_end_ns": pd.array(np.where(has_gpu, g_end, 0), dtype="Int64"),
        "gpu_busy_ns": busy, "gpu_ops": gpu_ops, "gpu_op_rows": n_kern,
        "category": r["category"], "payload": r["payload"], "closed": r["closed"],
        "global_tid": gtid, "projected": np.ones(len(r), dtype=bool),
    })
    out.loc[parent_id < 0, "parent_id"] = pd.NA
    out.loc[~has_gpu, ["gpu_start_ns", "gpu_end_ns"]] = pd.NA
    op_range = np.where(op_range_pos >= 0, range_id[np.maximum(op_range_pos, 0)], -1)
    if len(elsewhere):
        out = pd.concat([out, _unprojected(elsewhere)], ignore_index=True)
        lo, hi = np.concatenate([lo, np.zeros(len(elsewhere), np.int64)]), np.concatenate([hi, np.zeros(
            len(elsewhere), np.int64)])
    return Projection(out, op_range, co.op_call, lo, hi)


def _unprojected(r: pd.DataFrame) -> pd.DataFrame:
    """Rows for the ranges nsys does not project (start/end ranges that ended on another thread): no GPU work,
    `level` -1, no parent, `projected` false."""
    n = len(r)
    return pd.DataFrame({
        "range_id": r["range_id"].to_numpy(np.int64), "name": r["name"].to_numpy(), "domain": r["domain"].to_numpy(),
        "style": r["style"].to_numpy(), "pid": r["pid"].to_numpy(np.int64), "tid": r["tid"].to_numpy(np.int64),
        "level": np.full(n, -1, np.int64), "parent_id": pd.array([pd.NA] * n, dtype="Int64"),
        "num_child": np.zeros(n, np.int64), "range_stack": np.full(n, "", dtype=object),
        "start_ns": r["start_ns"].to_numpy(np.int64), "end_ns": r["end_ns"].to_numpy(np.int64),
        "gpu_start_ns": pd.array([pd.NA] * n, dtype="Int64"), "gpu_end_ns": pd.array([pd.NA] * n, dtype="Int64"),
        "gpu_busy_ns": np.zeros(n, np.int64), "gpu_ops": np.zeros(n, np.int64), "gpu_op_rows": np.zeros(n, np.int64),
        "category": r["category"].to_numpy(), "payload": r["payload"].to_numpy(), "closed": r["closed"].to_numpy(),
        "global_tid": r["global_tid"].to_numpy(np.int64), "projected": np.zeros(n, dtype=bool),
    })


def _call_ops(calls: pd.DataFrame, ops: pd.DataFrame) -> _CallOps:
    """GPU ops -> launching API call, on (process, correlation id), and the per-call aggregates of their ops."""
    n_calls = len(calls)
    call_key = pd.DataFrame({"pid": calls["pid"].to_numpy(), "corr": calls["corr"].to_numpy(),
                             "call": np.arange(n_calls)})
    op_key = pd.DataFrame({"pid": ops["pid"].to_numpy(), "corr": ops["corr"].to_numpy()})
    if (op_key["pid"] < 0).all():  # exports without globalPid on GPU rows: one process assumed
        merged = op_key[["corr"]].merge(call_key.drop_duplicates("corr")[["corr", "call"]], on="corr", how="left")
    else:
        merged = op_key.merge(call_key, on=["pid", "corr"], how="left")
    op_call = merged["call"].fillna(-1).to_numpy(np.int64)
    has_call = op_call >= 0
    c_min = np.full(n_calls + 1, _BIG_NS, dtype=np.int64)  # +1: sentinel for reduceat
    c_max = np.full(n_calls + 1, -_BIG_NS, dtype=np.int64)
    c_ops = np.zeros(n_calls + 1, dtype=np.int64)
    np.minimum.at(c_min, op_call[has_call], ops["start_ns"].to_numpy()[has_call])
    np.maximum.at(c_max, op_call[has_call], ops["end_ns"].to_numpy()[has_call])
    np.add.at(c_ops, op_call[has_call], 1)
    c_has = (c_ops > 0).astype(np.int64)
    has_prefix = np.concatenate([[0], np.cumsum(c_has[:n_calls])])
    ops_prefix = np.concatenate([[0], np.cumsum(c_ops[:n_calls])])
    return _CallOps(op_call, c_min, c_max, has_prefix, ops_prefix)


def _call_blocks(calls: pd.DataFrame, gtid: np.ndarray, rs: np.ndarray, re: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For ranges of threads `gtid` spanning [rs, re]: the block [lo, hi) of their thread's calls that the range
    encloses (calls sorted by (thread, start); an empty block has hi == lo)."""
    n_calls = len(calls)
    c_gtid = calls["global_tid"].to_numpy(np.int64)
    c_start, c_end = calls["start_ns"].to_numpy(np.int64), calls["end_ns"].to_numpy(np.int64)
    t_lo = np.searchsorted(c_gtid, gtid, side="left")  # the thread's calls: [t_lo, t_hi)
    t_hi = np.searchsorted(c_gtid, gtid, side="right")
    lo = _search_in_slices(c_start, c_gtid, rs, gtid, t_lo, t_hi, "left")  # first call starting in the range
    hi = _search_in_slices(c_start, c_gtid, re, gtid, t_lo, t_hi, "right")  # calls starting up to its end
    hi = np.maximum(hi, lo)
    nonempty = hi > lo
    # a call that starts inside a range but ends after it is not enclosed: shrink the block from the right while
    # the last call sticks out (calls of one thread are sequential, so only trailing calls can)
    c_end_s = np.concatenate([c_end, [-_BIG_NS]])
    while True:
        last = np.where(nonempty, hi - 1, n_calls)
        sticks = nonempty & (c_end_s[last] > re)
        if not sticks.any():
            break
        hi = np.where(sticks, hi - 1, hi)
        nonempty = hi > lo
    return lo, hi


def _innermost_pos(op_call: np.ndarray, level: np.ndarray, eligible: np.ndarray, lo: np.ndarray, hi: np.ndarray
                   ) -> np.ndarray:
    """Per op, the position of its innermost `eligible` range (-1: none): levels from the outermost in, each
    overwriting the owner of the calls its blocks hold (ranges of one level on one thread are disjoint)."""
    has_call = op_call >= 0
    n_calls = int(hi.max()) if len(hi) else 0
    call_owner = np.full(n_calls, -1, dtype=np.int64)
    for lvl in np.unique(level[eligible]):
        at = np.flatnonzero((level == lvl) & eligible)
        owner, _ = _owner_of_calls(lo[at], hi[at], n_calls)
        mine = owner >= 0
        call_owner[mine] = at[owner[mine]]
    if not n_calls:
        return np.full(len(op_call), -1, dtype=np.int64)
    return np.where(has_call & (op_call < n_calls), call_owner[np.clip(op_call, 0, n_calls - 1)], -1)


def _busy_time(ops: pd.DataFrame, op_call: np.ndarray, level: np.ndarray, has_gpu: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, n_calls: int) -> np.ndarray:
    """Per range, the union of its ops' intervals (ns). Level by level: ranges of one level on one thread are
    disjoint, so each call has one owner at a level; blocks that overlap another of their level (partly overlapping
    start/end ranges) take the exact, slow path."""
    n = len(level)
    has_call = op_call >= 0
    busy = np.zeros(n, dtype=np.int64)
    op_s, op_e = ops["start_ns"].to_numpy(np.int64), ops["end_ns"].to_numpy(np.int64)
    for lvl in range(int(level.max()) + 1 if len(level) else 0):
        at = np.flatnonzero((level == lvl) & has_gpu)
        if not len(at):
            continue
        call_owner, overlapping = _owner_of_calls(lo[at], hi[at], n_calls)
        owner_of_op = np.where(has_call, call_owner[np.maximum(op_call, 0)], -1)
        sel = owner_of_op >= 0
        groups = at[owner_of_op[sel]]
        busy[at] = 0
        busy += _union_by_group(groups, op_s[sel], op_e[sel], n)
        for k in np.flatnonzero(overlapping):  # ranges whose block overlaps another of the level: exact, slow path
            pos = at[k]
            in_block = has_call & (op_call >= lo[pos]) & (op_call < hi[pos])
            busy[pos] = union_length(op_s[in_block], op_e[in_block])
    return busy


def _search_in_slices(values: np.ndarray, value_thread: np.ndarray, keys: np.ndarray, key_thread: np.ndarray,
                      lo: np.ndarray, hi: np.ndarray, side: str) -> np.ndarray:
    """searchsorted of each key inside its own thread's slice values[lo:hi], vectorised: `values` is sorted by
    (thread, time), so shifting each thread's times above the previous thread's makes one sorted array."""
    if not len(keys):
        return np.empty(0, np.int64)
    threads = np.unique(value_thread)
    if len(values) and not _shifts_fit(max(int(values.max()), int(keys.max())) - min(int(values.min()),
                                                                                 int(keys.min())) + 2, len(threads)):
        values, keys = _ranks(values, keys)
    base = min(int(values.min()) if len(values) else 0, int(keys.min()))
    top = max(int(values.max()) if len(values) else 0, int(keys.max()))
    span = np.int64(top - base + 2)
    run_of_value = np.searchsorted(threads, value_thread)
    run_of_key = np.minimum(np.searchsorted(threads, key_thread), max(len(threads) - 1, 0))
    pos = np.searchsorted((values - base) + run_of_value * span, (keys - base) + run_of_key * span, side=side)
    return np.clip(pos, lo, hi)


def _nesting(gtid: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level (enclosing ranges on the same thread) and position of the tightest enclosing range, for ranges sorted
    by (thread, start asc, end desc). Peels the outermost ranges one level at a time."""
    n = len(start)
    level = np.full(n, -1, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    if not n:
        return level, parent
    thread_rank = np.unique(gtid, return_inverse=True)[1].astype(np.int64)
    if not _shifts_fit(int(end.max()) - int(start.min()) + 2, int(thread_rank.max()) + 1):
        start, end = _ranks(start, end)
    base = int(start.min())
    span = np.int64(int(end.max()) - base + 2)
    s_off = (start - base) + thread_rank * span
    e_off = (end - base) + thread_rank * span
    remaining = np.arange(n)
    lvl = 0
    prev_level_pos = np.empty(0, dtype=np.int64)
    while len(remaining):
        e_rem = e_off[remaining]
        prior_max = np.maximum.accumulate(np.r_[np.int64(-1), e_rem[:-1]])
        outer = prior_max < e_rem  # no earlier remaining range of the thread reaches as far
        here = remaining[outer]
        level[here] = lvl
        if lvl > 0 and len(here):
            # tightest enclosing range: the last range of the previous level that starts at or before this one
            cand = np.searchsorted(s_off[prev_level_pos], s_off[here], side="right") - 1
            ok = cand >= 0
            ppos = np.where(ok, prev_level_pos[np.maximum(cand, 0)], -1)
            ok &= (ppos >= 0) & (e_off[np.maximum(ppos, 0)] >= e_off[here])
            parent[here] = np.where(ok, ppos, -1)
        prev_level_pos = here
        remaining = remaining[~outer]
        lvl += 1
    return level, parent


def _stacks(range_id: np.ndarray, level: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """`:outer:...:self` range-id paths, built level by level."""
    stack = np.empty(len(range_id), dtype=object)
    ids = range_id.astype(str)
    for lvl in range(int(level.max()) + 1 if len(level) else 0):
        at = np.flatnonzero(level == lvl)
        par = parent[at]
        prefix = np.where(par >= 0, stack[np.maximum(par, 0)], "")
        prefix = np.array([p if isinstance(p, str) else "" for p in prefix], dtype=object)
        stack[at] = prefix + ":" + ids[at].astype(object)
    return stack


def _owner_of_calls(lo: np.ndarray, hi: np.ndarray, n_calls: int) -> tuple[np.ndarray, np.ndarray]:
    """For blocks [lo, hi) of one level: which block owns each call (-1: none), and which blocks overlap another
    (their owner entries are not to be trusted)."""
    owner = np.full(n_calls, -1, dtype=np.int64)
    lens = hi - lo
    order = np.argsort(lo, kind="stable")
    slo, shi = lo[order], hi[order]
    overlap_sorted = np.zeros(len(lo), dtype=bool)
    if len(lo) > 1:
        reach = np.maximum.accumulate(shi)
        bad = slo[1:] < reach[:-1]
        overlap_sorted[1:] |= bad
        overlap_sorted[:-1] |= bad
    overlapping = np.zeros(len(lo), dtype=bool)
    overlapping[order] = overlap_sorted
    total = int(lens.sum())
    if total:
        which = np.repeat(np.arange(len(lo)), lens)
        offsets = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        owner[np.repeat(lo, lens) + offsets] = which
    return owner, overlapping


def _union_by_group(groups: np.ndarray, s: np.ndarray, e: np.ndarray, n_groups: int) -> np.ndarray:
    """Length of the union of intervals [s, e) per group id (0..n_groups-1), int64 ns."""
    out = np.zeros(n_groups, dtype=np.int64)
    if not len(groups):
        return out
    order = np.lexsort((s, groups))
    g, s, e = groups[order], s[order], e[order]
    first = np.r_[True, g[1:] != g[:-1]]
    rank = np.cumsum(first) - 1
    base = int(s.min())
    span = int(e.max()) - base + 2
    if _shifts_fit(span, int(rank[-1]) + 1):
        s2 = (s - base) + rank * np.int64(span)
        e2 = (e - base) + rank * np.int64(span)
        prev = np.maximum.accumulate(np.r_[np.int64(-1), e2[:-1]])
        prev = np.where(first, s2, prev)
        contrib = np.maximum(0, e2 - np.maximum(s2, prev))
    else:  # the running end per group, without shifts
        reach = pd.Series(e).groupby(rank, sort=False).cummax().to_numpy(np.int64)
        prev = np.where(first, s, np.r_[np.int64(0), reach[:-1]])
        contrib = np.maximum(0, e - np.maximum(s, prev))
    np.add.at(out, g, contrib)
    return out


def union_length(s: np.ndarray, e: np.ndarray) -> int:
    """Length of the union of the intervals [s, e) (integer times, e.g. ns): the busy time of overlapping
    operations."""
    if not len(s):
        return 0
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    prev = np.maximum.accumulate(np.r_[s[0], e[:-1]])
    return int(np.maximum(0, e - np.maximum(s, prev)).sum())
