"""The sweep file of `kvscope sweep`, in memory as on disk: read and validated for `--resume`, rewritten whole after
every finished configuration; the settings every row records. (Its path and lock: `kvscope.measure.sweep_out`.)

The output file. `--out` is a `.csv` or `.parquet` file (any case of the extension; a link is followed and its
target written). Each finished configuration is appended at once and atomically: the whole file is written to a
temporary name beside it, synced, and renamed over it, so a sweep that stops (a crash, Ctrl-C, a full disk) loses
nothing it finished and never leaves a half-written file. Rows already in the file are never changed: a CSV's
existing cells are copied as the text they are, a Parquet file's existing columns keep their values and types;
a column that only new rows have is added with empty cells for the old rows. The one exception: `kvscope sweep
--nsys` fills the attribution cells of the rows it just captured (`SweepFile.annotate`), leaving every other cell.

Settings. Every row records the settings that change its numbers, in these columns: `model` (the name),
`model_source` (`preset:<name>`, or `checkpoint:` / `config:` and the resolved path), `model_arch` (the first 16 hex
digits of the SHA-256 of `ModelArgs.as_dict()` without the name, as sorted JSON), `dtype`, `device` (`cpu` or the GPU's
name), `attn`, `granularity`, `gen_tokens`, `warmup`, `reps`, `seed`, `cuda_graphs`, `kernels` (both as resolved for
the device) and `collapse_factor`. A Parquet file also holds them, with the model's architecture, in its schema
metadata (JSON under `kvscope`, key `sweep`). `--resume` skips the configurations the file already holds, and refuses
(naming the setting and both values) a file whose recorded settings differ from this sweep's in any way, whose rows
disagree among themselves, that does not record them (a file of an older kvscope; a Parquet file without kvscope
sweep metadata), or that is not a well-formed sweep file (columns `seq_len`, `batch`, `flag`,
`decode_p50_ms_per_tok`, `decode_tok_s`; `seq_len` and `batch` positive integers; each configuration once).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.argtypes import INT64_MAX
from kvscope.engine.plan import RunPlan
from kvscope.errors import KvscopeError
from kvscope.io import METADATA_KEY
from kvscope.model.dtypes import dtype_name
from kvscope.model.source import ModelSource
from kvscope.schema import CLASSIC_COLUMNS

# the settings every row records; a resume must match them all (the order is the order of the checks)
SETTINGS = ("model", "model_source", "model_arch", "dtype", "device", "engine", "attn", "granularity", "gen_tokens",
            "warmup", "reps", "seed", "cuda_graphs", "prefill_graphs", "kernels", "collapse_factor")
REQUIRED_COLUMNS = ("seq_len", "batch", "flag", "decode_p50_ms_per_tok", "decode_tok_s")
TMP_NAME_EXTRA = ".." + "0" * 12 + ".tmp"  # what a temporary file's name adds to the sweep file's: .NAME.<12 hex>.tmp


def read_table(path: Path) -> pd.DataFrame:
    """A sweep file (CSV or Parquet); `flag` comes back as strings, empty where nothing is flagged."""
    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
            path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise KvscopeError(f"cannot read {path}: {exc}") from None
    if "flag" in df.columns:
        df["flag"] = df["flag"].astype("string").fillna("")
    return df


def model_identity(source: ModelSource) -> tuple[str, str]:
    """(`model_source`, `model_arch`): where the model comes from, and a digest of its architecture."""
    arch = {k: v for k, v in source.args.as_dict().items() if k != "name"}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if source.kind == "preset":
        return f"preset:{source.args.name}", digest
    where = source.folder if source.folder is not None else Path(source.spec)
    return f"{source.kind}:{where.expanduser().resolve()}", digest


def sweep_settings(plan: RunPlan, collapse_factor: float) -> dict[str, Any]:
    """The settings every row of a sweep records (the column names of `SETTINGS`), from the plan of any of its
    configurations."""
    model_source, model_arch = model_identity(plan.source)
    spec = plan.spec
    return {
        "model": plan.source.args.name, "model_source": model_source, "model_arch": model_arch,
        "dtype": dtype_name(plan.cfg.dtype), "device": plan.device_name,
        "attn": spec.attn, "granularity": spec.granularity, "gen_tokens": spec.gen_tokens,
        "warmup": spec.warmup, "reps": spec.reps, "seed": spec.seed,
        "engine": spec.engine, "cuda_graphs": plan.graphs, "prefill_graphs": plan.cfg.prefill_graphs,
        "kernels": plan.kernels, "collapse_factor": float(collapse_factor),
    }


@dataclass
class SweepFile:
    """A sweep file in memory, as it is on disk: a CSV as its header and cell texts, a Parquet file as its Arrow
    table and kvscope metadata; `numbers` holds the validated columns the collapse flags need, one row per row."""

    fmt: str
    shown: Path
    header: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # CSV: the line each row ends on
    table: pa.Table | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    numbers: pd.DataFrame = field(default_factory=lambda: _numbers([], [], [], [], []))

    @classmethod
    def new(cls, fmt: str, shown: Path) -> SweepFile:
        return cls(fmt, shown)

    @classmethod
    def read(cls, path: Path, fmt: str, shown: Path) -> SweepFile:
        return _read_csv(path, shown) if fmt == "csv" else _read_parquet(path, shown)

    def configs(self) -> Iterator[tuple[int, int]]:
        return zip(self.numbers["seq_len"].tolist(), self.numbers["batch"].tolist(), strict=True)

    def _column(self, name: str) -> list[Any]:
        if self.fmt == "csv":
            i = self.header.index(name)
            return [r[i] for r in self.cells]
        return self.table.column(name).to_pylist() if self.table is not None else []

    def _columns(self) -> list[str]:
        return self.header if self.fmt == "csv" else (self.table.column_names if self.table is not None else [])

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse to resume unless the file records every setting and each equals this sweep's."""
        if self.fmt == "parquet":
            saved = self.meta
            if not saved:
                raise KvscopeError(f"--resume: {self.shown} has no kvscope sweep metadata (not written by kvscope "
                                   "sweep); start a new file")
            for key in SETTINGS:
                if key not in saved:
                    raise KvscopeError(f"--resume: {self.shown} records no {key} in its kvscope metadata (written by "
                                       "an older kvscope?); start a new file")
                if _text(saved[key]) != _text(settings[key]):
                    raise KvscopeError(f"--resume: {self.shown} is a sweep of {key}={_text(saved[key])}, this one has "
                                       f"{key}={_text(settings[key])}")
        columns = self._columns()
        for key in SETTINGS:
            if key not in columns:
                raise KvscopeError(f"--resume: {self.shown} has no column {key} (written by an older kvscope, or not "
                                   "by kvscope sweep); start a new file")
            values = [_text(v) for v in self._column(key)]
            for i, v in enumerate(values):
                if v != values[0]:
                    raise KvscopeError(f"--resume: {self.shown} mixes sweeps: {key}={values[0]} in {self._where(0)}, "
                                       f"{key}={v} in {self._where(i)}")
            if values and values[0] != _text(settings[key]):
                raise KvscopeError(f"--resume: {self.shown} is a sweep of {key}={values[0]}, this one has "
                                   f"{key}={_text(settings[key])}")

    def _where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.fmt == "csv" else f"row {i + 1}"

    def append(self, row: pd.DataFrame) -> None:
        """Add one row (a one-row frame); the rows already here keep their cells."""
        if self.fmt == "csv":
            new_header, new_cells = _csv_cells(row)
            extra = [c for c in new_header if c not in self.header]
            if not self.header:
                extra = _ordered(new_header)
            self.cells = [r + [""] * len(extra) for r in self.cells]
            self.header = self.header + extra
            given = dict(zip(new_header, new_cells, strict=True))
            self.cells.append([given.get(c, "") for c in self.header])
        else:
            self.table = _append_arrow(self.table, row[_ordered(list(row.columns))], self.shown)
        self.numbers = pd.concat([self.numbers, _numbers(*([row[c].iloc[0]] for c in REQUIRED_COLUMNS))],
                                 ignore_index=True)

    def annotate(self, values: dict[tuple[int, int], dict[str, Any]], columns: Sequence[str]) -> None:
        """Add `columns` after every column the file has (those it has already stay where they are) and set, in the
        rows of the configurations (seq_len, batch) of `values`, the cells those rows are given; every other cell
        of the file is kept as it is (a new column is empty in the rows not given)."""
        rows = {key: i for i, key in enumerate(self.configs())}
        given = {rows[key]: vals for key, vals in values.items() if key in rows}
        if self.fmt == "csv":
            self.header = self.header + [c for c in columns if c not in self.header]
            self.cells = [r + [""] * (len(self.header) - len(r)) for r in self.cells]
            for i, vals in given.items():
                names, texts = _csv_cells(pd.DataFrame([{c: vals[c] for c in columns if c in vals}]))
                at = {c: self.header.index(c) for c in names}
                for name, text in zip(names, texts, strict=True):
                    self.cells[i][at[name]] = text
            return
        if self.table is None:
            return
        n = self.table.num_rows
        for c in columns:
            cells = self.table.column(c).to_pylist() if c in self.table.column_names else [None] * n
            for i, vals in given.items():
                if c in vals:
                    cells[i] = _arrow_value(vals[c])
            column = pa.array(cells, from_pandas=True)
            if c in self.table.column_names:
                old_type = self.table.schema.field(c).type
                if not pa.types.is_null(old_type) and column.type != old_type:
                    column = column.cast(old_type)
                self.table = self.table.set_column(self.table.column_names.index(c), c, column)
            else:
                self.table = self.table.append_column(c, column)

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        if self.fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(self.header)
            writer.writerows(self.cells)
            data = buf.getvalue().encode()
        else:
            if self.table is None:
                raise RuntimeError("a sweep file is written after its first row only")
            schema_meta = {k: v for k, v in (self.table.schema.metadata or {}).items() if k != b"pandas"}
            schema_meta[METADATA_KEY] = json.dumps(meta, default=str).encode()
            sink = pa.BufferOutputStream()
            pq.write_table(self.table.replace_schema_metadata(schema_meta), sink)
            data = sink.getvalue().to_pybytes()
        _replace(path, data)


