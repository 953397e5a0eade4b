"""Checks of the cells of an Nsight Systems export's tables, as read by `nsys_tables.ExportTables`.

Every problem is a `KvscopeError` naming the export as the user gave it (`shown`), the table, the column and the
first offending row (the SQLite rowid, or the 1-based row of a Parquet table): text or true/false where numbers
belong, fractions or infinities where integers belong, empty cells where a value is required, values beyond int64,
rows that end before they start. Nothing is read as a silent default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.inputs import shown_value
from kvscope.errors import KvscopeError


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
