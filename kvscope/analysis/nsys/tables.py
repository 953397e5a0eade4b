"""The tables of an Nsight Systems export, read column by column from either format: an SQLite file
(`nsys export --type sqlite`) or a Parquet directory (`--type parquetdir`).

A file or folder that is not an nsys export, or cannot be read, is a `KvscopeError` naming the path the user gave
(`shown`: for an .nsys-rep, not its temporary SQLite export) and, once open, the table. The cells are checked by
`nsys_checks`; `ExportTables.numbers`, `.ints`, `.timestamps`, `.texts` and `.check_order` apply those checks with
the export's name.

An SQLite file is opened read-only through a percent-encoded URI (`sqlite_uri`): a name holding `#`, `?` or `%` is
that file's, and nothing is ever created in its place. In WAL journal mode with no changes left in its `-wal` file
it is opened as immutable, so that nothing is created beside it and a read-only folder is no obstacle; with changes
there, SQLite must create its `-shm` file beside it, and where it cannot the error says so and what to do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
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
_HEADER_BYTES = 100  # an SQLite file's header
# tables of which an nsys export holds at least one
_NSYS_MARKERS = frozenset({STRINGS_TABLE, *META_TABLES, NVTX_TABLE, RUNTIME_TABLE})
_NULL_INT = np.iinfo(np.int64).min  # stands for NULL in the fast read of integer columns (never a timestamp or id)
_NULL_SQL = f"({_NULL_INT + 1} - 1)"  # the same in SQL, as an integer (the literal -9223372036854775808 is a real)
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, sqlite3.Error, pd.errors.DatabaseError)
# Parquet integer columns as pandas' nullable integers: exact where cells are empty (not float64, exact to 2**53 only)
_NULLABLE_INTS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                  pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                  pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}


def sqlite_uri(path: Path, immutable: bool = False) -> str:
    """The URI that opens the SQLite file `path` read-only (a missing file is an error, never created): the path
    percent-encoded, so that `#`, `?` and `%` in a name are the name's (`exp#1.sqlite` is not `exp`). `immutable`:
    SQLite neither locks the file nor creates anything beside it."""
    return path.absolute().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")


def _header(path: Path, shown: Path) -> bytes:
    """The first 100 bytes of a file (an SQLite file's header); a file that cannot be read is a KvscopeError."""
    try:
        with path.open("rb") as f:
            return f.read(_HEADER_BYTES)
    except OSError as exc:
        raise KvscopeError(f"{shown}: cannot read the export ({exc.strerror or exc})") from None


def _is_wal(header: bytes) -> bool:
    """Whether an SQLite header says WAL journal mode (its read and write format versions, bytes 18 and 19, are 2)."""
    return header.startswith(SQLITE_MAGIC) and header[18:20] == b"\x02\x02"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
        header = _header(path, shown)
        wal = path.with_name(path.name + "-wal")
        # WAL journal mode: SQLite reads such a file by creating `-shm` and `-wal` files beside it, which it cannot in
        # a read-only folder; with no changes left in a `-wal` file the file alone is the database, read as immutable
        pending = _is_wal(header) and _size(wal) > 0
        try:
            self._con = sqlite3.connect(sqlite_uri(path, immutable=_is_wal(header) and not pending), uri=True)
            rows = self._con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        except sqlite3.Error as exc:
            self.close()
            if pending and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CANTOPEN:
                shm = path.name + "-shm"
                raise KvscopeError(
                    f"{shown}: an SQLite export in WAL journal mode whose last changes are in {wal.name}, which SQLite "
                    f"reads only by creating {shm} beside it, and it cannot ({reason(exc)}: is the folder "
                    f"read-only?): copy {path.name} and {wal.name} together to a writable folder, or checkpoint it "
                    f"where it is writable (sqlite3 {path.name} 'PRAGMA wal_checkpoint(TRUNCATE)')") from None
            if header.startswith(SQLITE_MAGIC):
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

    def read(self, table: str, wanted: list[str], required: tuple[str, ...] = ()) -> pd.DataFrame:
        """The columns of `wanted` that the table has (missing required ones are an error); a row-id column
        `_row` (1-based, the SQLite rowid) is added. Integers are read exactly (empty cells as NA, never through a
        float), text as `str`; text that is not UTF-8 is an error naming its row."""
        have = set(self.columns(table))
        missing = [c for c in required if c not in have]
        if missing:
            raise KvscopeError(f"{self.shown}: table {table} lacks column(s) {', '.join(missing)} (a damaged or "
                               "foreign table)")
        cols = [c for c in wanted if c in have]
        try:
            return self._sqlite_read(table, cols) if self._con is not None else self._parquet_read(table, cols)
        except _READ_ERRORS as exc:
            raise self._damaged(table, exc) from None

    def _parquet_read(self, table: str, cols: list[str]) -> pd.DataFrame:
        data = pq.read_table(self._parquet(table), columns=cols)
        for name, column in zip(data.column_names, data.columns, strict=True):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                try:
                    column.validate(full=True)
                except pa.ArrowInvalid:  # bytes that are not UTF-8 in a text column
                    binary = column.cast(pa.large_binary()).to_pylist()
                    raise self._not_utf8(table, name, enumerate(binary, start=1)) from None
        df = data.to_pandas(types_mapper=_NULLABLE_INTS.get)  # integer columns with empty cells stay integers
        df.insert(0, "_row", np.arange(1, len(df) + 1, dtype=np.int64))
        return df

    def _sqlite_read(self, table: str, cols: list[str]) -> pd.DataFrame:
        """The integer columns on the fast path (`_sqlite_integers`), the others through pandas, in rowid order."""
        fast = self._sqlite_integers(table, cols)
        rest = [c for c in cols if c not in fast]
        if rest or not fast:
            sel = ", ".join(["rowid AS _row", *[f'"{c}"' for c in rest]])
            try:
                df = pd.read_sql_query(f'SELECT {sel} FROM "{table}" ORDER BY rowid', self._con)
            except (sqlite3.OperationalError, pd.errors.DatabaseError) as exc:
                if "decode to UTF-8" in reason(exc):
                    raise self._undecodable(self._con, table, rest) from None
                raise
        else:
            df = pd.DataFrame({"_row": fast.pop("_row")})
        for name, values in fast.items():
            df[name] = values
        return df[["_row", *cols]]

    def _sqlite_integers(self, table: str, cols: list[str]) -> dict[str, np.ndarray | pd.arrays.IntegerArray]:
        """The columns of `cols` whose every cell is an integer or NULL, read fast, with `_row` (the rowid): SQLite
        writes each column as one comma-separated text (group_concat, in rowid order) that numpy parses in C,
        instead of a Python object per cell (3-4x faster on a million kernels). Columns declared as text or real
        are not tried; one scan checks the others, and where it finds a cell that is neither an integer nor NULL
        (text, a fraction, or int64's smallest value, which stands for NULL here) a second one tells their columns
        apart, which are left to the checked read that names the offending cell. Empty when none is read fast."""
        con = self._con
        if con is None or not cols:
            return {}
        declared = {r[1]: str(r[2] or "").upper() for r in con.execute(f'PRAGMA table_info("{table}")')}
        cand = [c for c in cols if "INT" in declared.get(c, "") or not any(
            k in declared.get(c, "") for k in ("CHAR", "CLOB", "TEXT", "REAL", "FLOA", "DOUB"))]  # SQLite's affinity
        odd = [f"typeof(\"{c}\") NOT IN ('integer', 'null') OR \"{c}\" = {_NULL_SQL}" for c in cand]
        if cand and con.execute(f'SELECT 1 FROM "{table}" WHERE {" OR ".join(odd)} LIMIT 1').fetchone() is not None:
            flags = con.execute(f'SELECT {", ".join(f"max({o})" for o in odd)} FROM "{table}"').fetchone()
            cand = [c for c, flag in zip(cand, flags, strict=True) if not flag]
        if not cand:
            return {}
        n = int(con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
        out: dict[str, np.ndarray | pd.arrays.IntegerArray] = {}
        for name, expr in (("_row", "rowid"), *[(c, f'"{c}"') for c in cand]):
            text = con.execute(f"SELECT group_concat(ifnull({expr}, {_NULL_SQL}), ',') FROM (SELECT {expr} FROM "
                               f'"{table}" ORDER BY rowid)').fetchone()[0]
            values = np.fromstring(text or "", dtype=np.int64, sep=",")
            if len(values) != n:
                continue  # left to the checked read
            null = values == _NULL_INT
            out[name] = pd.arrays.IntegerArray(values, null) if null.any() else values
        return out if "_row" in out and len(out) > 1 else {}

    def _undecodable(self, con: sqlite3.Connection, table: str, cols: list[str]) -> KvscopeError:
        """The error for the first cell of `cols` whose text is not UTF-8 (Python's sqlite3 cannot decode it)."""
        con.text_factory = bytes
        try:
            for col in cols:
                rows = con.execute(f'SELECT rowid, "{col}" FROM "{table}" WHERE typeof("{col}") = \'text\' '
                                   "ORDER BY rowid")
                found = self._not_utf8(table, col, rows)
                if found is not None:
                    return found
        finally:
            con.text_factory = str
        return KvscopeError(f"{self.shown}: table {table} holds text that is not UTF-8 (a damaged or foreign table)")

    def _not_utf8(self, table: str, col: str, rows: Iterable[tuple[int, bytes | None]]) -> KvscopeError | None:
        """The error for the first of (row, bytes) that is not UTF-8, or None."""
        for row, value in rows:
            if value is None:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return nsys_checks.not_text(self.shown, table, col, row, value)
        return None

    # ---- cells, checked (nsys_checks) with the export's name -------------------------------------------------
    def numbers(self, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False, integer: bool = True
                ) -> pd.Series:
        return nsys_checks.numbers(self.shown, df, table, col, empty_ok=empty_ok, integer=integer)

    def ints(self, df: pd.DataFrame, table: str, col: str) -> np.ndarray:
        return nsys_checks.ints(self.shown, df, table, col)

    def timestamps(self, df: pd.DataFrame, table: str, col: str, empty_ok: bool = False) -> pd.Series:
        return nsys_checks.timestamps(self.shown, df, table, col, empty_ok=empty_ok)

    def texts(self, df: pd.DataFrame, table: str, col: str) -> pd.Series:
        return nsys_checks.texts(self.shown, df, table, col)

    def check_order(self, df: pd.DataFrame, table: str, start: np.ndarray, end: np.ndarray) -> None:
        nsys_checks.check_order(self.shown, df, table, start, end)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
