"""Read an Nsight Systems export: SQLite (`nsys export --type sqlite`), a Parquet directory (`--type parquetdir`), or
an `.nsys-rep` (exported to SQLite through nsys when nsys can be found).

Parsing only: this module turns the export's tables into three DataFrames with plain column names and decoded ids
(`ranges`, `calls`, `gpu_ops`) plus the export's metadata. Analyses live in their own modules.

Exports from nsys 2022 to 2026 differ: optional tables and columns are tolerated (an absent table is read as "none of
those"), and a missing required table is named in the error.

A damaged or foreign export ends in a `KvscopeError` naming the path the user gave and the table: a file that is not
SQLite or is empty, a Parquet table that is truncated, a folder or not Parquet, a table without a required column,
text or empty cells where integers belong, GPU operations or API calls that end before they start, string ids
with no `StringIds` table or missing from it. Nothing is read as a silent default.
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
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.analysis.inputs import shown_value
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
STRINGS_TABLE = "StringIds"
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
# tables of which an nsys export holds at least one
_NSYS_MARKERS = frozenset({STRINGS_TABLE, "META_DATA_EXPORT", "EXPORT_META_DATA", NVTX_TABLE, RUNTIME_TABLE})
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, sqlite3.Error, pd.errors.DatabaseError)
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
def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (pyarrow and SQLite messages run over several lines); for pandas'
    wrapper of an SQLite error, the SQLite error's."""
    if isinstance(exc, pd.errors.DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_sqlite_header(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


class _Tables:
    """Column-selective reads from either export format. `path` is where the tables are read from, `shown` how
    messages name the export (the path the user gave: for an .nsys-rep, not its temporary SQLite export)."""

    def __init__(self, path: Path, shown: Path) -> None:
        self.path = path
        self.shown = shown
        self._con: sqlite3.Connection | None = None
        if path.is_dir():
            self.fmt = "parquetdir"
            try:
                self.names = frozenset(p.name.removesuffix(".parquet") for p in path.glob("*.parquet"))
            except OSError as exc:
                raise KvscopeError(f"{shown}: cannot list the folder ({exc.strerror or exc})") from None
            if not self.names & _NSYS_MARKERS:
                raise KvscopeError(f"{shown} is not an nsys parquetdir export (none of its tables)")
            return
        self.fmt = "sqlite"
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise KvscopeError(f"{shown}: cannot read the export ({exc.strerror or exc})") from None
        if size == 0:
            raise KvscopeError(f"{shown} is not an nsys export (an empty file)")
        try:
            self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            rows = self._con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        except sqlite3.Error as exc:
            self.close()
            if _has_sqlite_header(path):
                raise KvscopeError(f"{shown}: a damaged SQLite database ({_reason(exc)}): a truncated or damaged "
                                   "export") from None
            raise KvscopeError(f"{shown} is not an nsys export (not an SQLite database: {_reason(exc)})") from None
        self.names = frozenset(r[0] for r in rows)
        if not self.names & _NSYS_MARKERS:
            self.close()
            raise KvscopeError(f"{shown} is not an nsys export (an SQLite database without any of its tables)")

    def _parquet(self, table: str) -> Path:
        file = self.path / f"{table}.parquet"
        if not file.is_file():
            raise KvscopeError(f"{self.shown}: table {table} ({file.name}) is not a file")
        return file

    def _damaged(self, table: str, exc: BaseException) -> KvscopeError:
        return KvscopeError(f"{self.shown}: table {table} cannot be read ({_reason(exc)}): a truncated, damaged or "
                            "foreign export")

    def columns(self, table: str) -> list[str]:
        try:
            if self._con is None:
                return pq.read_schema(self._parquet(table)).names
            return [r[1] for r in self._con.execute(f'PRAGMA table_info("{table}")')]
        except _READ_ERRORS as exc:
            raise self._damaged(table, exc) from None

    def read(self, table: str, wanted: list[str], required: tuple[str, ...] = ()) -> pd.DataFrame:
        """The columns of `wanted` that the table has (missing required ones are an error); a row-id column
        `_row` (1-based, the SQLite rowid) is added."""
        have = set(self.columns(table))
        missing = [c for c in required if c not in have]
        if missing:
            raise KvscopeError(f"{self.shown}: table {table} lacks column(s) {', '.join(missing)} (a damaged or "
                               "foreign table)")
        cols = [c for c in wanted if c in have]
        try:
            if self._con is None:
                df = pq.read_table(self._parquet(table), columns=cols).to_pandas()
                df.insert(0, "_row", np.arange(1, len(df) + 1, dtype=np.int64))
                return df
            sel = ", ".join(["rowid AS _row", *[f'"{c}"' for c in cols]])
            return pd.read_sql_query(f'SELECT {sel} FROM "{table}"', self._con)
        except _READ_ERRORS as exc:
            raise self._damaged(table, exc) from None

    def numbers(self, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False, integer: bool = True
                ) -> pd.Series:
        """`df[col]` as integers (`Int64`, NA where empty), or as `Float64` when not `integer`. Text and true/false
        are an error naming the table, the column and the row, and for integers so are fractions and infinities;
        empty cells too unless `empty_ok`."""
        kind = "an integer" if integer else "a number"
        raw = df[col]
        if pd.api.types.is_bool_dtype(raw):
            raise KvscopeError(f"{self.shown}: table {table} column {col} holds true/false values, not numbers")
        num = raw if pd.api.types.is_numeric_dtype(raw) else pd.to_numeric(raw, errors="coerce")
        text = (num.isna() & raw.notna()).to_numpy()
        if text.any():
            i = int(np.flatnonzero(text)[0])
            raise KvscopeError(f"{self.shown}: table {table} column {col} holds {shown_value(raw.iloc[i])} in row "
                               f"{df['_row'].iloc[i]}, not {kind} (a damaged or foreign table)")
        if integer and pd.api.types.is_float_dtype(num):
            values = num.to_numpy(np.float64, na_value=np.nan)
            bad = ~np.isnan(values) & (~np.isfinite(values) | (values != np.trunc(values)))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise KvscopeError(f"{self.shown}: table {table} column {col} holds {shown_value(values[i])} in row "
                                   f"{df['_row'].iloc[i]}, not an integer (a damaged or foreign table)")
        try:
            out = num.astype("Int64" if integer else "Float64")
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. uint64 values beyond int64
            raise KvscopeError(f"{self.shown}: table {table} column {col} holds values out of range ({_reason(exc)})"
                               ) from None
        if not empty_ok and out.isna().any():
            first = df["_row"].iloc[int(np.flatnonzero(out.isna().to_numpy())[0])]
            raise KvscopeError(f"{self.shown}: table {table} column {col} is empty in {int(out.isna().sum())} row(s) "
                               f"(first: row {first}): a damaged export")
        return out

    def ints(self, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
        """`df[col]` as int64, every cell required (see `numbers`)."""
        return self.numbers(df, table, col).to_numpy(np.int64)

    def check_order(self, df: pd.DataFrame, table: str, start: np.ndarray, end: np.ndarray) -> None:
        """Every row must end at or after its start."""
        back = end < start
        if back.any():
            first = df["_row"].iloc[int(np.flatnonzero(back)[0])]
            raise KvscopeError(f"{self.shown}: table {table} has {int(back.sum())} row(s) that end before they start "
                               f"(first: row {first}): a damaged export")

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


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
    """Export an `.nsys-rep` to SQLite through nsys; returns the SQLite path (`out`, or a file in a new temporary
    folder that the caller removes). Messages name `rep`, never the SQLite path, which may be temporary."""
    exe = find_nsys(nsys)
    if exe is None:
        raise KvscopeError(f"{rep} is an .nsys-rep; exporting it needs nsys, which was not found (--nsys PATH or "
                           "$NSYS), or pass an export made with `nsys export --type sqlite`")
    target = out or Path(tempfile.mkdtemp(prefix="kvscope-export-")) / (rep.stem + ".sqlite")
    try:
        proc = subprocess.run([exe, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(target),
                               str(rep)], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise KvscopeError(f"nsys export of {rep} failed: cannot run {exe} ({exc.strerror or exc})") from None
    if proc.returncode != 0 or not target.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        # nsys names its output file; that file is ours (and perhaps temporary), not the user's
        last = last.replace(str(target), "the SQLite output").replace(str(target.parent), "the output folder")
        raise KvscopeError(f"nsys export of {rep} failed (exit code {proc.returncode}): {last}")
    return target


def load_export(path: str | Path, nsys: str | None = None) -> NsysExport:
    """Read an export (SQLite file, parquetdir folder, or .nsys-rep: exported to a temporary SQLite file, read,
    and removed). `source` of the result and every message name `path` as given."""
    path = Path(path)
    if not path.exists():
        raise KvscopeError(f"export not found: {path}")
    if path.is_file() and path.suffix == ".nsys-rep":
        with tempfile.TemporaryDirectory(prefix="kvscope-export-") as tmp:
            return _read(export_rep(path, nsys, out=Path(tmp) / (path.stem + ".sqlite")), shown=path)
    return _read(path, shown=path)


def _read(path: Path, shown: Path) -> NsysExport:
    tables = _Tables(path, shown)
    try:
        return _load(tables)
    finally:
        tables.close()


def _load(t: _Tables) -> NsysExport:
    names = t.names
    if NVTX_TABLE not in names:
        raise KvscopeError(f"{t.shown}: export has no NVTX_EVENTS table (no NVTX ranges: profile with -t cuda,nvtx "
                           "and keep NVTX on)")
    gpu_present = [tab for tab in _GPU_TABLES if tab in names]
    if not gpu_present:
        raise KvscopeError(f"{t.shown}: export has no GPU kernels (no CUPTI_ACTIVITY_KIND_KERNEL table: profile with "
                           "-t cuda)")
    if RUNTIME_TABLE not in names:
        raise KvscopeError(f"{t.shown}: export has no CUPTI_ACTIVITY_KIND_RUNTIME table (CUDA API calls)")
    meta = _meta(t)
    strings = _Strings(t)
    gpu_ops = _gpu_ops(t, gpu_present, strings)
    calls = _calls(t, strings)
    ranges = _ranges(t, strings, last_ns=_last_timestamp(calls, gpu_ops))
    return NsysExport(t.shown, t.fmt, meta, ranges, calls, gpu_ops, names)


def _meta(t: _Tables) -> dict[str, str]:
    for table in ("META_DATA_EXPORT", "EXPORT_META_DATA"):
        if table in t.names:
            df = t.read(table, ["name", "value"], required=("name", "value"))
            return {str(k): str(v) for k, v in zip(df["name"], df["value"], strict=True)}
    return {}


class _Strings:
    """The export's string table (`StringIds`), read on first use: an export whose rows refer to strings must have
    it, and every id they use must be in it."""

    def __init__(self, t: _Tables) -> None:
        self._t = t
        self._values: pd.Series | None = None

    def _table(self, table: str, col: str) -> pd.Series:
        if self._values is None:
            t = self._t
            if STRINGS_TABLE not in t.names:
                raise KvscopeError(f"{t.shown}: export has no {STRINGS_TABLE} table, which {table}.{col} refers to "
                                   "for names (a damaged or partial export)")
            df = t.read(STRINGS_TABLE, ["id", "value"], required=("id", "value"))
            ids = t.ints(df, STRINGS_TABLE, "id")
            dup = pd.Series(ids).duplicated().to_numpy()
            if dup.any():
                raise KvscopeError(f"{t.shown}: table {STRINGS_TABLE} holds id {int(ids[dup][0])} more than once (a "
                                   "damaged export)")
            self._values = pd.Series(df["value"].to_numpy(), index=ids)
        return self._values

    def lookup(self, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
        """Text of the string ids in `df[col]`; empty ids give None, ids missing from the table are an error."""
        ids = self._t.numbers(df, table, col, empty_ok=True)
        out = np.full(len(ids), None, dtype=object)
        valid = ids.notna().to_numpy()
        if not valid.any():
            return out
        strings = self._table(table, col)
        wanted = ids[valid].to_numpy(np.int64)
        known = np.isin(wanted, strings.index.to_numpy())
        if not known.all():
            raise KvscopeError(f"{self._t.shown}: {int((~known).sum())} row(s) of {table}.{col} refer to string ids "
                               f"missing from {STRINGS_TABLE} (first: {int(wanted[~known][0])}): a damaged export")
        out[valid] = strings.reindex(wanted).to_numpy()
        return out


def _gpu_ops(t: _Tables, tables: list[str], strings: _Strings) -> pd.DataFrame:
    frames = []
    for table in tables:
        kind = _GPU_TABLES[table]
        want = ["start", "end", "deviceId", "streamId", "correlationId", "globalPid", "demangledName", "shortName",
                "graphNodeId", "graphId", "bytes"]
        df = t.read(table, want, required=("start", "end", "correlationId"))
        start, end = t.ints(df, table, "start"), t.ints(df, table, "end")
        t.check_order(df, table, start, end)
        if kind == "kernel":
            name_col = "demangledName" if "demangledName" in df else "shortName" if "shortName" in df else None
            names = strings.lookup(df, table, name_col) if name_col else np.full(len(df), "kernel", dtype=object)
        else:
            names = np.full(len(df), f"[CUDA {kind}]", dtype=object)
        frames.append(pd.DataFrame({
            "kind": kind,
            "start_ns": start,
            "end_ns": end,
            "device": t.ints(df, table, "deviceId") if "deviceId" in df else 0,
            "stream": t.ints(df, table, "streamId") if "streamId" in df else 0,
            "corr": t.ints(df, table, "correlationId"),
            "pid": pid_of(t.ints(df, table, "globalPid")) if "globalPid" in df else -1,
            "name": names,
            "graph_node_id": t.numbers(df, table, "graphNodeId", empty_ok=True) if "graphNodeId" in df else pd.NA,
            "bytes": t.numbers(df, table, "bytes", empty_ok=True) if "bytes" in df else pd.NA,
        }))
    ops = pd.concat(frames, ignore_index=True)
    ops["kind"] = ops["kind"].astype("string")
    ops["name"] = ops["name"].astype("string")
    return ops.sort_values(["start_ns", "end_ns"], kind="stable").reset_index(drop=True)


def _calls(t: _Tables, strings: _Strings) -> pd.DataFrame:
    table = RUNTIME_TABLE
    df = t.read(table, ["start", "end", "globalTid", "correlationId", "nameId"],
                required=("start", "end", "globalTid", "correlationId"))
    start, end = t.ints(df, table, "start"), t.ints(df, table, "end")
    t.check_order(df, table, start, end)
    gtid = t.ints(df, table, "globalTid")
    calls = pd.DataFrame({
        "corr": t.ints(df, table, "correlationId"),
        "pid": pid_of(gtid),
        "global_tid": gtid,
        "start_ns": start,
        "end_ns": end,
        "name": strings.lookup(df, table, "nameId") if "nameId" in df else None,
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


def _ranges(t: _Tables, strings: _Strings, last_ns: int) -> pd.DataFrame:
    table = NVTX_TABLE
    want = ["start", "end", "eventType", "text", "textId", "domainId", "globalTid", "endGlobalTid", "category",
            "int64Value", "uint64Value", "int32Value", "uint32Value", "doubleValue"]
    ev = t.read(table, want, required=("start", "eventType", "globalTid"))
    ev_type = t.ints(ev, table, "eventType")
    # only ranges and domain names are used: other events (marks, category and thread names) may lack columns
    used = np.isin(ev_type, [*_RANGE_STYLE, NVTX_DOMAIN_CREATE])
    ev, ev_type = ev.loc[used].reset_index(drop=True), ev_type[used]
    gtid_all = t.ints(ev, table, "globalTid")
    pid = pid_of(gtid_all)
    domain_id = t.numbers(ev, table, "domainId", empty_ok=True).fillna(0).to_numpy(np.int64) if "domainId" in ev \
        else np.zeros(len(ev), np.int64)
    text = ev["text"].astype(object).where(ev["text"].notna(), None).to_numpy() if "text" in ev else \
        np.full(len(ev), None, dtype=object)
    if "textId" in ev:  # registered strings: resolve through StringIds; inline text wins where both exist
        resolved = strings.lookup(ev, table, "textId")
        text = np.where(pd.isna(text), resolved, text)

    # domain names per process, from the domain-create events
    is_dom = ev_type == NVTX_DOMAIN_CREATE
    dom_map = {(int(p), int(d)): (n or "") for p, d, n in zip(pid[is_dom], domain_id[is_dom], text[is_dom],
                                                              strict=True)}

    keep = np.isin(ev_type, list(_RANGE_STYLE))
    r = ev.loc[keep]
    rp, rd = pid[keep], domain_id[keep]
    start = t.ints(r, table, "start")
    end = t.numbers(r, table, "end", empty_ok=True) if "end" in r else pd.Series(pd.NA, index=r.index, dtype="Int64")
    closed = end.notna().to_numpy()
    end_ns = np.where(closed, end.fillna(0).to_numpy(np.int64), last_ns).astype(np.int64)
    t.check_order(r.loc[closed], table, start[closed], end_ns[closed])
    gtid = gtid_all[keep]
    end_gtid = t.numbers(r, table, "endGlobalTid", empty_ok=True).fillna(-1).to_numpy(np.int64) \
        if "endGlobalTid" in r else np.full(len(r), -1, dtype=np.int64)
    payload = pd.Series(pd.NA, index=r.index, dtype="Float64")
    for col in ("int64Value", "uint64Value", "int32Value", "uint32Value", "doubleValue"):
        if col in r:
            payload = payload.fillna(t.numbers(r, table, col, empty_ok=True, integer=False))
    ranges = pd.DataFrame({
        "range_id": r["_row"].to_numpy(np.int64),
        "name": pd.array(text[keep], dtype="string"),
        "domain": pd.array([dom_map.get((int(p), int(d)), "") if d else "" for p, d in zip(rp, rd, strict=True)],
                           dtype="string"),
        "style": pd.array([_RANGE_STYLE[int(x)] for x in ev_type[keep]], dtype="string"),
        "global_tid": gtid,
        "end_global_tid": end_gtid,
        "pid": rp,
        "tid": tid_of(gtid),
        "start_ns": start,
        "end_ns": end_ns,
        "closed": closed,
        "category": t.numbers(r, table, "category", empty_ok=True).to_numpy() if "category" in r else pd.NA,
        "payload": payload.to_numpy(),
    })
    return ranges.reset_index(drop=True)
