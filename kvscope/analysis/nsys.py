"""Read an Nsight Systems export: SQLite (`nsys export --type sqlite`), a Parquet directory (`--type parquetdir`), or
an `.nsys-rep` (exported to SQLite through nsys when nsys can be found).

Parsing only: this module turns the export's tables into three DataFrames with plain column names and decoded ids
(`ranges`, `calls`, `gpu_ops`) plus the export's metadata. Analyses live in their own modules.

Exports from nsys 2022 to 2026 differ: optional tables and columns are tolerated (an absent table is read as "none of
those"), and a missing required table is named in the error.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from kvscope.errors import KvscopeError

# NVTX_EVENTS.eventType
NVTX_PUSHPOP = 59
NVTX_STARTEND = 60
NVTXT_PUSHPOP = 70
NVTXT_STARTEND = 71
NVTX_DOMAIN_CREATE = 75
_RANGE_STYLE = {NVTX_PUSHPOP: "PushPop", NVTX_STARTEND: "StartEnd", NVTXT_PUSHPOP: "PushPop",
                NVTXT_STARTEND: "StartEnd"}
_TID_MASK = 0xFFFFFF
_PID_SHIFT = 24

KERNEL_TABLE = "CUPTI_ACTIVITY_KIND_KERNEL"
MEMCPY_TABLE = "CUPTI_ACTIVITY_KIND_MEMCPY"
MEMSET_TABLE = "CUPTI_ACTIVITY_KIND_MEMSET"
GRAPH_TRACE_TABLE = "CUPTI_ACTIVITY_KIND_GRAPH_TRACE"
RUNTIME_TABLE = "CUPTI_ACTIVITY_KIND_RUNTIME"
NVTX_TABLE = "NVTX_EVENTS"
_GPU_TABLES = {KERNEL_TABLE: "kernel", MEMCPY_TABLE: "memcpy", MEMSET_TABLE: "memset", GRAPH_TRACE_TABLE: "graph"}
_NSYS_CANDIDATES = ("/opt/nvidia/nsight-systems", "/opt/nvidia/nsight-compute", "/usr/local/cuda/bin",
                    "/usr/local/cuda", "/opt/nvidia")


def pid_of(global_tid: np.ndarray | pd.Series) -> np.ndarray:
    return (np.asarray(global_tid, dtype=np.int64) >> _PID_SHIFT) & _TID_MASK


def tid_of(global_tid: np.ndarray | pd.Series) -> np.ndarray:
    return np.asarray(global_tid, dtype=np.int64) & _TID_MASK


@dataclass
class NsysExport:
    """An export reduced to what kvscope analyses.

    ranges: one row per NVTX range (push/pop, start/end and their NVTXT forms): range_id (the NVTX_EVENTS row id,
      as nsys's own reports number ranges), name (message without domain), domain, style, global_tid, end_global_tid,
      pid, tid, start_ns, end_ns (NaN-free: a range never closed ends at the capture's last timestamp), closed,
      category, payload.
    calls: one row per CUDA runtime/driver API call (outermost row per correlation id and process): corr, pid,
      global_tid, start_ns, end_ns, name.
    gpu_ops: one row per GPU operation: kind (kernel, memcpy, memset, graph), start_ns, end_ns, device, stream,
      corr, pid, name, graph_node_id, bytes.
    """

    source: Path
    fmt: str
    meta: dict[str, str]
    ranges: pd.DataFrame
    calls: pd.DataFrame
    gpu_ops: pd.DataFrame
    tables: frozenset[str] = field(default_factory=frozenset)

    @property
    def nsys_version(self) -> str:
        return self.meta.get("EXPORT_PRODUCT_VERSION", "unknown")

    @property
    def schema_version(self) -> str:
        return self.meta.get("EXPORT_SCHEMA_VERSION", "unknown")


# ---- table access ----------------------------------------------------------------------------------------------
class _Tables:
    """Column-selective reads from either export format."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            self.fmt = "parquetdir"
            self.names = frozenset(p.stem for p in path.glob("*.parquet"))
            if not self.names & {"StringIds", "META_DATA_EXPORT", "EXPORT_META_DATA", NVTX_TABLE, RUNTIME_TABLE}:
                raise KvscopeError(f"{path} is not an nsys parquetdir export (none of its tables)")
            self._con = None
        else:
            self.fmt = "sqlite"
            try:
                self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                rows = self._con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            except sqlite3.DatabaseError:
                raise KvscopeError(f"{path} is not an nsys export (not an SQLite database)") from None
            self.names = frozenset(r[0] for r in rows)

    def columns(self, table: str) -> list[str]:
        if self.fmt == "parquetdir":
            return pq.read_schema(self.path / f"{table}.parquet").names
        return [r[1] for r in self._con.execute(f"PRAGMA table_info({table})")]

    def read(self, table: str, wanted: list[str], required: tuple[str, ...] = ()) -> pd.DataFrame:
        """The columns of `wanted` that the table has (missing required ones are an error); a row-id column
        `_row` (1-based, the SQLite rowid) is added."""
        have = set(self.columns(table))
        missing = [c for c in required if c not in have]
        if missing:
            raise KvscopeError(f"{self.path}: table {table} lacks column(s) {', '.join(missing)}")
        cols = [c for c in wanted if c in have]
        if self.fmt == "parquetdir":
            df = pq.read_table(self.path / f"{table}.parquet", columns=cols).to_pandas()
            df.insert(0, "_row", np.arange(1, len(df) + 1, dtype=np.int64))
            return df
        sel = ", ".join(["rowid AS _row", *[f'"{c}"' for c in cols]])
        return pd.read_sql_query(f"SELECT {sel} FROM {table}", self._con)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


# ---- loading ---------------------------------------------------------------------------------------------------
def find_nsys(explicit: str | None = None) -> str | None:
    """nsys from the flag, `$NSYS`, PATH, or the usual install folders (the copy inside an Nsight Compute install
    too)."""
    for cand in (explicit, os.environ.get("NSYS")):
        if cand:
            return cand if Path(cand).is_file() else shutil.which(cand)
    on_path = shutil.which("nsys")
    if on_path:
        return on_path
    found: list[Path] = []
    for root in _NSYS_CANDIDATES:
        base = Path(root)
        if base.is_dir():
            found += [p for p in base.glob("**/nsys") if p.is_file() and os.access(p, os.X_OK)]
    return str(sorted(found)[-1]) if found else None


def export_rep(rep: Path, nsys: str | None = None, out: Path | None = None) -> Path:
    """Export an `.nsys-rep` to SQLite through nsys; returns the SQLite path."""
    exe = find_nsys(nsys)
    if exe is None:
        raise KvscopeError(f"{rep} is an .nsys-rep; exporting it needs nsys, which was not found (--nsys PATH or "
                           "$NSYS), or pass an export made with `nsys export --type sqlite`")
    target = out or Path(tempfile.mkdtemp(prefix="kvscope-export-")) / (rep.stem + ".sqlite")
    proc = subprocess.run([exe, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(target),
                           str(rep)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not target.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KvscopeError(f"nsys export of {rep} failed: {last[0]}")
    return target


def load_export(path: str | Path, nsys: str | None = None) -> NsysExport:
    """Read an export (SQLite file, parquetdir folder, or .nsys-rep)."""
    path = Path(path)
    if not path.exists():
        raise KvscopeError(f"export not found: {path}")
    if path.is_file() and path.suffix == ".nsys-rep":
        path = export_rep(path, nsys)
    tables = _Tables(path)
    try:
        return _load(tables)
    finally:
        tables.close()


def _load(t: _Tables) -> NsysExport:
    names = t.names
    if NVTX_TABLE not in names:
        raise KvscopeError(f"{t.path}: export has no NVTX_EVENTS table (no NVTX ranges: profile with -t cuda,nvtx "
                           "and keep NVTX on)")
    gpu_present = [tab for tab in _GPU_TABLES if tab in names]
    if not gpu_present:
        raise KvscopeError(f"{t.path}: export has no GPU kernels (no CUPTI_ACTIVITY_KIND_KERNEL table: profile with "
                           "-t cuda)")
    if RUNTIME_TABLE not in names:
        raise KvscopeError(f"{t.path}: export has no CUPTI_ACTIVITY_KIND_RUNTIME table (CUDA API calls)")
    meta = _meta(t)
    strings = _strings(t)
    gpu_ops = _gpu_ops(t, gpu_present, strings)
    calls = _calls(t, strings)
    ranges = _ranges(t, strings, last_ns=_last_timestamp(calls, gpu_ops))
    return NsysExport(t.path, t.fmt, meta, ranges, calls, gpu_ops, names)


def _meta(t: _Tables) -> dict[str, str]:
    for table in ("META_DATA_EXPORT", "EXPORT_META_DATA"):
        if table in t.names:
            df = t.read(table, ["name", "value"], required=("name", "value"))
            return {str(k): str(v) for k, v in zip(df["name"], df["value"], strict=True)}
    return {}


def _strings(t: _Tables) -> pd.Series:
    if "StringIds" not in t.names:
        return pd.Series(dtype="object")
    df = t.read("StringIds", ["id", "value"], required=("id", "value"))
    return pd.Series(df["value"].to_numpy(), index=df["id"].astype(np.int64).to_numpy())


def _lookup(strings: pd.Series, ids: pd.Series) -> np.ndarray:
    """Map string ids to text; NaN/absent ids give None."""
    out = np.full(len(ids), None, dtype=object)
    valid = ids.notna().to_numpy()
    if valid.any() and len(strings):
        out[valid] = strings.reindex(ids[valid].astype(np.int64).to_numpy()).to_numpy()
    return out


def _gpu_ops(t: _Tables, tables: list[str], strings: pd.Series) -> pd.DataFrame:
    frames = []
    for table in tables:
        kind = _GPU_TABLES[table]
        want = ["start", "end", "deviceId", "streamId", "correlationId", "globalPid", "demangledName", "shortName",
                "graphNodeId", "graphId", "bytes"]
        df = t.read(table, want, required=("start", "end", "correlationId"))
        if kind == "kernel":
            name_ids = df["demangledName"] if "demangledName" in df else df.get("shortName")
            names = _lookup(strings, name_ids) if name_ids is not None else np.full(len(df), "kernel", dtype=object)
        else:
            names = np.full(len(df), f"[CUDA {kind}]", dtype=object)
        frames.append(pd.DataFrame({
            "kind": kind,
            "start_ns": df["start"].to_numpy(np.int64),
            "end_ns": df["end"].to_numpy(np.int64),
            "device": df["deviceId"].to_numpy(np.int64) if "deviceId" in df else 0,
            "stream": df["streamId"].to_numpy(np.int64) if "streamId" in df else 0,
            "corr": df["correlationId"].to_numpy(np.int64),
            "pid": pid_of(df["globalPid"]) if "globalPid" in df else -1,
            "name": names,
            "graph_node_id": df["graphNodeId"].astype("Int64") if "graphNodeId" in df else pd.NA,
            "bytes": df["bytes"].astype("Int64") if "bytes" in df else pd.NA,
        }))
    ops = pd.concat(frames, ignore_index=True)
    ops["kind"] = ops["kind"].astype("string")
    ops["name"] = ops["name"].astype("string")
    return ops.sort_values(["start_ns", "end_ns"], kind="stable").reset_index(drop=True)


def _calls(t: _Tables, strings: pd.Series) -> pd.DataFrame:
    df = t.read(RUNTIME_TABLE, ["start", "end", "globalTid", "correlationId", "nameId"],
                required=("start", "end", "globalTid", "correlationId"))
    calls = pd.DataFrame({
        "corr": df["correlationId"].to_numpy(np.int64),
        "pid": pid_of(df["globalTid"]),
        "global_tid": df["globalTid"].to_numpy(np.int64),
        "start_ns": df["start"].to_numpy(np.int64),
        "end_ns": df["end"].to_numpy(np.int64),
        "name": _lookup(strings, df["nameId"]) if "nameId" in df else None,
    })
    # old exports hold two nested rows for one launch (e.g. cudaLaunchKernel and cudaLaunchKernel_v7000): keep the
    # outermost span per (process, correlation id)
    calls = calls.sort_values(["pid", "corr", "start_ns", "end_ns"], ascending=[True, True, True, False],
                              kind="stable")
    calls = calls.drop_duplicates(["pid", "corr"], keep="first")
    calls["name"] = calls["name"].astype("string")
    return calls.sort_values(["global_tid", "start_ns"], kind="stable").reset_index(drop=True)


def _last_timestamp(calls: pd.DataFrame, ops: pd.DataFrame) -> int:
    ends = [int(x.max()) for x in (calls["end_ns"], ops["end_ns"]) if len(x)]
    return max(ends) if ends else 0


def _ranges(t: _Tables, strings: pd.Series, last_ns: int) -> pd.DataFrame:
    want = ["start", "end", "eventType", "text", "textId", "domainId", "globalTid", "endGlobalTid", "category",
            "int64Value", "uint64Value", "int32Value", "uint32Value", "doubleValue"]
    ev = t.read(NVTX_TABLE, want, required=("start", "eventType", "globalTid"))
    ev_type = ev["eventType"].to_numpy(np.int64)
    pid = pid_of(ev["globalTid"])
    domain_id = ev["domainId"].fillna(0).to_numpy(np.int64) if "domainId" in ev else np.zeros(len(ev), np.int64)
    text = ev["text"].astype(object).where(ev["text"].notna(), None).to_numpy() if "text" in ev else \
        np.full(len(ev), None, dtype=object)
    if "textId" in ev:  # registered strings: resolve through StringIds; inline text wins where both exist
        resolved = _lookup(strings, ev["textId"])
        text = np.where(pd.isna(text), resolved, text)

    # domain names per process, from the domain-create events
    is_dom = ev_type == NVTX_DOMAIN_CREATE
    dom_map = {(int(p), int(d)): (n or "") for p, d, n in zip(pid[is_dom], domain_id[is_dom], text[is_dom],
                                                              strict=True)}

    keep = np.isin(ev_type, list(_RANGE_STYLE))
    r = ev.loc[keep]
    rp, rd = pid[keep], domain_id[keep]
    end = r["end"] if "end" in r else pd.Series(np.nan, index=r.index)
    closed = end.notna().to_numpy()
    gtid = r["globalTid"].to_numpy(np.int64)
    end_gtid = r["endGlobalTid"] if "endGlobalTid" in r else pd.Series(np.nan, index=r.index)
    end_gtid_arr = end_gtid.fillna(-1).to_numpy(np.int64)
    payload = pd.Series(pd.NA, index=r.index, dtype="Float64")
    for col in ("int64Value", "uint64Value", "int32Value", "uint32Value", "doubleValue"):
        if col in r:
            payload = payload.fillna(r[col].astype("Float64"))
    ranges = pd.DataFrame({
        "range_id": r["_row"].to_numpy(np.int64),
        "name": pd.array(text[keep], dtype="string"),
        "domain": pd.array([dom_map.get((int(p), int(d)), "") if d else "" for p, d in zip(rp, rd, strict=True)],
                           dtype="string"),
        "style": pd.array([_RANGE_STYLE[int(x)] for x in ev_type[keep]], dtype="string"),
        "global_tid": gtid,
        "end_global_tid": end_gtid_arr,
        "pid": rp,
        "tid": tid_of(gtid),
        "start_ns": r["start"].to_numpy(np.int64),
        "end_ns": np.where(closed, end.fillna(0).to_numpy(np.float64), last_ns).astype(np.int64),
        "closed": closed,
        "category": r["category"].astype("Int64").to_numpy() if "category" in r else pd.NA,
        "payload": payload.to_numpy(),
    })
    return ranges.reset_index(drop=True)
