"""Read an Nsight Systems export: SQLite (`nsys export --type sqlite`), a Parquet directory (`--type parquetdir`), or
an `.nsys-rep` (exported to SQLite through nsys when nsys can be found).

Parsing only: this module turns the export's tables into three DataFrames with plain column names and decoded ids
(`ranges`, `calls`, `gpu_ops`) plus the export's metadata. Analyses live in their own modules.

Exports from nsys 2022 to 2026 differ: optional tables and columns are tolerated (an absent table is read as "none of
those"), and a missing required table is named in the error.

A damaged or foreign export ends in a `KvscopeError` naming the path the user gave and the table: a file that is not
SQLite or is empty, a Parquet table that is truncated, a folder or not Parquet, a table without a required column,
text or empty cells where integers belong, timestamps that are negative or beyond any capture's clock, names that
are not UTF-8 text, GPU operations or API calls that end before they start, string ids with no `StringIds` table or
missing from it, and names that cannot be there: an NVTX table with neither a `text` nor a `textId` column, or whose
every range is nameless, a kernel table with neither a `demangledName` nor a `shortName` column, NVTX domains created
without a `domainId` column to place ranges in them. Nothing is read as a silent default.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.nsys.tables import META_TABLES, NVTX_TABLE, RUNTIME_TABLE, STRINGS_TABLE, ExportTables
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
_GPU_TABLES = {KERNEL_TABLE: "kernel", MEMCPY_TABLE: "memcpy", MEMSET_TABLE: "memset", GRAPH_TRACE_TABLE: "graph"}
_NSYS_CANDIDATES = ("/opt/nvidia/nsight-systems", "/opt/nvidia/nsight-compute", "/usr/local/cuda/bin",
                    "/usr/local/cuda", "/opt/nvidia")
# NVTX_EVENTS' columns of an event's text: inline, or a StringIds id
_TEXT_COLUMNS = ("text", "textId")
# NVTX payload columns, in the order a range's payload is taken from them
_PAYLOAD_COLUMNS = ("int64Value", "uint64Value", "int32Value", "uint32Value", "doubleValue")


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
      corr, pid, name (the demangled name, else the short one), short_name, demangled_name, graph_node_id, bytes.
      Empty (with these columns) for an export without CUDA data; so is calls.
    """

    source: Path
    fmt: str
    meta: dict[str, str]
    ranges: pd.DataFrame
    calls: pd.DataFrame
    gpu_ops: pd.DataFrame

    @property
    def nsys_version(self) -> str:
        return self.meta.get("EXPORT_PRODUCT_VERSION", "unknown")

    @property
    def schema_version(self) -> str:
        return self.meta.get("EXPORT_SCHEMA_VERSION", "unknown")


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
    tables = ExportTables(path, shown)
    try:
        return _load(tables)
    finally:
        tables.close()


def _load(t: ExportTables) -> NsysExport:
    names = t.names
    if NVTX_TABLE not in names:
        raise KvscopeError(f"{t.shown}: export has no NVTX_EVENTS table (no NVTX ranges: profile with -t cuda,nvtx "
                           "and keep NVTX on)")
    gpu_present = [tab for tab in _GPU_TABLES if tab in names]
    if gpu_present and RUNTIME_TABLE not in names:
        raise KvscopeError(f"{t.shown}: export has no CUPTI_ACTIVITY_KIND_RUNTIME table (CUDA API calls), which its "
                           "GPU operations need")
    meta = _meta(t)
    strings = _Strings(t)
    # an export without CUDA data (a program that ran no kernel, or profiled without -t cuda) has ranges only
    gpu_ops = _gpu_ops(t, gpu_present, strings) if gpu_present else _no_gpu_ops()
    calls = _calls(t, strings) if RUNTIME_TABLE in names else _no_calls()
    ranges = _ranges(t, strings)
    return NsysExport(t.shown, t.fmt, meta, ranges, calls, gpu_ops)


def _meta(t: ExportTables) -> dict[str, str]:
    for table in META_TABLES:
        if table in t.names:
            df = t.read(table, ["name", "value"], required=("name", "value"))
            return {str(k): str(v) for k, v in zip(df["name"], df["value"], strict=True)}
    return {}


