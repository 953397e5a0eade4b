"""The tables of an Nsight Systems export, read column by column from either format: an SQLite file
(`nsys export --type sqlite`) or a Parquet directory (`--type parquetdir`).

A file or folder that is not an nsys export, or cannot be read, is a `KvscopeError` naming the path the user gave
(`shown`: for an .nsys-rep, not its temporary SQLite export) and, once open, the table. The cells are checked by
`nsys_checks`; `ExportTables.numbers`, `.ints` and `.check_order` apply those checks with the export's name.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.analysis.nsys import checks as nsys_checks
from kvscope.analysis.nsys.checks import reason
from kvscope.errors import KvscopeError

NVTX_TABLE = "NVTX_EVENTS"
RUNTIME_TABLE = "CUPTI_ACTIVITY_KIND_RUNTIME"
STRINGS_TABLE = "StringIds"
META_TABLES = ("META_DATA_EXPORT", "EXPORT_META_DATA")  # the export's metadata, by the name of its nsys version
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
# tables of which an nsys export holds at least one
_NSYS_MARKERS = frozenset({STRINGS_TABLE, *META_TABLES, NVTX_TABLE, RUNTIME_TABLE})
_NULL_INT = np.iinfo(np.int64).min  # stands for NULL in the fast read of integer columns (never a timestamp or id)
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, sqlite3.Error, pd.errors.DatabaseError)


def _has_sqlite_header(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


class ExportTables:
    """Column-selective reads from either export format. `path` is where the tables are read from, `shown` how
    messages name the export. `names`: the tables it holds. Close it when done (SQLite keeps a connection)."""

    def __init__(self, path: Path, shown: Path) -> None:
        self.path = path
        self.shown = shown
        self._con: sqlite3.Connection | None = None
        if path.is_dir():
            self.fmt = "parquetdir"
            self.names = self._parquet_names()
        else:
            self.fmt = "sqlite"
            self.names = self._sqlite_names()
        if not self.names & _NSYS_MARKERS:
            self.close()
            if self.fmt == "parquetdir":
                raise KvscopeError(f"{shown} is not an nsys parquetdir export (none of its tables)")
            raise KvscopeError(f"{shown} is not an nsys export (an SQLite database without any of its tables)")

    def _parquet_names(self) -> frozenset[str]:
        try:
            return frozenset(p.name.removesuffix(".parquet") for p in self.path.glob("*.parquet"))
        except OSError as exc:
            raise KvscopeError(f"{self.shown}: cannot list the folder ({exc.strerror or exc})") from None

    def _sqlite_names(self) -> frozenset[str]:
        path, shown = self.path, self.shown
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
                raise KvscopeError(f"{shown}: a damaged SQLite database ({reason(exc)}): a truncated or damaged "
                                   "export") from None
            raise KvscopeError(f"{shown} is not an nsys export (not an SQLite database: {reason(exc)})") from None
        return frozenset(r[0] for r in rows)

    def _parquet(self, table: str) -> Path:
        file = self.path / f"{table}.parquet"
        if not file.is_file():
            raise KvscopeError(f"{self.shown}: table {table} ({file.name}) is not a file")
        return file

    def _damaged(self, table: str, exc: BaseException) -> KvscopeError:
        return KvscopeError(f"{self.shown}: table {table} cannot be read ({reason(exc)}): a truncated, damaged or "
                            "foreign export")

    def columns(self, table: str) -> list[str]:
        try:
            if self._con is None:
                return pq.read_schema(self._parquet(table)).names
            return [r[1] for r in self._con.execute(f'PRAGMA table_info("{table}")')]
        except _READ_ERRORS as exc:
            raise self._damaged(table, exc) from None

    def read(self, table: str, wanted: list[str], required: tuple[str, ...] = (), integers: bool = False
             ) -> pd.DataFrame:
        """The columns of `wanted` that the table has (missing required ones are an error); a row-id column
        `_row` (1-based, the SQLite rowid) is added. `integers`: every wanted column holds integers (or NULL), so
        an SQLite table whose cells all do is read on the fast path (`_sqlite_integers`)."""
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
            fast = self._sqlite_integers(table, cols) if integers else None
            if fast is not None:
                return fast
            sel = ", ".join(["rowid AS _row", *[f'"{c}"' for c in cols]])
            return pd.read_sql_query(f'SELECT {sel} FROM "{table}"', self._con)
        except _READ_ERRORS as exc:
            raise self._damaged(table, exc) from None

    def _sqlite_integers(self, table: str, cols: list[str]) -> pd.DataFrame | None:
        """Integer columns of an SQLite table read fast: SQLite writes each column as one comma-separated text
        (group_concat, in rowid order) that numpy parses in C, instead of a Python object per cell (3-4x faster on
        a million kernels). Only when one scan finds no cell that is neither an integer nor NULL; otherwise None,
        and the caller reads the table the checked way, which names the offending cell."""
        con = self._con
        if con is None or not cols:
            return None
        odd = " OR ".join(f"typeof(\"{c}\") NOT IN ('integer', 'null')" for c in cols)
        if con.execute(f'SELECT 1 FROM "{table}" WHERE {odd} LIMIT 1').fetchone() is not None:
            return None
        n = int(con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
        out = {}
        for name, expr in (("_row", "rowid"), *[(c, f'"{c}"') for c in cols]):
            text = con.execute(f"SELECT group_concat(ifnull({expr}, {_NULL_INT}), ',') FROM (SELECT {expr} FROM "
                               f'"{table}" ORDER BY rowid)').fetchone()[0]
            values = np.fromstring(text or "", dtype=np.int64, sep=",")
            if len(values) != n:
                return None
            null = values == _NULL_INT
            out[name] = pd.arrays.IntegerArray(values, null) if null.any() else values
        return pd.DataFrame(out)

    # ---- cells, checked (nsys_checks) with the export's name -------------------------------------------------
    def numbers(self, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False, integer: bool = True
                ) -> pd.Series:
        return nsys_checks.numbers(self.shown, df, table, col, empty_ok=empty_ok, integer=integer)

    def ints(self, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
        return nsys_checks.ints(self.shown, df, table, col)

    def check_order(self, df: pd.DataFrame, table: str, start: np.ndarray, end: np.ndarray) -> None:
        nsys_checks.check_order(self.shown, df, table, start, end)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
