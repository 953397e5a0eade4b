"""The files the analysis commands read besides nsys exports and sweep files (`kvscope.analysis.sweep_file`): a run
folder's Parquet files and the align results beside it, read and checked without torch (the profiler writes them;
analysis only reads them).

Every problem ends in a one-line `KvscopeError` naming the path as the user gave it: a file that is missing, empty,
truncated or not Parquet, a table without rows, a missing column, text where numbers belong.

Numbers in a CSV: a cell that is empty or spells a missing value (`nan`, `NaN`, `NA`, `n/a`, `null`, `None`, any
case) is missing; any other text is not a number. `numeric_column` says which, so that a caller can refuse the file
or leave the column out with a note; it never turns text into a category or a silent NaN.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kvscope.errors import KvscopeError
from kvscope.io import read_metadata
from kvscope.schema import (
    KERNEL_CLASSES_FILE,
    NSYS_RUN_SUBFOLDER,
    NVML_FILE,
    RANK_SUMMARY_FILE,
    STEPS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    run_name,
)

MISSING_SPELLINGS = frozenset({"", "nan", "na", "n/a", "null", "none"})
_READ_ERRORS = (OSError, ValueError, pa.ArrowException)


def error_reason(exc: BaseException) -> str:
    """Why `exc` happened, in one line: the system's reason for an OSError, else the first line of its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shown_value(value: object) -> str:
    """A cell as a message shows it: text quoted, numbers plain (not numpy's `np.float64(...)` repr)."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file, or a KvscopeError saying why not (absent, a folder, empty, truncated, not Parquet)."""
    if not path.exists():
        raise KvscopeError(f"{path} is missing")
    if not path.is_file():
        raise KvscopeError(f"{path} is not a file")
    try:
        if path.stat().st_size == 0:
            raise KvscopeError(f"{path} is empty (0 bytes)")
        return pd.read_parquet(path)
    except _READ_ERRORS as exc:
        raise KvscopeError(f"cannot read {path} ({error_reason(exc)}): truncated or not a Parquet file") from None


