"""The sweep file of `kvscope sweep`, read and checked without torch: the one reader behind `kvscope sweep --resume`
(`kvscope.measure.sweep_file`, which also appends to it and checks its settings), `kvscope report` and `kvscope
capacity`, so that all three accept the same files and refuse the others with the same one-line `KvscopeError`,
naming the path as the user gave it.

Format, by the extension in any case: `.csv` (UTF-8, a byte-order mark allowed; blank lines hold nothing; every row
has as many fields as the header) or `.parquet` (its kvscope metadata, JSON under the key `kvscope`, must parse).
Any other extension is refused.

What makes a sweep file, checked in this order:
- the file can be read and holds a table (an empty file, or one of blank lines, does not);
- each column name once;
- the key columns `seq_len` and `batch`;
- no control character (a newline, a tab, a NUL, ...) in any cell or column name: a cell is one line of text;
- `seq_len` and `batch`: every cell a whole number from 1 to 2**63-1 (`8`, `8.0`, ` 8 `);
- `flag`, where present: text or empty;
- every number column (`number_column`: a known name such as `gen_tokens`, or a name ending in a unit such as
  `_ms`, `_tok_s`, `_mb`, `_mib`, `_bytes`, `_pct`, `_s`): every cell a finite number >= 0, or missing (empty, or a
  spelling of a missing value: see `kvscope.analysis.inputs`); text, true/false, infinities and negative values are
  refused, naming the cell;
- each configuration (seq_len, batch) once per engine (`engine` column; empty or absent is kvscope's loop);
- one sweep: the columns of `MODEL_SETTINGS` (the model, its dtype, the device) hold one value in the whole file,
  those of `ENGINE_SETTINGS` one value per engine (a file of two engines' sweeps of one model is one `kvscope report`
  compares; `kvscope capacity` and `--resume` want one engine and say so).

A header alone is a sweep file without rows (`--resume` starts on it; `read_sweep`, which the analysis uses, wants a
row at least). Columns of other names (a note added by hand) are not checked.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.analysis.inputs import MISSING_SPELLINGS, error_reason
from kvscope.argtypes import INT64_MAX
from kvscope.errors import KvscopeError
from kvscope.io import METADATA_KEY
from kvscope.schema import KVSCOPE_ENGINE

SWEEP_KEYS = ("seq_len", "batch")
SWEEP_FORMATS = {".csv": "csv", ".parquet": "parquet"}  # by the extension, in any case
# what every row of one sweep records alike: in the whole file, and per engine (kvscope.measure.sweep_file.SETTINGS)
MODEL_SETTINGS = ("model", "model_source", "model_arch", "dtype", "device")
ENGINE_SETTINGS = ("attn", "granularity", "gen_tokens", "warmup", "reps", "seed", "cuda_graphs", "prefill_graphs",
                   "kernels", "collapse_factor")
# the number columns: these names, and any name ending in a unit; a cell holds a finite number >= 0 or is missing
NUMBER_NAMES = frozenset({"gen_tokens", "decode_steps", "reps", "warmup", "seed", "collapse_factor", "tp", "rank",
                          "decode_mbu", "prefill_mfu"})
NUMBER_SUFFIXES = ("_ms", "_ms_per_tok", "_s", "_mb", "_mib", "_bytes", "_flops", "_pct", "_samples", "_kernels")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, the line and paragraph separators


def number_column(name: str) -> bool:
    """Whether column `name` of a sweep file holds numbers (times, rates, sizes, counts, shares, settings)."""
    return name not in SWEEP_KEYS and (name in NUMBER_NAMES or name.endswith(NUMBER_SUFFIXES))


def sweep_format(path: Path, shown: Path | None = None) -> str:
    """`csv` or `parquet`, by the extension of `path` in any case; any other is a one-line error naming `shown`."""
    fmt = SWEEP_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise KvscopeError(f"{shown or path}: a sweep file ends in .csv or .parquet")
    return fmt


@dataclass
class SweepTable:
    """A sweep file as it is on disk: a CSV as its header, cell texts and the line each row ends on, a Parquet file as
    its Arrow table and the `sweep` entry of its kvscope metadata. `shown`: the path messages name."""

    fmt: str
    shown: Path
    header: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # CSV: the line each row ends on
    table: pa.Table | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path, shown: Path | None = None) -> Self:
        """The sweep file at `path`, checked (see the module docstring); messages name `shown` (default `path`)."""
        shown = path if shown is None else shown
        if sweep_format(path, shown) == "csv":
            header, cells, lines = _read_csv(path, shown)
            sweep = cls("csv", shown, header=header, cells=cells, lines=lines)
        else:
            table, meta = _read_parquet(path, shown)
            sweep = cls("parquet", shown, table=table, meta=meta)
        sweep.check()
        return sweep

    def columns(self) -> list[str]:
        return self.header if self.fmt == "csv" else (self.table.column_names if self.table is not None else [])

    def rows(self) -> int:
        return len(self.cells) if self.fmt == "csv" else (self.table.num_rows if self.table is not None else 0)

    def column(self, name: str) -> list[Any]:
        """The cells of column `name` as stored: CSV text, Parquet values as Python objects (none in a table without
        rows, such as a new file's)."""
        if not self.rows():
            return []
        if self.fmt == "csv":
            i = self.header.index(name)
            return [r[i] for r in self.cells]
        return self.table.column(name).to_pylist()

    def where(self, i: int) -> str:
        """Where row `i` (0-based) is, as messages say it: the CSV line it ends on, or the Parquet row (1-based)."""
        return f"line {self.lines[i]}" if self.fmt == "csv" else f"row {i + 1}"

    def cell_error(self, col: str, i: int, value: Any, what: str) -> KvscopeError:
        return KvscopeError(f"{self.shown}: column {col}, {self.where(i)}: {value!r} is not {what}")

    def ints(self, col: str) -> list[int]:
        """Column `col` as whole numbers >= 1, or an error naming the first other cell."""
        return self._cells(col, _positive_int, "a positive integer")

    def floats(self, col: str) -> list[float]:
        """Column `col` as numbers (NaN where a cell is empty or spells a missing value: see
        `kvscope.analysis.inputs`), or an error naming the first cell that holds anything else."""
        return self._cells(col, _number, "a number")

    def _cells(self, col: str, read: Callable[[Any], Any], what: str) -> list[Any]:
        """Every cell of `col` as `read` gives it, or an error naming the first it cannot read (None)."""
        out = []
        for i, v in enumerate(self.column(col)):
            x = read(v)
            if x is None:
                raise self.cell_error(col, i, v, what)
            out.append(x)
        return out

    def flags(self) -> list[str]:
        """The `flag` of every row ("" where none, or where the file has no flag column)."""
        if "flag" not in self.columns():
            return [""] * self.rows()
        out = []
        for i, v in enumerate(self.column("flag")):
            if v is not None and not isinstance(v, str):
                raise self.cell_error("flag", i, v, "text")
            out.append(v or "")
        return out

    def configs(self) -> list[tuple[int, int]]:
        """(seq_len, batch) of every row."""
        return list(zip(self.ints("seq_len"), self.ints("batch"), strict=True))

    def engines(self) -> list[str]:
        """The engine of every row (`engine` column; empty or absent: kvscope's loop)."""
        if "engine" not in self.columns():
            return [KVSCOPE_ENGINE] * self.rows()
        return [_text(v) or KVSCOPE_ENGINE for v in self.column("engine")]

    def check(self) -> None:
        """Refuse, in one line, a table that is not a sweep file (see the module docstring)."""
        columns = self.columns()
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise KvscopeError(f"{self.shown} is not a kvscope sweep file: column {duplicated[0]} appears twice")
        for col in SWEEP_KEYS:
            if col not in columns:
                raise KvscopeError(f"{self.shown} is not a kvscope sweep file: no column {col}")
        self._check_one_line()
        configs = self.configs()
        self.flags()
        for col in columns:
            if number_column(col):
                self.measures(col)
        engines = self.engines()
        several = len(set(engines)) > 1
        seen: dict[tuple[str, int, int], int] = {}
        for i, (engine, (seq, batch)) in enumerate(zip(engines, configs, strict=True)):
            j = seen.setdefault((engine, seq, batch), i)
            if j != i:
                of = f" ({engine})" if several else ""
                raise KvscopeError(f"{self.shown}: {self.where(i)} repeats seq_len={seq}, batch={batch}{of} of "
                                   f"{self.where(j)}; a sweep file holds each configuration once")
        self._check_one_sweep(engines)

    def measures(self, col: str) -> list[float]:
        """Number column `col` as floats (NaN where missing), or an error naming the first cell that is not a finite
        number >= 0."""
        values = self.floats(col)
        for i, v in enumerate(values):
            if not (math.isnan(v) or (math.isfinite(v) and v >= 0)):
                raise self.cell_error(col, i, self.column(col)[i], "a finite number >= 0")
        return values

    def _check_one_line(self) -> None:
        """Refuse a control character (a newline, a tab, ...) in a column name or a text cell."""
        for col in self.columns():
            if _CONTROL.search(col):
                raise KvscopeError(f"{self.shown}: the column name {col!r} holds a control character; a sweep "
                                   "file's names and cells are one line of text each")
            for i, v in enumerate(self.column(col)):
                if isinstance(v, str) and _CONTROL.search(v):
                    raise KvscopeError(f"{self.shown}: column {col}, {self.where(i)}: {v!r} holds a control "
                                       "character; a sweep file's names and cells are one line of text each")

    def _check_one_sweep(self, engines: list[str]) -> None:
        """Refuse the rows of two sweeps: MODEL_SETTINGS differing anywhere, ENGINE_SETTINGS within one engine."""
        columns = self.columns()
        for keys, per_engine in ((MODEL_SETTINGS, False), (ENGINE_SETTINGS, True)):
            for key in (k for k in keys if k in columns):
                first: dict[str, tuple[int, str]] = {}
                for i, (engine, value) in enumerate(zip(engines, map(_text, self.column(key)), strict=True)):
                    j, seen = first.setdefault(engine if per_engine else "", (i, value))
                    if seen != value:
                        of = f" ({engine} engine)" if per_engine and len(set(engines)) > 1 else ""
                        raise KvscopeError(f"{self.shown} mixes sweeps{of}: {key}={seen} in {self.where(j)}, "
                                           f"{key}={value} in {self.where(i)}; a sweep file holds one sweep's rows")

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame: `seq_len` and `batch` as int64, `flag` (where present) as text, empty where
        nothing is flagged, every number column as numbers (float64, NaN where missing, unless pandas read it as
        numbers already); every other column as pandas reads it (a CSV's empty cells missing, any other text kept
        as written)."""
        try:
            if self.fmt == "csv":
                df = pd.read_csv(io.StringIO(csv_text(self.header, self.cells)), keep_default_na=False,
                                 na_values=[""])
            else:
                df = self.table.to_pandas() if self.table is not None else pd.DataFrame()
        except (ValueError, pa.ArrowException) as exc:
            raise KvscopeError(f"cannot read {self.shown}: {error_reason(exc)}") from None
        configs = self.configs()
        df["seq_len"] = pd.Series([s for s, _ in configs], index=df.index, dtype="int64")
        df["batch"] = pd.Series([b for _, b in configs], index=df.index, dtype="int64")
        if "flag" in df.columns:
            df["flag"] = pd.Series(self.flags(), index=df.index, dtype="object")
        for col in df.columns:
            if number_column(col) and not pd.api.types.is_numeric_dtype(df[col]):
                df[col] = pd.Series(self.floats(col), index=df.index, dtype="float64")
        return df


def read_sweep(path: Path) -> pd.DataFrame:
    """A sweep file with one row at least, as `SweepTable.frame` gives it (the reader of `kvscope report` and
    `kvscope capacity`)."""
    sweep = SweepTable.read(path)
    if not sweep.rows():
        raise KvscopeError(f"{path} has no rows")
    return sweep.frame()


def csv_text(header: list[str], cells: list[list[str]]) -> str:
    """A CSV's header and cell texts as the text of the file (the writer's quoting, `\\n` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(cells)
    return buf.getvalue()


def _read_csv(path: Path, shown: Path) -> tuple[list[str], list[list[str]], list[int]]:
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next((cells for cells in reader if cells), None)  # blank lines hold nothing
            for cells in reader:
                if cells:  # a blank line holds no row
                    rows.append(cells)
                    lines.append(reader.line_num)
    except OSError as exc:
        raise KvscopeError(f"cannot read {shown}: {error_reason(exc)}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KvscopeError(f"cannot read {shown}: not a CSV file ({error_reason(exc)})") from None
    if header is None:
        raise KvscopeError(f"{shown} is empty: not a kvscope sweep file")
    for cells, line in zip(rows, lines, strict=True):
        if len(cells) != len(header):
            raise KvscopeError(f"{shown}: line {line} has {len(cells)} fields, the header has {len(header)}")
    return header, rows, lines


def _read_parquet(path: Path, shown: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The table and the `sweep` entry of its kvscope metadata ({} when it has none)."""
    try:
        if path.stat().st_size == 0:
            raise KvscopeError(f"{shown} is empty: not a kvscope sweep file")
        table = pq.read_table(path)
    except OSError as exc:
        raise KvscopeError(f"cannot read {shown}: {error_reason(exc)}") from None
    except (ValueError, pa.ArrowException) as exc:
        raise KvscopeError(f"cannot read {shown}: not a Parquet file ({error_reason(exc)})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return table, {}
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise KvscopeError(f"{shown}: its kvscope metadata is not valid JSON") from None
    sweep = decoded.get("sweep") if isinstance(decoded, dict) else None
    return table, sweep if isinstance(sweep, dict) else {}


def _text(value: Any) -> str:
    """A cell as text, stripped ("" for a missing value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _positive_int(value: Any) -> int | None:
    """A whole number from 1 to INT64_MAX (an int, an integral float, or text that spells one), else None."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return _positive_int(int(text))
        except ValueError:
            try:
                return _positive_int(float(text))
            except ValueError:
                return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= INT64_MAX else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return _positive_int(int(value))
    return None


def _number(value: Any) -> float | None:
    """A number cell: NaN where it is empty or spells a missing value; None when it holds anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() in MISSING_SPELLINGS):
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
