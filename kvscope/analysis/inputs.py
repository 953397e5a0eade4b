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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from kvscope.errors import KvscopeError
from kvscope.schema import (
    KERNEL_CLASSES_FILE,
    NSYS_RUN_SUBFOLDER,
    STEPS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
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


def read_summary(run_dir: Path) -> pd.DataFrame:
    path = run_dir / SUMMARY_FILE
    df = read_parquet(path)
    require_columns(df, path, SUMMARY_COLUMNS, "a kvscope summary")
    require_rows(df, path)
    return require_positive_ints(df, path, ("batch", "seq_len", "gen_tokens", "reps"), "a kvscope summary")


def read_timings(run_dir: Path, columns: tuple[str, ...] = TIMINGS_COLUMNS) -> pd.DataFrame:
    """timings.parquet with at least `columns`; its time columns as numbers, its keys (rep, step, ...) as
    integers."""
    path = run_dir / TIMINGS_FILE
    df = read_parquet(path)
    require_columns(df, path, columns, "kvscope timings")
    require_rows(df, path)
    df = require_numbers(df, path, tuple(c for c in _TIMINGS_NUMBERS if c in df.columns), "kvscope timings")
    return require_ints(df, path, tuple(c for c in _TIMINGS_INTS if c in df.columns), "kvscope timings")


# ---- align results beside a run folder ------------------------------------------------------------------------
KERNEL_CLASSES_COLUMNS = ("phase", "kernel_class", "ops", "time_ms", "share_pct")
STEPS_COLUMNS = ("phase", "gpu_busy_ms", "gpu_idle_ms", "launch_bound")


def read_align_results(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """kernel_classes.parquet and steps.parquet of `kvscope nsys` (DIR/run/ + DIR/*.parquet) or `kvscope align`
    written into the run folder, their number columns as numbers; None when there are none. Present but damaged
    is an error."""
    for base in (run_dir, run_dir.parent):
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
    return classes, steps
