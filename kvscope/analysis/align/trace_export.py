"""An nsys export as a Chrome/Perfetto trace shaped like a PyTorch profiler (Kineto) trace, so that Perfetto,
chrome://tracing and HolisticTraceAnalysis (HTA) open it. Torch-free.

What the trace holds (`kineto_trace`):
- every NVTX range as a complete event (`ph: X`, `cat: user_annotation`) on its own process and thread (the
  export's pid and tid), its domain and range id in `args`;
- every CUDA API call that launched GPU work (`cat: cuda_runtime`, or `cuda_driver` for a `cu*` driver call) on its
  thread, with `args.correlation`;
- every GPU operation on its device's process (pid = the device index, as Kineto numbers GPUs) and its stream's thread
  (tid = the stream id; with several processes on one device, process index * 10**6 + stream), `cat: kernel`,
  `gpu_memcpy` or `gpu_memset`, with `args.stream`, `args.device` and `args.correlation`;
- a flow arrow (`ph: s` at the call, `ph: f` with `bp: e` at the GPU operation, `cat: ac2g`) from each launch call
  to each operation it launched;
- process and thread names, and the top-level keys HTA reads: `schemaVersion`, `distributedInfo` (`rank`, first, so
  HTA's line scan finds it), `deviceProperties`, `traceEvents`.

Times: `ts` and `dur` in microseconds as floats with nanosecond digits (the export's clock, ns / 1000), as recent
Kineto writes them. HTA rounds such timestamps to whole microseconds unless `HTA_DISABLE_NS_ROUNDING=1` is set
(pytorch/pytorch#122425); with it set, its kernel totals equal kvscope's to the nanosecond.

Correlation ids are unique per trace: nsys's ids repeat across processes, so they are renumbered (1, 2, ...) in
(process, id) order when they collide, and kept as they are otherwise (`args.nsys_correlation` always holds nsys's).
GPU operations are named as in kvscope's kernels table, except copies and sets (`[CUDA memcpy]`, `[CUDA memset]`),
which start with `Memcpy` / `Memset` as Kineto's do, so HTA classes them as memory operations (`trace_op_names`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.schema import NS_PER_US

__all__ = ["GPU_CATEGORIES", "TRACE_MAX_GPU_OPS", "kineto_trace", "kineto_trace_text", "trace_op_names",
           "write_trace"]

GPU_CATEGORIES = {"kernel": "kernel", "memcpy": "gpu_memcpy", "memset": "gpu_memset", "graph": "kernel"}
_MEMORY_PREFIX = {"memcpy": "Memcpy", "memset": "Memset"}
# tid of a stream when several processes' GPU work shares a device: process index * this + stream id
_STREAM_TID_STRIDE = 10**6
# Perfetto/chrome sort processes by this: CPU processes first, then the GPUs
_GPU_SORT_BASE = 10**6
# `kvscope align` writes at most this many GPU operations into trace.json (about 5 trace events each with their
# calls and arrows): Perfetto's JSON importer and HTA's pandas parser slow down far beyond it
TRACE_MAX_GPU_OPS = 100_000


def trace_op_names(kernels: pd.DataFrame) -> pd.Series:
    """The name each GPU operation has in the trace: kvscope's, with `Memcpy ` / `Memset ` before a copy's or set's."""
    names = kernels["name"].astype(object).where(kernels["name"].notna(), "").astype(str)
    kinds = kernels["kind"].astype(str)
    for kind, prefix in _MEMORY_PREFIX.items():
        at = (kinds == kind).to_numpy()
        names[at] = prefix + " " + names[at]
    return names


def kineto_trace(ranges: pd.DataFrame, kernels: pd.DataFrame, calls: pd.DataFrame | None = None,
                 meta: Mapping[str, Any] | None = None, rank: int = 0, max_gpu_ops: int | None = None
                 ) -> dict[str, Any]:
    """The trace as a dict: `kineto_trace_text` parsed."""
    return json.loads(kineto_trace_text(ranges, kernels, calls, meta, rank, max_gpu_ops))