class _Strings:
    """The export's string table (`StringIds`), read on first use: an export whose rows refer to strings must have
    it, and every id they use must be in it."""

    def __init__(self, t: ExportTables) -> None:
        self._t = t
        self._values: pd.Series | None = None

    def _table(self, table: str, col: str) -> pd.Series:
        if self._values is None:
            t = self._t
            if STRINGS_TABLE not in t.names:
                raise KvscopeError(f"{t.shown}: export has no {STRINGS_TABLE} table, which {table}.{col} refers to "
                                   "for names (a damaged or partial export)")
            df = t.read(STRINGS_TABLE, ["id", "value"], required=("id", "value"))
            values = t.texts(df, STRINGS_TABLE, "value")
            ids = t.ints(df, STRINGS_TABLE, "id")
            dup = pd.Series(ids).duplicated().to_numpy()
            if dup.any():
                raise KvscopeError(f"{t.shown}: table {STRINGS_TABLE} holds id {int(ids[dup][0])} more than once (a "
                                   "damaged export)")
            self._values = pd.Series(values.to_numpy(), index=ids)
        return self._values

    def lookup(self, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
        """Text of the string ids in `df[col]`; empty ids give None, ids missing from the table are an error."""
        codes, text = self.codes(df, table, col)
        return np.append(text, None)[codes]  # code -1 (no id): None

    def strings(self, df: pd.DataFrame, table: str, col: str) -> pd.api.extensions.ExtensionArray:
        """`lookup` as a string array (NA for no id), built by one take from the distinct texts."""
        codes, text = self.codes(df, table, col)
        return pd.array(text, dtype="string").take(codes, allow_fill=True)

    def codes(self, df: pd.DataFrame, table: str, col: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes, texts): the text of row i is texts[codes[i]], none where codes[i] is -1."""
        ids = self._t.numbers(df, table, col, empty_ok=True)
        if not ids.notna().any():
            return np.full(len(ids), -1, dtype=np.int64), np.empty(0, dtype=object)
        strings = self._table(table, col)
        codes, uniques = pd.factorize(ids, use_na_sentinel=True)  # each distinct id looked up once
        wanted = np.asarray(uniques, dtype=np.int64)
        known = np.isin(wanted, strings.index.to_numpy())
        if not known.all():
            missing = np.isin(ids.to_numpy(np.int64, na_value=-1), wanted[~known])
            raise KvscopeError(f"{self._t.shown}: {int(missing.sum())} row(s) of {table}.{col} refer to string ids "
                               f"missing from {STRINGS_TABLE} (first: {int(wanted[~known][0])}): a damaged export")
        return codes.astype(np.int64), strings.reindex(wanted).to_numpy(dtype=object)


def _gpu_ops(t: ExportTables, tables: list[str], strings: _Strings) -> pd.DataFrame:
    frames = []
    for table in tables:
        kind = _GPU_TABLES[table]
        want = ["start", "end", "deviceId", "streamId", "correlationId", "globalPid", "demangledName", "shortName",
                "graphNodeId", "bytes"]
        df = t.read(table, want, required=("start", "end", "correlationId"))
        if kind == "kernel" and "demangledName" not in df and "shortName" not in df:
            raise KvscopeError(f"{t.shown}: table {table} has neither a demangledName nor a shortName column (the "
                               "kernels' names): a damaged or foreign table")
        start, end = _times(t, df, table)
        none = _same_string(None, len(df))
        demangled = strings.strings(df, table, "demangledName") if kind == "kernel" and "demangledName" in df \
            else none
        short = strings.strings(df, table, "shortName") if kind == "kernel" and "shortName" in df else none
        names = demangled.fillna(short).fillna("kernel") if kind == "kernel" else \
            _same_string(f"[CUDA {kind}]", len(df))
        frames.append(pd.DataFrame({
            "kind": _same_string(kind, len(df)),
            "start_ns": start,
            "end_ns": end,
            "device": t.ints(df, table, "deviceId") if "deviceId" in df else 0,
            "stream": t.ints(df, table, "streamId") if "streamId" in df else 0,
            "corr": t.ints(df, table, "correlationId"),
            "pid": pid_of(t.ints(df, table, "globalPid")) if "globalPid" in df else -1,
            "name": names,
            "short_name": short,
            "demangled_name": demangled,
            "graph_node_id": t.numbers(df, table, "graphNodeId", empty_ok=True) if "graphNodeId" in df else pd.NA,
            "bytes": t.numbers(df, table, "bytes", empty_ok=True) if "bytes" in df else pd.NA,
        }))
    ops = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    order = np.lexsort((ops["end_ns"].to_numpy(), ops["start_ns"].to_numpy()))  # stable: by start, then end
    if (order != np.arange(len(order))).any():
        ops = ops.take(order)
    return ops.reset_index(drop=True)


def _calls(t: ExportTables, strings: _Strings) -> pd.DataFrame:
    table = RUNTIME_TABLE
    df = t.read(table, ["start", "end", "globalTid", "correlationId", "nameId"],
                required=("start", "end", "globalTid", "correlationId"))
    start, end = _times(t, df, table)
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


def _times(t: ExportTables, df: pd.DataFrame, table: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every row of `df`, checked timestamps; no row ends before it starts."""
    start = t.timestamps(df, table, "start").to_numpy(np.int64)
    end = t.timestamps(df, table, "end").to_numpy(np.int64)
    t.check_order(df, table, start, end)
    return start, end


def _same_string(value: str | None, n: int) -> pd.api.extensions.ExtensionArray:
    """A string array of `n` times `value` (NA for None), made by one take."""
    return pd.array([value], dtype="string").take(np.zeros(n, dtype=np.int64))


def _no_gpu_ops() -> pd.DataFrame:
    return pd.DataFrame({
        "kind": pd.array([], dtype="string"), "start_ns": np.empty(0, np.int64), "end_ns": np.empty(0, np.int64),
        "device": np.empty(0, np.int64), "stream": np.empty(0, np.int64), "corr": np.empty(0, np.int64),
        "pid": np.empty(0, np.int64), "name": pd.array([], dtype="string"),
        "short_name": pd.array([], dtype="string"), "demangled_name": pd.array([], dtype="string"),
        "graph_node_id": pd.array([], dtype="Int64"), "bytes": pd.array([], dtype="Int64"),
    })


def _no_calls() -> pd.DataFrame:
    return pd.DataFrame({"corr": np.empty(0, np.int64), "pid": np.empty(0, np.int64),
                         "global_tid": np.empty(0, np.int64), "start_ns": np.empty(0, np.int64),
                         "end_ns": np.empty(0, np.int64), "name": pd.array([], dtype="string")})


def _ranges(t: ExportTables, strings: _Strings) -> pd.DataFrame:
    """One row per NVTX range (see NsysExport.ranges). A range never closed ends, as in nsys's own projection
    report, at the latest start or end of any NVTX range of the export."""
    table = NVTX_TABLE
    want = ["start", "end", "eventType", "text", "textId", "domainId", "globalTid", "endGlobalTid", "category",
            *_PAYLOAD_COLUMNS]
    ev = t.read(table, want, required=("start", "eventType", "globalTid"))
    if not any(c in ev for c in _TEXT_COLUMNS):
        raise KvscopeError(f"{t.shown}: table {table} has neither a text nor a textId column (the ranges' names): a "
                           "damaged or foreign table")
    ev_type = t.ints(ev, table, "eventType")
    # only ranges and domain names are used: other events (marks, category and thread names) may lack columns
    used = np.isin(ev_type, [*_RANGE_STYLE, NVTX_DOMAIN_CREATE])
    ev, ev_type = ev.loc[used].reset_index(drop=True), ev_type[used]
    gtid_all = t.ints(ev, table, "globalTid")
    pid = pid_of(gtid_all)
    domain_id = t.numbers(ev, table, "domainId", empty_ok=True).fillna(0).to_numpy(np.int64) if "domainId" in ev \
        else np.zeros(len(ev), np.int64)
    text = _event_text(t, strings, ev)
    is_dom = ev_type == NVTX_DOMAIN_CREATE
    domains = {(int(p), int(d)): (n or "") for p, d, n in zip(pid[is_dom], domain_id[is_dom], text[is_dom],
                                                              strict=True)}
    keep = np.isin(ev_type, list(_RANGE_STYLE))
    _check_names(t, ev, is_dom, keep, text)
    r = ev.loc[keep]
    rp, rd = pid[keep], domain_id[keep]
    start, end_ns, closed = _range_ends(t, r)
    gtid = gtid_all[keep]
    end_gtid = t.numbers(r, table, "endGlobalTid", empty_ok=True).fillna(-1).to_numpy(np.int64) \
        if "endGlobalTid" in r else np.full(len(r), -1, dtype=np.int64)
    payload = _payload(t, r)
    ranges = pd.DataFrame({
        "range_id": r["_row"].to_numpy(np.int64),
        "name": pd.array(text[keep], dtype="string"),
        "domain": pd.array([domains.get((int(p), int(d)), "") if d else "" for p, d in zip(rp, rd, strict=True)],
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


def _check_names(t: ExportTables, ev: pd.DataFrame, is_dom: np.ndarray, keep: np.ndarray, text: np.ndarray) -> None:
    """The NVTX events' names make sense: domains created (`is_dom`) can be referred to (a domainId column), and
    the ranges (`keep`) are not every one of them nameless (a renamed or emptied name column)."""
    table = NVTX_TABLE
    if is_dom.any() and "domainId" not in ev:
        raise KvscopeError(f"{t.shown}: table {table} lacks column domainId, which its {int(is_dom.sum())} row(s) "
                           f"creating NVTX domains (first: row {ev['_row'].iloc[int(np.flatnonzero(is_dom)[0])]}) need "
                           "to place the ranges in them: a damaged or foreign table")
    if keep.any() and pd.isna(text[keep]).all():
        cols = [c for c in _TEXT_COLUMNS if c in ev]
        where = f"column {cols[0]} is" if len(cols) == 1 else f"columns {' and '.join(cols)} are"
        absent = "".join(f"; no column {c}" for c in _TEXT_COLUMNS if c not in ev)
        raise KvscopeError(f"{t.shown}: table {table}: none of its {int(keep.sum())} ranges has a name ({where} empty "
                           f"in all of their rows, first: row {ev['_row'].iloc[int(np.flatnonzero(keep)[0])]}"
                           f"{absent}): a damaged or foreign table")


def _event_text(t: ExportTables, strings: _Strings, ev: pd.DataFrame) -> np.ndarray:
    """Each NVTX event's text: inline, or a registered string resolved through StringIds (inline text wins where
    both exist); None where it has neither."""
    if "text" in ev:
        inline = t.texts(ev, NVTX_TABLE, "text")
        text = inline.astype(object).where(inline.notna(), None).to_numpy()
    else:
        text = np.full(len(ev), None, dtype=object)
    if "textId" in ev:
        resolved = strings.lookup(ev, NVTX_TABLE, "textId")
        text = np.where(pd.isna(text), resolved, text)
    return text


def _range_ends(t: ExportTables, r: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start_ns, end_ns, closed) of the ranges `r`; an open range (no end) ends at the latest start or end of
    the ranges (nsys's `nvtx_gpu_proj_trace` takes `max(max(start), max(end))` over the NVTX ranges)."""
    table = NVTX_TABLE
    start = t.timestamps(r, table, "start").to_numpy(np.int64)
    end = t.timestamps(r, table, "end", empty_ok=True) if "end" in r else \
        pd.Series(pd.NA, index=r.index, dtype="Int64")
    closed = end.notna().to_numpy()
    ends = end.fillna(0).to_numpy(np.int64)
    last_ns = max(int(start.max()) if len(start) else 0, int(ends[closed].max()) if closed.any() else 0)
    end_ns = np.where(closed, ends, last_ns).astype(np.int64)
    t.check_order(r.loc[closed], table, start[closed], end_ns[closed])
    return start, end_ns, closed


def _payload(t: ExportTables, r: pd.DataFrame) -> pd.Series:
    """Each range's payload (Float64, NA where none), from the first payload column that holds one."""
    payload = pd.Series(pd.NA, index=r.index, dtype="Float64")
    for col in _PAYLOAD_COLUMNS:
        if col in r:
            payload = payload.fillna(t.numbers(r, NVTX_TABLE, col, empty_ok=True, integer=False))
    return payload
