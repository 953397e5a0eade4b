"""An export's contents are checked for sense (issue 22, cause 5): text that is not UTF-8 text, a renamed name
column, timestamps that are negative or beyond any capture's clock (at the int64 limit the sums overflowed into
negative busy times and 9.2e18 ns ranges) end in one line naming the table, the column and the first bad row, through
the command and every API function that reads an export, from SQLite and from a parquetdir."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import fail
from paths import DATA
from synthetic_export import sqlite_copy

import kvscope.api as api
from kvscope.errors import KvscopeError

TINY = DATA / "nsys" / "tiny.sqlite"
TINY_DIR = DATA / "nsys" / "tiny.parquetdir"
PLAIN = DATA / "foreign" / "plain.sqlite"
FIRST_RANGE = "(SELECT min(rowid) FROM NVTX_EVENTS WHERE eventType = 59)"  # row 3 of tiny.sqlite
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_TIMESTAMP_NS = 2**62  # kvscope.analysis.nsys.checks.MAX_TIMESTAMP_NS
HOW = ["cli", "load_export", "project", "align"]


def _refused(how: str, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line message with which `how` refuses `export`, without the export's name."""
    if how == "cli":
        out = tmp_path / "out"
        line = fail(["align", str(export), "--out", str(out)], capsys)
        assert not out.exists()
        prefix = f"kvscope: error: {export}: "
    else:
        with pytest.raises(KvscopeError) as info:
            getattr(api, how)(export)
        line, prefix = str(info.value), f"{export}: "
        assert "\n" not in line
    assert line.startswith(prefix), line
    return line[len(prefix):]


def _sqlite(tmp_path: Path, statements: list[str], source: Path = TINY) -> Path:
    return sqlite_copy(source, tmp_path / "x.sqlite", *statements)


TEXT_CASES = [
    # NVTX text as a blob that is not UTF-8, and as TEXT whose bytes are not UTF-8 (SQLite keeps them as given)
    ([f"UPDATE NVTX_EVENTS SET text = X'fffe41' WHERE rowid = {FIRST_RANGE}"],
     "table NVTX_EVENTS column text holds b'\\xff\\xfeA' in row 3, not UTF-8 text (a damaged or foreign table)"),
    ([f"UPDATE NVTX_EVENTS SET text = CAST(X'ff41' AS TEXT) WHERE rowid = {FIRST_RANGE}"],
     "table NVTX_EVENTS column text holds b'\\xffA' in row 3, not UTF-8 text (a damaged or foreign table)"),
    (["UPDATE NVTX_EVENTS SET text = CAST(X'c328' AS TEXT) WHERE rowid = 4"],  # a category name's row
     "table NVTX_EVENTS column text holds b'\\xc3(' in row 4, not UTF-8 text (a damaged or foreign table)"),
    # registered names: StringIds
    (["UPDATE StringIds SET value = X'ff41' WHERE id = 50"],
     "table StringIds column value holds b'\\xffA' in row 50, not UTF-8 text (a damaged or foreign table)"),
    (["UPDATE StringIds SET value = CAST(X'80' AS TEXT) WHERE id = 51"],
     "table StringIds column value holds b'\\x80' in row 51, not UTF-8 text (a damaged or foreign table)"),
]

NAME_CASES = [
    (["ALTER TABLE NVTX_EVENTS RENAME COLUMN text TO txt", "ALTER TABLE NVTX_EVENTS RENAME COLUMN textId TO tid"],
     "table NVTX_EVENTS has neither a text nor a textId column (the ranges' names): a damaged or foreign table"),
    (["ALTER TABLE NVTX_EVENTS RENAME COLUMN textId TO tid"],
     "table NVTX_EVENTS: none of its 165 ranges has a name (column text is empty in all of their rows, first: row "
     "3; no column textId): a damaged or foreign table"),
    (["UPDATE NVTX_EVENTS SET textId = NULL"],
     "table NVTX_EVENTS: none of its 165 ranges has a name (columns text and textId are empty in all of their rows, "
     "first: row 3): a damaged or foreign table"),
    (["ALTER TABLE CUPTI_ACTIVITY_KIND_KERNEL RENAME COLUMN demangledName TO dn",
      "ALTER TABLE CUPTI_ACTIVITY_KIND_KERNEL RENAME COLUMN shortName TO sn"],
     "table CUPTI_ACTIVITY_KIND_KERNEL has neither a demangledName nor a shortName column (the kernels' names): a "
     "damaged or foreign table"),
    (["ALTER TABLE NVTX_EVENTS RENAME COLUMN domainId TO dom"],
     "table NVTX_EVENTS lacks column domainId, which its 1 row(s) creating NVTX domains (first: row 1) need to "
     "place the ranges in them: a damaged or foreign table"),
]