def _arrow_value(value: Any) -> Any:
    """A cell for pyarrow: None for pandas' NA, NumPy scalars as Python ones."""
    if value is None or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def _numbers(seq: list[Any], batch: list[Any], flag: list[Any], decode_ms: list[Any], decode_tok_s: list[Any]
             ) -> pd.DataFrame:
    """The typed columns collapse flags need (REQUIRED_COLUMNS, in that order)."""
    return pd.DataFrame({"seq_len": pd.Series(seq, dtype="int64"), "batch": pd.Series(batch, dtype="int64"),
                         "flag": pd.Series(flag, dtype="object"),
                         "decode_p50_ms_per_tok": pd.Series(decode_ms, dtype="float64"),
                         "decode_tok_s": pd.Series(decode_tok_s, dtype="float64")})


def _ordered(columns: list[str]) -> list[str]:
    """The classic columns first (in their order), then the others as they come."""
    return [c for c in CLASSIC_COLUMNS if c in columns] + [c for c in columns if c not in CLASSIC_COLUMNS]


def _text(value: Any) -> str:
    """A setting as the text a CSV cell holds ("" for a missing value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _positive_int(value: Any) -> int | None:
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
    """A float cell: empty or missing is NaN; None when the value is not a number at all."""
    if value is None or (isinstance(value, str) and not value.strip()):
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


def _validate(sf: SweepFile) -> SweepFile:
    """Check the columns resume relies on and fill `numbers`; refuse a malformed file in one line."""
    columns = sf._columns()
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise KvscopeError(f"{sf.shown} is not a kvscope sweep file: column {duplicated[0]} appears twice")
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise KvscopeError(f"{sf.shown} is not a kvscope sweep file: no column {col}")
    def values(col: str, read: Callable[[Any], Any], what: str) -> list[Any]:
        """Every cell of `col` read by `read` (None: not readable), or a one-line error naming the cell."""
        out = []
        for i, v in enumerate(sf._column(col)):
            x = read(v)
            if x is None:
                raise KvscopeError(f"{sf.shown}: column {col}, {sf._where(i)}: {v!r} is not {what}")
            out.append(x)
        return out

    ints = {col: values(col, _positive_int, "a positive integer") for col in ("seq_len", "batch")}
    floats = {col: values(col, _number, "a number") for col in ("decode_p50_ms_per_tok", "decode_tok_s")}
    flags = []
    for i, v in enumerate(sf._column("flag")):
        if v is not None and not isinstance(v, str):
            raise KvscopeError(f"{sf.shown}: column flag, {sf._where(i)}: {v!r} is not text")
        flags.append(v or "")
    seen: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(ints["seq_len"], ints["batch"], strict=True)):
        if key in seen:
            raise KvscopeError(f"{sf.shown}: {sf._where(i)} repeats seq_len={key[0]}, batch={key[1]} of "
                               f"{sf._where(seen[key])}; a sweep file holds each configuration once")
        seen[key] = i
    sf.numbers = _numbers(ints["seq_len"], ints["batch"], flags, floats["decode_p50_ms_per_tok"],
                          floats["decode_tok_s"])
    return sf


def _read_csv(path: Path, shown: Path) -> SweepFile:
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
        raise KvscopeError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KvscopeError(f"cannot read {shown}: not a CSV file ({exc})") from None
    if header is None:
        raise KvscopeError(f"{shown} is empty: not a kvscope sweep file")
    for cells, line in zip(rows, lines, strict=True):
        if len(cells) != len(header):
            raise KvscopeError(f"{shown}: line {line} has {len(cells)} fields, the header has {len(header)}")
    return _validate(SweepFile("csv", shown, header=header, cells=rows, lines=lines))


def _read_parquet(path: Path, shown: Path) -> SweepFile:
    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise KvscopeError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except (ValueError, pa.ArrowException) as exc:
        raise KvscopeError(f"cannot read {shown}: not a Parquet file ({_first_line(exc)})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta: dict[str, Any] = {}
    if raw is not None:
        try:
            decoded = json.loads(raw)
        except ValueError:
            raise KvscopeError(f"{shown}: its kvscope metadata is not valid JSON") from None
        sweep = decoded.get("sweep") if isinstance(decoded, dict) else None
        meta = sweep if isinstance(sweep, dict) else {}
    return _validate(SweepFile("parquet", shown, table=table, meta=meta))


def _csv_cells(row: pd.DataFrame) -> tuple[list[str], list[str]]:
    """A one-row frame as the header and cell texts pandas writes for it."""
    parsed = list(csv.reader(io.StringIO(row.to_csv(index=False, lineterminator="\n"))))
    return parsed[0], parsed[1]


def _append_arrow(old: pa.Table | None, row: pd.DataFrame, shown: Path) -> pa.Table:
    """`old` with one more row; the old columns keep their types (the new row is cast to them)."""
    new = pa.Table.from_pandas(row, preserve_index=False).replace_schema_metadata(None)
    if old is None:
        return new
    for i, f in enumerate(new.schema):
        if f.name not in old.column_names:
            continue
        old_type = old.schema.field(f.name).type
        if old_type == f.type:
            continue
        if pa.types.is_null(old_type):  # only nulls so far: they take the new row's type
            j = old.column_names.index(f.name)
            old = old.set_column(j, f.name, old.column(f.name).cast(f.type))
            continue
        try:
            new = new.set_column(i, f.name, new.column(f.name).cast(old_type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise KvscopeError(f"cannot append to {shown}: column {f.name} holds {old_type}, the new row "
                               f"{f.type}") from None
    return pa.concat_tables([old, new], promote_options="default")


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to a new file beside `path`, sync it and rename it over `path`: `path` is either as it was or
    holds all of `data`. A resumed file keeps its permission bits; a new one gets those open() gives (umask)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # see TMP_NAME_EXTRA
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            if path.exists():
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised is the one to report
            tmp.unlink()
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
