"""The sweep file of `kvscope sweep` on the measuring side: the settings every row records, the check that a file to
resume was written under this sweep's settings, and the file appended to and rewritten whole after every finished
configuration. Reading and checking it is `kvscope.analysis.sweep_file` (the reader `kvscope report` and `kvscope
capacity` use too); its path and lock are `kvscope.measure.sweep_out`.

The output file. `--out` is a `.csv` or `.parquet` file (any case of the extension; a link is followed and its
target written). Each finished configuration is appended at once and atomically (`kvscope.io.write_bytes`): the whole
file is written to a temporary name beside it, synced, and renamed over it, so a sweep that stops (a crash, Ctrl-C,
a full disk) loses nothing it finished and never leaves a half-written file. Rows already in the file are never
changed: a CSV's existing cells are copied as the text they are, a Parquet file's existing columns keep their values
and types; a column that only new rows have is added with empty cells for the old rows. The one exception: `kvscope
sweep --nsys` fills the attribution cells of the rows it just captured (`SweepFile.annotate`), leaving every other
cell.

Settings. Every row records the settings that change its numbers, in these columns: `model` (the name),
`model_source` (`preset:<name>`, or `checkpoint:` / `config:` and the resolved path), `model_arch` (the first 16 hex
digits of the SHA-256 of `ModelArgs.as_dict()` without the name, as sorted JSON), `dtype`, `device` (`cpu` or the GPU's
name), `attn`, `granularity`, `gen_tokens`, `warmup`, `reps`, `seed`, `cuda_graphs`, `kernels` (both as resolved for
the device) and `collapse_factor`. A Parquet file also holds them, with the model's architecture, in its schema
metadata (JSON under `kvscope`, key `sweep`). `--resume` skips the configurations the file already holds, and refuses
a file that is not a sweep file (as the reader says, in the same words as `kvscope report`: bad numbers, rows of two
sweeps, ...; so no new row is ever compared with a refused one), and then (naming the setting and both values) a file
whose recorded settings differ from this sweep's in any way, whose rows are of two engines, that does not record
them (a file of an older kvscope; a Parquet file without kvscope sweep metadata), or that lacks the columns collapse
flags are computed from (`flag`, `decode_p50_ms_per_tok`, `decode_tok_s`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.analysis.sweep_file import ENGINE_SETTINGS, MODEL_SETTINGS, SweepTable, csv_text
from kvscope.engine.plan import RunPlan
from kvscope.errors import KvscopeError
from kvscope.io import METADATA_KEY, write_bytes
from kvscope.model.dtypes import dtype_name
from kvscope.model.source import ModelSource
from kvscope.schema import CLASSIC_COLUMNS

# the settings every row records; a resume must match them all (the order is the order of the checks); the reader
# refuses a file whose rows differ in any but `engine`, which a resume refuses too (it appends one engine's rows)
SETTINGS = (*MODEL_SETTINGS, "engine", *ENGINE_SETTINGS)
# the columns collapse flags are computed from (`numbers`), besides the keys; a resume needs them
FLAG_COLUMNS = ("flag", "decode_p50_ms_per_tok", "decode_tok_s")


# ModelArgs fields newer than the sweep files' digests (kept out of a digest while unset)
_LATER_FIELDS = ("sliding_window",)


def model_identity(source: ModelSource) -> tuple[str, str]:
    """(`model_source`, `model_arch`): where the model comes from, and a digest of its architecture. A field added
    to ModelArgs later and unset (`sliding_window` None) stays out of the digest, so a model's digest, and a sweep
    file's `--resume`, stays what it was before the field existed."""
    arch = {k: v for k, v in source.args.as_dict().items() if k != "name" and not (k in _LATER_FIELDS and v is None)}
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
class SweepFile(SweepTable):
    """A sweep file in memory, as it is on disk (`kvscope.analysis.sweep_file.SweepTable`: read and checked by
    `SweepFile.read(path, shown)`), with what the sweep does to it: check its settings, append rows, add attribution
    cells, write it whole."""

    @classmethod
    def new(cls, fmt: str, shown: Path) -> SweepFile:
        return cls(fmt, shown)

    @property
    def numbers(self) -> pd.DataFrame:
        """The typed columns collapse flags need (the keys and FLAG_COLUMNS), one row per row; a number column the
        file lacks is NaN. A cell that is not a finite number >= 0 is an error naming it."""
        configs, n = self.configs(), self.rows()
        columns = self.columns()
        decode = [self.measures(c) if c in columns else [math.nan] * n for c in FLAG_COLUMNS[1:]]
        return _numbers([s for s, _ in configs], [b for _, b in configs], self.flags(), *decode)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse to resume unless the file records every setting, each equal to this sweep's, and the columns
        collapse flags are computed from (FLAG_COLUMNS, with numbers where numbers belong)."""
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
        columns = self.columns()
        for key in (*FLAG_COLUMNS, *SETTINGS):
            if key not in columns:
                raise KvscopeError(f"--resume: {self.shown} has no column {key} (written by an older kvscope, or not "
                                   "by kvscope sweep); start a new file")
        _ = self.numbers  # the flag columns as numbers, or an error naming the first cell that is not one
        for key in SETTINGS:
            values = [_text(v) for v in self.column(key)]
            for i, v in enumerate(values):
                if v != values[0]:
                    raise KvscopeError(f"--resume: {self.shown} mixes sweeps: {key}={values[0]} in {self.where(0)}, "
                                       f"{key}={v} in {self.where(i)}")
            if values and values[0] != _text(settings[key]):
                raise KvscopeError(f"--resume: {self.shown} is a sweep of {key}={values[0]}, this one has "
                                   f"{key}={_text(settings[key])}")

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
            data = csv_text(self.header, self.cells).encode()
        else:
            if self.table is None:
                raise RuntimeError("a sweep file is written after its first row only")
            schema_meta = {k: v for k, v in (self.table.schema.metadata or {}).items() if k != b"pandas"}
            schema_meta[METADATA_KEY] = json.dumps(meta, default=str).encode()
            sink = pa.BufferOutputStream()
            pq.write_table(self.table.replace_schema_metadata(schema_meta), sink)
            data = sink.getvalue().to_pybytes()
        write_bytes(path, data)


def _arrow_value(value: Any) -> Any:
    """A cell for pyarrow: None for pandas' NA, NumPy scalars as Python ones."""
    if value is None or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def _numbers(seq: list[Any], batch: list[Any], flag: list[Any], decode_ms: list[Any], decode_tok_s: list[Any]
             ) -> pd.DataFrame:
    """The typed columns collapse flags need (the keys, then FLAG_COLUMNS)."""
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