def require_columns(df: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KvscopeError(f"{path} lacks column(s) {', '.join(missing)} (not {what}, or a damaged one)")


def require_rows(df: pd.DataFrame, path: Path) -> None:
    if not len(df):
        raise KvscopeError(f"{path} has no rows")


@dataclass(frozen=True)
class NumericColumn:
    """A column read as numbers: `values` (a numeric column as it is; a text column as float64, NaN where missing),
    or `problem` when a cell holds text that is not a number (then `values` is None)."""

    values: pd.Series | None
    problem: str | None = None


def numeric_column(df: pd.DataFrame, col: str) -> NumericColumn:
    """`df[col]` as numbers (see NumericColumn). Missing-value spellings become NaN; other text, and true/false,
    make it a problem
    naming the first offending row (1-based data row: row 1 is the CSV line after the header) and value."""
    raw = df[col]
    if pd.api.types.is_bool_dtype(raw):
        return NumericColumn(None, f"column {col} holds true/false values, not numbers")
    if pd.api.types.is_numeric_dtype(raw):
        return NumericColumn(raw)
    text = raw.astype("string").str.strip()
    missing = raw.isna() | text.str.lower().isin(MISSING_SPELLINGS)
    values = pd.to_numeric(text.where(~missing), errors="coerce").astype("float64")
    bad = (values.isna() & ~missing).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return NumericColumn(None, f"column {col} holds {shown_value(raw.iloc[i])} in row {i + 1}, not a number")
    return NumericColumn(values)


def require_numbers(df: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """A copy of `df` with `columns` as numbers (see NumericColumn); text in any of them is an error naming the
    file."""
    out = df.copy()
    for col in columns:
        num = numeric_column(df, col)
        if num.values is None:
            raise KvscopeError(f"{path}: {num.problem} (not {what}, or a damaged one)")
        out[col] = num.values
    return out


def require_ints(df: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """A copy of `df` with `columns` as nullable integers (`Int64`, NA where empty); text, fractions and infinities
    are an error naming the file, the column and the row."""
    out = require_numbers(df, path, columns, what)
    for col in columns:
        v = out[col].to_numpy(np.float64, na_value=np.nan)
        present = ~np.isnan(v)
        bad = present & ~np.isfinite(v)
        bad[present & ~bad] = v[present & ~bad] != np.trunc(v[present & ~bad])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise KvscopeError(f"{path}: column {col} holds {shown_value(df[col].iloc[i])} in row {i + 1}, not a "
                               "whole number")
        out[col] = out[col].astype("Int64")
    return out


def require_positive_ints(df: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """A copy of `df` with `columns` as int64, every value a whole number >= 1."""
    out = require_numbers(df, path, columns, what)
    for col in columns:
        v = out[col].to_numpy(np.float64)
        finite = np.isfinite(v)
        ok = finite & (v >= 1)
        ok[finite] &= v[finite] == np.trunc(v[finite])
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            shown = "an empty cell" if np.isnan(v[i]) else shown_value(df[col].iloc[i])
            raise KvscopeError(f"{path}: column {col} holds {shown} in row {i + 1}; it takes whole numbers >= 1")
        out[col] = v.astype(np.int64)
    return out


# ---- run folders ------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("run_id", "model", "device", "dtype", "attn", "granularity", "batch", "seq_len", "gen_tokens",
                   "reps", "warmup")
TIMINGS_COLUMNS = ("level", "phase", "name", "dur_ms")
# what `kvscope align --timings` joins on and reports
ALIGN_TIMINGS_COLUMNS = ("level", "name", "rep", "step", "batch", "seq_len", "gen_tokens", "start_ms", "dur_ms",
                         "host_enqueue_ms")
_TIMINGS_NUMBERS = ("start_ms", "dur_ms", "host_enqueue_ms")
_TIMINGS_INTS = ("rep", "step", "layer", "batch", "seq_len", "gen_tokens")
RUN_ID_COLUMN = "run_id"
# the metadata entries that tell one run from another (every file of a run carries the same metadata)
RUN_IDENTITY_KEYS = ("created_utc", "command", "device", "model", "dtype", "engine", "run", "git_revision")
_SHOWN_CHARS = 60  # of a metadata value in a message
NO_REGIONS = "none"  # the granularity of a run that times no region (its timings have no rows)


def find_run_folder(source: Path) -> Path:
    """The run folder of `source`: `source` itself, or its `run/` inside a `kvscope nsys` output folder. The error
    names `source` as given."""
    if not source.is_dir():
        raise KvscopeError(f"{source} is not a folder")
    for candidate in (source, source / NSYS_RUN_SUBFOLDER):
        if (candidate / SUMMARY_FILE).exists():
            return candidate
    raise KvscopeError(f"{source} is not a kvscope run folder (no {SUMMARY_FILE} in it or in its "
                       f"{NSYS_RUN_SUBFOLDER}/ subfolder)")


def checked_summary(df: pd.DataFrame, path: Path | str) -> pd.DataFrame:
    """A summary table (as read from `path`) checked: its columns, a row, its shape as whole numbers >= 1."""
    require_columns(df, path, SUMMARY_COLUMNS, "a kvscope summary")
    require_rows(df, path)
    return require_positive_ints(df, path, ("batch", "seq_len", "gen_tokens", "reps"), "a kvscope summary")


def read_timings(run_dir: Path, columns: tuple[str, ...] = TIMINGS_COLUMNS) -> pd.DataFrame:
    """timings.parquet with at least `columns`; its time columns as numbers, its keys (rep, step, ...) as
    integers; checked as `checked_timings` checks."""
    path = run_dir / TIMINGS_FILE
    return checked_timings(read_parquet(path), path, columns)


def checked_timings(df: pd.DataFrame, path: Path | str, columns: tuple[str, ...] = TIMINGS_COLUMNS,
                    rows: bool = True) -> pd.DataFrame:
    """A timings table (as read from `path`, or a DataFrame a caller names by `path`) with at least `columns` (and
    rows, unless `rows` is False: a run at `--granularity none` times no region), its time columns as numbers and its
    keys as integers, checked to be one run's: one `run_id`, start times finite, durations finite and >= 0, each
    region (rank, run, rep, step, name) once. The error names the first bad row."""
    require_columns(df, path, columns, "kvscope timings")
    if rows:
        require_rows(df, path)
    out = require_numbers(df, path, tuple(c for c in _TIMINGS_NUMBERS if c in df.columns), "kvscope timings")
    out = require_ints(out, path, tuple(c for c in _TIMINGS_INTS if c in df.columns), "kvscope timings")
    for col, rule in (("start_ms", "a start time is a finite number"),
                      ("dur_ms", "a duration is a finite number >= 0")):
        if col in out.columns:
            v = out[col].to_numpy(np.float64, na_value=np.nan)
            bad = ~np.isfinite(v) | ((v < 0) if col == "dur_ms" else False)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raw = df[col].iloc[i]
                shown = "an empty cell" if raw is None or raw is pd.NA else shown_value(raw)
                raise KvscopeError(f"{path}: column {col} holds {shown} in row {i + 1}; {rule}")
    if RUN_ID_COLUMN in out.columns:
        _one_run_id(out, path)
    _regions_once(out, path)
    return out


def _one_run_id(df: pd.DataFrame, path: Path | str) -> None:
    ids = df[RUN_ID_COLUMN]
    present = ids.notna().to_numpy(bool)
    if not present.any():
        return
    first = int(np.flatnonzero(present)[0])
    other = _differs(ids, ids.iloc[first])
    if other.any():
        i = int(np.flatnonzero(other)[0])
        raise KvscopeError(f"{path}: row {i + 1} is of run {shown_value(ids.iloc[i])} and row {first + 1} of run "
                           f"{shown_value(ids.iloc[first])}: the timings of one run hold one run_id (two runs' "
                           "timings in one file?)")


def _differs(values: pd.Series, value: object) -> np.ndarray:
    """Where `values` (text) holds something other than `value`; missing cells never differ."""
    text = values.astype("string")
    return (text.notna() & (text != str(value))).fillna(False).to_numpy(bool)


def _regions_once(df: pd.DataFrame, path: Path | str) -> None:
    """Each region once: no two rows with the same (rank, run shape, rep, step, name)."""
    if not {"rep", "step", "name"} <= set(df.columns):
        return  # not enough keys to tell regions apart
    key = [c for c in ("rank", "batch", "seq_len", "gen_tokens", "rep", "step", "name") if c in df.columns]
    repeated = df.duplicated(key, keep="first").to_numpy(bool)
    if not repeated.any():
        return
    i = int(np.flatnonzero(repeated)[0])
    same = (df[key].astype(object).fillna(-1) == df[key].astype(object).fillna(-1).iloc[i]).all(axis=1)
    j = int(np.flatnonzero(same.to_numpy(bool))[0])
    row = df.iloc[i]
    where = ", ".join(f"{k} {row[k]}" for k in ("rank", "rep", "step") if k in df.columns and pd.notna(row[k]))
    raise KvscopeError(f"{path}: rows {j + 1} and {i + 1} are the same region ({shown_value(str(row['name']))}"
                       f"{', ' + where if where else ''}): a run's timings hold each region once (rows repeated, "
                       "or two runs' timings in one file?)")


# ---- one run's files --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """A run folder read and checked (`read_run`): `files`, its Parquet files as on disk by file name (summary,
    timings, and nvml and rank_summary where present); `summary` and `timings` checked, their numbers as numbers;
    `metadata`, the run's (the summary's `kvscope` metadata; None where the summary has none)."""

    path: Path
    files: dict[str, pd.DataFrame]
    summary: pd.DataFrame
    timings: pd.DataFrame
    metadata: dict[str, Any] | None


def read_run(source: Path, timings_columns: tuple[str, ...] = TIMINGS_COLUMNS) -> RunFiles:
    """The run folder of `source` (find_run_folder) read whole: the summary and the timings checked, and every
    file of it (summary, timings, nvml, rank_summary) shown to be of the same run (`check_same_run`)."""
    run_dir = find_run_folder(source)
    files = {SUMMARY_FILE: read_parquet(run_dir / SUMMARY_FILE)}
    summary = checked_summary(files[SUMMARY_FILE], run_dir / SUMMARY_FILE)
    files[TIMINGS_FILE] = read_parquet(run_dir / TIMINGS_FILE)
    untimed = (summary["granularity"].astype("string") == NO_REGIONS).fillna(False).all()  # timings without rows
    timings = checked_timings(files[TIMINGS_FILE], run_dir / TIMINGS_FILE, timings_columns, rows=not untimed)
    for name in (NVML_FILE, RANK_SUMMARY_FILE):
        if (run_dir / name).exists():
            files[name] = read_parquet(run_dir / name)
    return RunFiles(run_dir, files, summary, timings, check_same_run(run_dir, files))


def file_metadata(path: Path) -> dict[str, Any] | None:
    """The `kvscope` metadata of a Parquet file (kvscope.io.write_parquet), None where it has none; metadata that is
    not a JSON object is an error."""
    try:
        meta = read_metadata(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KvscopeError(f"{path}: its kvscope metadata is not JSON (a damaged file)") from None
    except (OSError, pa.ArrowException) as exc:  # before ValueError: pyarrow's errors are ValueErrors too
        raise KvscopeError(f"cannot read {path} ({error_reason(exc)})") from None
    except ValueError:
        return None  # written by another program (or rewritten by one): no metadata to compare
    if not isinstance(meta, dict):
        raise KvscopeError(f"{path}: its kvscope metadata is not a JSON object (a damaged file)")
    return meta


def check_same_run(folder: Path, files: Mapping[str, pd.DataFrame]) -> dict[str, Any] | None:
    """Every file of `files` (tables by file name in `folder`; the first, the summary, is the reference) is of the
    reference's run: its `run_id` column holds the reference's first run_id, and its `kvscope` metadata (where both
    have it) agrees on RUN_IDENTITY_KEYS. Returns the reference's metadata; the error names the file and the first
    row of another run."""
    names = list(files)
    ref_path = folder / names[0]
    ref, ref_meta = files[names[0]], file_metadata(folder / names[0])
    ref_id = ref[RUN_ID_COLUMN].dropna() if RUN_ID_COLUMN in ref.columns else pd.Series([], dtype=object)
    for name in names[1:]:
        path, df = folder / name, files[name]
        if len(ref_id) and RUN_ID_COLUMN in df.columns:
            ids = df[RUN_ID_COLUMN]
            other = _differs(ids, ref_id.iloc[0])
            if other.any():
                i = int(np.flatnonzero(other)[0])
                raise KvscopeError(f"{path}: row {i + 1} is of run {shown_value(ids.iloc[i])}, and {ref_path} of run "
                                   f"{shown_value(ref_id.iloc[0])}: a run folder holds the files of one run (a file "
                                   "copied from another run?)")
        meta = file_metadata(path)
        if ref_meta is None or meta is None:
            continue
        for key in RUN_IDENTITY_KEYS:
            mine, theirs = _meta_text(meta.get(key)), _meta_text(ref_meta.get(key))
            if mine != theirs:
                raise KvscopeError(f"{path} is not of the run of {ref_path}: their kvscope metadata differ in {key} "
                                   f"({_short(mine)} vs {_short(theirs)}); a run folder holds the files of one run (a "
                                   "file copied from another run?)")
    return ref_meta


def _meta_text(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


# ---- align results beside a run folder ------------------------------------------------------------------------
KERNEL_CLASSES_COLUMNS = ("phase", "kernel_class", "ops", "time_ms", "share_pct")
STEPS_COLUMNS = ("phase", "gpu_busy_ms", "gpu_idle_ms", "launch_bound")


def read_align_results(run_dir: Path, summary: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """kernel_classes.parquet and steps.parquet of `kvscope align` written into the run folder, or of `kvscope nsys`
    beside its `run/` folder (DIR/run/ + DIR/*.parquet), their number columns as numbers; None when there are none.
    Present but damaged is an error; so are steps whose run (the export's `run bs=.. seq=.. gen=..` range) is not
    the run of `summary` (the run folder's, checked)."""
    bases = (run_dir, run_dir.parent) if run_dir.name == NSYS_RUN_SUBFOLDER else (run_dir,)
    for base in bases:
        if (base / KERNEL_CLASSES_FILE).exists() and (base / STEPS_FILE).exists():
            break
    else:
        return None
    classes_path, steps_path = base / KERNEL_CLASSES_FILE, base / STEPS_FILE
    classes = read_parquet(classes_path)
    require_columns(classes, classes_path, KERNEL_CLASSES_COLUMNS, "kvscope align kernel classes")
    classes = require_numbers(classes, classes_path, ("ops", "time_ms", "share_pct"), "kvscope align kernel classes")
    steps = read_parquet(steps_path)
    require_columns(steps, steps_path, STEPS_COLUMNS, "kvscope align steps")
    steps = require_numbers(steps, steps_path, ("gpu_busy_ms", "gpu_idle_ms"), "kvscope align steps")
    if summary is not None and "run" in steps.columns:
        row = summary.iloc[0]
        expected = run_name(int(row["batch"]), int(row["seq_len"]), int(row["gen_tokens"]))
        runs = steps["run"]
        other = _differs(runs, expected)
        if other.any():
            i = int(np.flatnonzero(other)[0])
            raise KvscopeError(f"{steps_path}: row {i + 1} is of {shown_value(runs.iloc[i])}, and "
                               f"{run_dir / SUMMARY_FILE} of {expected!r}: these align results are of another run's "
                               "capture")
    return classes, steps