def write_trace(path: Path, ranges: pd.DataFrame, kernels: pd.DataFrame, calls: pd.DataFrame | None = None,
                meta: Mapping[str, Any] | None = None, max_gpu_ops: int | None = TRACE_MAX_GPU_OPS) -> None:
    """`kineto_trace_text` written to `path` (inside a folder written whole, such as `kvscope align`'s)."""
    path.write_text(kineto_trace_text(ranges, kernels, calls, meta, max_gpu_ops=max_gpu_ops))


def kineto_trace_text(ranges: pd.DataFrame, kernels: pd.DataFrame, calls: pd.DataFrame | None = None,
                      meta: Mapping[str, Any] | None = None, rank: int = 0, max_gpu_ops: int | None = None) -> str:
    """The trace (JSON text) of an export's projected `ranges` (`analysis.projection.project(...).ranges`: name,
    domain, pid, tid, start_ns, end_ns, range_id), its GPU operations `kernels` (the kernels table of `kvscope
    align`: kind, name, start_ns, end_ns, device, stream, pid, corr) and its CUDA API `calls` (`NsysExport.calls`:
    corr, pid, global_tid, start_ns, end_ns, name; None: no launch calls and no arrows). `meta` goes under
    `otherData.kvscope`; `rank` is HTA's rank of the trace. With more than `max_gpu_ops` GPU operations only the
    first `max_gpu_ops` (in start order), their calls and the ranges that start before the last of them ends are
    written, and `otherData.kvscope.truncated` says so. Encoded line by line (a million kernels in seconds)."""
    if max_gpu_ops is not None and max_gpu_ops < 0:
        raise ValueError(f"max_gpu_ops must be >= 0, got {max_gpu_ops}")
    info = dict(meta or {})
    if max_gpu_ops is not None and len(kernels) > max_gpu_ops:
        ordered = kernels if kernels["start_ns"].is_monotonic_increasing else kernels.sort_values("start_ns",
                                                                                                   kind="stable")
        kept = ordered.iloc[:max_gpu_ops]
        info["truncated"] = {"gpu_ops_total": len(kernels), "gpu_ops_written": len(kept)}
        if len(kept):
            ranges = ranges.loc[ranges["start_ns"] <= int(kept["end_ns"].max())]
        kernels = kept
    ops = _ops(kernels)
    launches = _launches(ops, calls)
    lines = [*_range_events(ranges), *_call_events(launches), *_gpu_events(ops), *_flow_events(ops, launches),
             *(json.dumps(e) for e in _names(ranges, launches, ops))]
    devices = sorted(int(d) for d in ops["device"].unique())
    head = {"distributedInfo": {"rank": int(rank), "world_size": 1, "backend": ""}, "schemaVersion": 1,
            "deviceProperties": [{"id": d, "name": f"GPU {d}"} for d in devices], "displayTimeUnit": "ms",
            "traceName": "kvscope align", "otherData": {"kvscope": info}}
    # `"rank": 0` with a space, on the first line: HTA finds a trace's rank by scanning lines for that pattern
    return json.dumps(head, default=str)[:-1] + ', "traceEvents": [\n' + ",\n".join(lines) + "\n]}\n"