TIME_CASES = [
    ([f'UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET "end" = {INT64_MAX} WHERE rowid = 3'],
     f"table CUPTI_ACTIVITY_KIND_KERNEL column end holds {INT64_MAX} in row 3, beyond any capture's clock (2**62 ns, "
     "146 years): a damaged export"),
    ([f"UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET start = {INT64_MIN} WHERE rowid = 3"],
     f"table CUPTI_ACTIVITY_KIND_KERNEL column start holds {INT64_MIN} in row 3, a negative timestamp: a damaged "
     "export"),
    (["UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET start = -100, \"end\" = -50 WHERE rowid = 5"],
     "table CUPTI_ACTIVITY_KIND_KERNEL column start holds -100 in row 5, a negative timestamp: a damaged export"),
    ([f'UPDATE CUPTI_ACTIVITY_KIND_MEMCPY SET "end" = {MAX_TIMESTAMP_NS} WHERE rowid = 2'],
     f"table CUPTI_ACTIVITY_KIND_MEMCPY column end holds {MAX_TIMESTAMP_NS} in row 2, beyond any capture's clock "
     "(2**62 ns, 146 years): a damaged export"),
    (['UPDATE CUPTI_ACTIVITY_KIND_MEMSET SET start = -1, "end" = 10 WHERE rowid = 4'],
     "table CUPTI_ACTIVITY_KIND_MEMSET column start holds -1 in row 4, a negative timestamp: a damaged export"),
    (["UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET start = -7 WHERE rowid = 9"],
     "table CUPTI_ACTIVITY_KIND_RUNTIME column start holds -7 in row 9, a negative timestamp: a damaged export"),
    ([f'UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET "end" = {INT64_MAX} WHERE rowid = 11'],
     f"table CUPTI_ACTIVITY_KIND_RUNTIME column end holds {INT64_MAX} in row 11, beyond any capture's clock "
     "(2**62 ns, 146 years): a damaged export"),
    ([f"UPDATE NVTX_EVENTS SET start = -5 WHERE rowid = {FIRST_RANGE}"],
     "table NVTX_EVENTS column start holds -5 in row 3, a negative timestamp: a damaged export"),
    ([f'UPDATE NVTX_EVENTS SET "end" = {INT64_MAX} WHERE rowid = 5'],
     f"table NVTX_EVENTS column end holds {INT64_MAX} in row 5, beyond any capture's clock (2**62 ns, 146 years): "
     "a damaged export"),
    ([f'UPDATE NVTX_EVENTS SET "end" = {INT64_MIN} WHERE rowid = 5'],
     f"table NVTX_EVENTS column end holds {INT64_MIN} in row 5, a negative timestamp: a damaged export"),
    ([f'UPDATE NVTX_EVENTS SET start = {2**62 + 1}, "end" = {2**62 + 3} WHERE rowid = 7'],
     f"table NVTX_EVENTS column start holds {2**62 + 1} in row 7, beyond any capture's clock (2**62 ns, 146 years): "
     "a damaged export"),
    (['UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET start = 1e19 WHERE rowid = 6'],
     "table CUPTI_ACTIVITY_KIND_KERNEL column start holds 1e+19 in row 6, beyond the 64-bit integers (a damaged or "
     "foreign table)"),
]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("statements", "message"), TEXT_CASES + NAME_CASES + TIME_CASES)
def test_sqlite_contents_are_checked(statements: list[str], message: str, how: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    export = _sqlite(tmp_path, statements)
    assert _refused(how, export, tmp_path, capsys) == message


@pytest.mark.parametrize("how", HOW)
def test_foreign_export_contents_are_checked(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another program's export (inline range names): the same checks."""
    export = _sqlite(tmp_path, ["UPDATE NVTX_EVENTS SET text = X'ff' WHERE eventType = 59 AND rowid = (SELECT "
                                "max(rowid) FROM NVTX_EVENTS WHERE eventType = 59)"], PLAIN)
    con = sqlite3.connect(export)
    (row,) = con.execute("SELECT max(rowid) FROM NVTX_EVENTS WHERE eventType = 59").fetchone()
    con.close()
    assert _refused(how, export, tmp_path, capsys) == (f"table NVTX_EVENTS column text holds b'\\xff' in row {row}, "
                                                       "not UTF-8 text (a damaged or foreign table)")


def test_sane_extremes_are_read(tmp_path: Path) -> None:
    """Timestamps from 0 to just under the limit, inline names beside registered ones: read as they are."""
    top = MAX_TIMESTAMP_NS - 1
    export = _sqlite(tmp_path, [
        f"UPDATE NVTX_EVENTS SET start = 0 WHERE rowid = {FIRST_RANGE}",
        f'UPDATE NVTX_EVENTS SET "end" = {top} WHERE rowid = {FIRST_RANGE}',
        "UPDATE NVTX_EVENTS SET text = 'décodé ✓', textId = NULL WHERE rowid = 5",
        f'UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET "end" = {top - 1} WHERE rowid = 3',
    ])
    exp = api.load_export(export)
    first = exp.ranges.loc[exp.ranges["range_id"] == 3].iloc[0]
    assert (int(first["start_ns"]), int(first["end_ns"])) == (0, top)  # exact, not rounded through a float
    assert exp.ranges.loc[exp.ranges["range_id"] == 5, "name"].tolist() == ["décodé ✓"]
    assert int(exp.gpu_ops["end_ns"].max()) == top - 1
    ranges = api.project(export).dropna(subset=["gpu_start_ns"])
    span = (ranges["gpu_end_ns"] - ranges["gpu_start_ns"]).astype("int64")
    assert ((ranges["gpu_busy_ns"] >= 0) & (ranges["gpu_busy_ns"] <= span)).all()  # no overflow
    assert int(ranges.loc[ranges["range_id"] == 3, "end_ns"].iloc[0]) == top
    assert int(ranges.loc[ranges["range_id"] == 3, "gpu_end_ns"].iloc[0]) == top - 1


def _copy_row(table: str, changes: str, row: str = "1") -> list[str]:
    """Statements that add a copy of `table`'s row `row` with `changes` (SET clauses)."""
    return [f'CREATE TEMP TABLE c AS SELECT * FROM "{table}" WHERE rowid = {row}', f"UPDATE c SET {changes}",
            f'INSERT INTO "{table}" SELECT * FROM c', "DROP TABLE c"]


def test_a_capture_spanning_2_62_ns_projects_exactly(tmp_path: Path) -> None:
    """A range and a kernel just under the limit on a thread of their own: the projection shifts each thread's
    (and each range's) times above the previous one's, which must not overflow; every other range projects exactly
    as in the export without them."""
    top = MAX_TIMESTAMP_NS - 1
    con = sqlite3.connect(TINY)
    (gtid,) = con.execute("SELECT globalTid FROM NVTX_EVENTS WHERE eventType = 59 LIMIT 1").fetchone()
    con.close()
    far = gtid + 1  # same process, another thread
    export = _sqlite(tmp_path, [
        *_copy_row("NVTX_EVENTS", f'start = 1, "end" = {top}, globalTid = {far}, text = \'far\', textId = NULL',
                   FIRST_RANGE),
        *_copy_row("CUPTI_ACTIVITY_KIND_RUNTIME", f'start = {top - 100}, "end" = {top - 90}, globalTid = {far}, '
                                                 "correlationId = 999999"),
        *_copy_row("CUPTI_ACTIVITY_KIND_KERNEL", f'start = {top - 50}, "end" = {top - 10}, correlationId = 999999'),
    ])
    cols = ["range_id", "level", "parent_id", "gpu_start_ns", "gpu_end_ns", "gpu_busy_ns", "gpu_ops"]
    before = api.project(TINY)[cols]
    after = api.project(export)[cols]
    new = after[~after["range_id"].isin(before["range_id"])]
    assert new.drop(columns="range_id").to_dict("records") == [
        {"level": 0, "parent_id": None, "gpu_start_ns": top - 50, "gpu_end_ns": top - 10, "gpu_busy_ns": 40,
         "gpu_ops": 1}]
    pd.testing.assert_frame_equal(after[after["range_id"].isin(before["range_id"])].reset_index(drop=True),
                                  before.reset_index(drop=True))


# ---- parquetdir --------------------------------------------------------------------------------------------------
def _parquetdir(tmp_path: Path, table: str, change) -> Path:
    export = tmp_path / "x.parquetdir"
    shutil.copytree(TINY_DIR, export)
    file = export / f"{table}.parquet"
    pq.write_table(change(pq.read_table(file)), file)
    return export


def _set(column: str, row: int, value: object, type_: pa.DataType | None = None):
    """A change of a table: `column` at 1-based `row` set to `value` (the column cast to `type_` first)."""
    def change(t: pa.Table) -> pa.Table:
        values = t[column].to_pylist()
        values[row - 1] = value
        i = t.schema.get_field_index(column)
        return t.set_column(i, column, pa.array(values, type=type_ or t.schema.field(i).type))
    return change


def _rename(old: str, new: str):
    return lambda t: t.rename_columns([new if c == old else c for c in t.column_names])


PARQUET_CASES = [
    ("CUPTI_ACTIVITY_KIND_KERNEL", _set("start", 3, -100),
     "table CUPTI_ACTIVITY_KIND_KERNEL column start holds -100 in row 3, a negative timestamp: a damaged export"),
    ("CUPTI_ACTIVITY_KIND_KERNEL", _set("end", 4, INT64_MAX),
     f"table CUPTI_ACTIVITY_KIND_KERNEL column end holds {INT64_MAX} in row 4, beyond any capture's clock (2**62 ns, "
     "146 years): a damaged export"),
    ("NVTX_EVENTS", _set("end", 5, INT64_MAX),  # a column with empty cells: read exactly, not through a float
     f"table NVTX_EVENTS column end holds {INT64_MAX} in row 5, beyond any capture's clock (2**62 ns, 146 years): "
     "a damaged export"),
    ("NVTX_EVENTS", _set("end", 5, 2**62 + 1),
     f"table NVTX_EVENTS column end holds {2**62 + 1} in row 5, beyond any capture's clock (2**62 ns, 146 years): "
     "a damaged export"),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", _set("start", 2, -9),
     "table CUPTI_ACTIVITY_KIND_RUNTIME column start holds -9 in row 2, a negative timestamp: a damaged export"),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", lambda t: t.set_column(t.schema.get_field_index("globalTid"), "globalTid",
                                                         pa.array([2**64 - 1] * t.num_rows, type=pa.uint64())),
     "table CUPTI_ACTIVITY_KIND_RUNTIME column globalTid holds 18446744073709551615 in row 1, beyond the 64-bit "
     "integers (a damaged or foreign table)"),
    ("NVTX_EVENTS", _set("text", 1, b"\xff\xfeA", pa.large_binary()),
     "table NVTX_EVENTS column text holds b'\\xff\\xfeA' in row 1, not UTF-8 text (a damaged or foreign table)"),
    ("StringIds", _set("value", 50, b"\x80", pa.binary()),
     "table StringIds column value holds b'\\x80' in row 50, not UTF-8 text (a damaged or foreign table)"),
    ("NVTX_EVENTS", lambda t: _rename("textId", "tid")(_rename("text", "txt")(t)),
     "table NVTX_EVENTS has neither a text nor a textId column (the ranges' names): a damaged or foreign table"),
    ("CUPTI_ACTIVITY_KIND_KERNEL", lambda t: _rename("shortName", "s")(_rename("demangledName", "d")(t)),
     "table CUPTI_ACTIVITY_KIND_KERNEL has neither a demangledName nor a shortName column (the kernels' names): a "
     "damaged or foreign table"),
]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("table", "change", "message"), PARQUET_CASES)
def test_parquetdir_contents_are_checked(table: str, change, message: str, how: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    export = _parquetdir(tmp_path, table, change)
    assert _refused(how, export, tmp_path, capsys) == message


def test_parquetdir_text_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A string column whose bytes are not UTF-8 (Arrow reads it; pandas cannot decode it)."""
    def change(t: pa.Table) -> pa.Table:
        values = t["value"].cast(pa.binary()).to_pylist()
        values[49] = b"\xffA"
        i = t.schema.get_field_index("value")
        return t.set_column(i, "value", pa.array(values, pa.binary()).view(pa.string()))
    export = _parquetdir(tmp_path, "StringIds", change)
    message = "table StringIds column value holds b'\\xffA' in row 50, not UTF-8 text (a damaged or foreign table)"
    for how in HOW:
        assert _refused(how, export, tmp_path, capsys) == message
