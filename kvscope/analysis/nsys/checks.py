"""Checks of the cells of an Nsight Systems export's tables, as read by `nsys_tables.ExportTables`.

Every problem is a `KvscopeError` naming the export as the user gave it (`shown`), the table, the column and the
first offending row (the SQLite rowid, or the 1-based row of a Parquet table): text or true/false where numbers
belong, fractions or infinities where integers belong, empty cells where a value is required, values beyond int64,
timestamps that are negative or beyond any capture's clock (`MAX_TIMESTAMP_NS`), bytes or numbers where text belongs,
rows that end before they start. Nothing is read as a silent default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.inputs import shown_value
from kvscope.errors import KvscopeError

# an export's timestamps are ns on the capture's clock: none is negative, and none comes near 2**62 ns (146 years),
# below which no difference or sum of a few durations overflows int64
MAX_TIMESTAMP_NS = 2**62
_INT64_END = 2**63  # the first integer beyond int64


def reason(exc: BaseException) -> str:
    """The first line of an exception's message (pyarrow and SQLite messages run over several lines); for pandas'
    wrapper of an SQLite error, the SQLite error's."""
    if isinstance(exc, pd.errors.DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_row(df: pd.DataFrame, bad: np.ndarray) -> object:
    return df["_row"].iloc[int(np.flatnonzero(bad)[0])]


def numbers(shown: Path, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False, integer: bool = True
            ) -> pd.Series:
    """`df[col]` as integers (`Int64`, NA where empty), or as `Float64` when not `integer`. Text and true/false
    are an error naming the table, the column and the row, and for integers so are fractions and infinities;
    empty cells too unless `empty_ok`."""
    kind = "an integer" if integer else "a number"
    raw = df[col]
    if pd.api.types.is_bool_dtype(raw):
        raise KvscopeError(f"{shown}: table {table} column {col} holds true/false values, not numbers")
    num = raw if pd.api.types.is_numeric_dtype(raw) else pd.to_numeric(raw, errors="coerce")
    text = (num.isna() & raw.notna()).to_numpy()
    if text.any():
        i = int(np.flatnonzero(text)[0])
        raise KvscopeError(f"{shown}: table {table} column {col} holds {shown_value(raw.iloc[i])} in row "
                           f"{df['_row'].iloc[i]}, not {kind} (a damaged or foreign table)")
    if integer and pd.api.types.is_float_dtype(num):
        values = num.to_numpy(np.float64, na_value=np.nan)
        bad = ~np.isnan(values) & (~np.isfinite(values) | (values != np.trunc(values)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise KvscopeError(f"{shown}: table {table} column {col} holds {shown_value(values[i])} in row "
                               f"{df['_row'].iloc[i]}, not an integer (a damaged or foreign table)")
        _beyond_int64(shown, df, table, col, values, (values >= _INT64_END) | (values < -_INT64_END))
    if integer and pd.api.types.is_unsigned_integer_dtype(num):
        values = num.to_numpy(np.uint64, na_value=0)
        _beyond_int64(shown, df, table, col, values, values >= np.uint64(_INT64_END))
    try:
        out = num.astype("Int64" if integer else "Float64")
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. uint64 values beyond int64
        raise KvscopeError(f"{shown}: table {table} column {col} holds values out of range ({reason(exc)})"
                           ) from None
    if not empty_ok and out.isna().any():
        empty = out.isna().to_numpy()
        raise KvscopeError(f"{shown}: table {table} column {col} is empty in {int(empty.sum())} row(s) "
                           f"(first: row {_first_row(df, empty)}): a damaged export")
    return out


def ints(shown: Path, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
    """`df[col]` as int64, every cell required (see `numbers`)."""
    return numbers(shown, df, table, col).to_numpy(np.int64)


def check_order(shown: Path, df: pd.DataFrame, table: str, start: np.ndarray, end: np.ndarray) -> None:
    """Every row must end at or after its start."""
    back = end < start
    if back.any():
        raise KvscopeError(f"{shown}: table {table} has {int(back.sum())} row(s) that end before they start "
                           f"(first: row {_first_row(df, back)}): a damaged export")


def _beyond_int64(shown: Path, df: pd.DataFrame, table: str, col: str, values: np.ndarray, bad: np.ndarray) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KvscopeError(f"{shown}: table {table} column {col} holds {shown_value(values[i])} in row "
                           f"{df['_row'].iloc[i]}, beyond the 64-bit integers (a damaged or foreign table)")


def timestamps(shown: Path, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False) -> pd.Series:
    """`df[col]` as timestamps (`Int64`, see `numbers`): from 0 to below `MAX_TIMESTAMP_NS`; a negative one, or one
    beyond any capture's clock (which would overflow the sums of durations), is an error naming the row."""
    out = numbers(shown, df, table, col, empty_ok=empty_ok)
    values = out.to_numpy(np.int64, na_value=0)
    bad = (values < 0) | (values >= MAX_TIMESTAMP_NS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = int(values[i])
        why = "a negative timestamp" if value < 0 else "beyond any capture's clock (2**62 ns, 146 years)"
        raise KvscopeError(f"{shown}: table {table} column {col} holds {value} in row {df['_row'].iloc[i]}, {why}: "
                           "a damaged export")
    return out


def texts(shown: Path, df: pd.DataFrame, table: str, col: str) -> pd.Series:
    """`df[col]` as text: `str` or empty (NA). Bytes that are UTF-8 (a blob, a Parquet binary column) are decoded;
    bytes that are not, or numbers, are an error naming the first such row."""
    raw = df[col]
    if pd.api.types.infer_dtype(raw, skipna=True) in ("string", "empty"):
        return raw
    out = raw.astype(object).copy()
    for i in np.flatnonzero(raw.notna().to_numpy(bool)):
        value = out.iloc[i]
        if isinstance(value, str):
            continue
        try:
            out.iloc[i] = value.decode("utf-8") if isinstance(value, bytes) else None
        except UnicodeDecodeError:
            out.iloc[i] = None
        if out.iloc[i] is None:
            raise not_text(shown, table, col, df["_row"].iloc[i], value)
    return out


def not_text(shown: Path, table: str, col: str, row: object, value: object) -> KvscopeError:
    """The error for a cell of a text column that holds `value` (bytes that are not UTF-8 text, a number)."""
    return KvscopeError(f"{shown}: table {table} column {col} holds {shown_value(value)} in row {row}, not UTF-8 "
                        "text (a damaged or foreign table)")