def _ops(kernels: pd.DataFrame) -> pd.DataFrame:
    """The GPU operations with their trace fields: pid/tid of their track, unique correlation id, category, name."""
    k = kernels
    pid = k["pid"].fillna(-1).to_numpy(np.int64)
    corr = k["corr"].fillna(-1).to_numpy(np.int64)
    stream = k["stream"].fillna(0).to_numpy(np.int64)
    device = k["device"].fillna(0).to_numpy(np.int64)
    processes = np.unique(pid)
    proc_index = np.searchsorted(processes, pid)
    shared = len(processes) > 1
    pairs = pd.DataFrame({"pid": pid, "corr": corr})
    unique_pairs = pairs.drop_duplicates()
    if unique_pairs["corr"].duplicated().any():  # ids repeat across processes: renumber (process, id) pairs
        order = unique_pairs.sort_values(["pid", "corr"]).reset_index(drop=True)
        order["cid"] = np.arange(1, len(order) + 1)
        cid = pairs.merge(order, on=["pid", "corr"], how="left")["cid"].to_numpy(np.int64)
    else:
        cid = corr
    return pd.DataFrame({
        "start_ns": k["start_ns"].to_numpy(np.int64), "end_ns": k["end_ns"].to_numpy(np.int64),
        "pid": pid, "corr": corr, "cid": cid, "device": device, "stream": stream,
        "tid": proc_index * _STREAM_TID_STRIDE + stream if shared else stream,
        "cat": k["kind"].astype(str).map(GPU_CATEGORIES).fillna("kernel").to_numpy(),
        "kind": k["kind"].astype(str).to_numpy(), "name": trace_op_names(k).to_numpy(),
    })


def _launches(ops: pd.DataFrame, calls: pd.DataFrame | None) -> pd.DataFrame:
    """The API calls that launched the operations (one row per call), with their correlation id in the trace."""
    cols = ["pid", "corr", "cid", "tid", "start_ns", "end_ns", "name"]
    if calls is None or not len(calls) or not len(ops):
        return pd.DataFrame({c: pd.Series(dtype="int64" if c != "name" else "object") for c in cols})
    keys = ops[["pid", "corr", "cid"]].drop_duplicates()
    c = pd.DataFrame({"pid": calls["pid"].to_numpy(np.int64), "corr": calls["corr"].to_numpy(np.int64),
                      "tid": calls["global_tid"].to_numpy(np.int64) & 0xFFFFFF,
                      "start_ns": calls["start_ns"].to_numpy(np.int64), "end_ns": calls["end_ns"].to_numpy(np.int64),
                      "name": calls["name"].astype(object).where(calls["name"].notna(), "CUDA API call").to_numpy()})
    if (keys["pid"] < 0).all():  # exports without globalPid on GPU rows: one process, joined on the id alone
        merged = keys.drop(columns="pid").merge(c.drop_duplicates("corr"), on="corr", how="inner")
    else:
        merged = keys.merge(c, on=["pid", "corr"], how="inner")
    return merged[cols].sort_values("start_ns", kind="stable").reset_index(drop=True)


def _quoted(values: pd.Series | np.ndarray) -> list[str]:
    """Each value as a JSON string literal (None/NA as ""), encoded once per distinct value."""
    raw = pd.Series(values, dtype=object).where(pd.notna(values), "").astype(str).tolist()
    cache = {v: json.dumps(v) for v in set(raw)}
    return [cache[v] for v in raw]


def _times(start_ns: pd.Series | np.ndarray, end_ns: pd.Series | np.ndarray) -> tuple[list[float], list[float]]:
    """`ts` and `dur` in microseconds, each from integer nanoseconds (no float subtraction noise)."""
    s, e = np.asarray(start_ns, dtype=np.int64), np.asarray(end_ns, dtype=np.int64)
    return (s / NS_PER_US).tolist(), ((e - s) / NS_PER_US).tolist()


def _range_events(ranges: pd.DataFrame) -> list[str]:
    r = ranges
    ts, dur = _times(r["start_ns"], r["end_ns"])
    return [f'{{"ph":"X","cat":"user_annotation","name":{n},"pid":{p},"tid":{t},"ts":{s!r},"dur":{d!r},'
            f'"args":{{"domain":{dom},"range_id":{i}}}}}'
            for n, p, t, s, d, dom, i in zip(_quoted(r["name"]), r["pid"].astype("int64").tolist(),
                                             r["tid"].astype("int64").tolist(), ts, dur, _quoted(r["domain"]),
                                             r["range_id"].astype("int64").tolist(), strict=True)]


def _call_events(launches: pd.DataFrame) -> list[str]:
    c = launches
    ts, dur = _times(c["start_ns"], c["end_ns"])
    names = [str(n) for n in c["name"].tolist()]
    cats = ["cuda_driver" if n.startswith("cu") and not n.startswith("cuda") else "cuda_runtime" for n in names]
    return [f'{{"ph":"X","cat":"{cat}","name":{n},"pid":{p},"tid":{t},"ts":{s!r},"dur":{d!r},'
            f'"args":{{"correlation":{cid},"nsys_correlation":{k}}}}}'
            for cat, n, p, t, s, d, cid, k in zip(cats, _quoted(np.asarray(names, dtype=object)), c["pid"].tolist(),
                                                  c["tid"].tolist(), ts, dur, c["cid"].tolist(), c["corr"].tolist(),
                                                  strict=True)]


def _gpu_events(ops: pd.DataFrame) -> list[str]:
    o = ops
    ts, dur = _times(o["start_ns"], o["end_ns"])
    return [f'{{"ph":"X","cat":"{cat}","name":{n},"pid":{dev},"tid":{t},"ts":{s!r},"dur":{d!r},'
            f'"args":{{"device":{dev},"stream":{st},"correlation":{cid},"nsys_correlation":{k},"kind":"{kind}"}}}}'
            for cat, n, dev, t, s, d, st, cid, k, kind in zip(
                o["cat"].tolist(), _quoted(o["name"]), o["device"].tolist(), o["tid"].tolist(), ts, dur,
                o["stream"].tolist(), o["cid"].tolist(), o["corr"].tolist(), o["kind"].tolist(), strict=True)]


def _flow_events(ops: pd.DataFrame, launches: pd.DataFrame) -> list[str]:
    """One arrow per GPU operation from the call that launched it (a graph launch: one arrow per node)."""
    if not len(launches):
        return []
    m = ops[["cid", "device", "tid", "start_ns"]].reset_index(drop=True).merge(
        launches[["cid", "pid", "tid", "start_ns"]], on="cid", how="inner", suffixes=("", "_call"))
    ts_op, ts_call = (m["start_ns"].to_numpy(np.int64) / NS_PER_US).tolist(), \
        (m["start_ns_call"].to_numpy(np.int64) / NS_PER_US).tolist()
    out: list[str] = []
    for i, (dev, t, s, cp, ct, cs) in enumerate(zip(m["device"].tolist(), m["tid"].tolist(), ts_op,
                                                    m["pid"].tolist(), m["tid_call"].tolist(), ts_call, strict=True),
                                                start=1):
        out.append(f'{{"ph":"s","id":{i},"pid":{cp},"tid":{ct},"ts":{cs!r},"cat":"ac2g","name":"ac2g"}}')
        out.append(f'{{"ph":"f","id":{i},"pid":{dev},"tid":{t},"ts":{s!r},"cat":"ac2g","name":"ac2g","bp":"e"}}')
    return out


def _names(ranges: pd.DataFrame, launches: pd.DataFrame, ops: pd.DataFrame) -> list[dict[str, Any]]:
    """process_name / thread_name / process_sort_index metadata of every track."""
    out: list[dict[str, Any]] = []
    cpu = pd.concat([ranges[["pid", "tid"]].astype("int64"), launches[["pid", "tid"]].astype("int64")])
    for pid in sorted(set(cpu["pid"].tolist())):
        out.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"process {pid}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
    for pid, tid in sorted(set(zip(cpu["pid"].tolist(), cpu["tid"].tolist(), strict=True))):
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"thread {tid}"}})
    tracks = ops[["device", "tid", "stream", "pid"]].drop_duplicates()
    for d in sorted(set(tracks["device"].tolist())):
        out.append({"ph": "M", "name": "process_name", "pid": d, "args": {"name": f"GPU {d}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": d, "args": {"sort_index": _GPU_SORT_BASE + d}})
    shared = tracks["pid"].nunique() > 1
    for d, tid, stream, pid in tracks.itertuples(index=False):
        label = f"stream {stream}" + (f" (pid {pid})" if shared else "")
        out.append({"ph": "M", "name": "thread_name", "pid": d, "tid": tid, "args": {"name": label}})
    return out
