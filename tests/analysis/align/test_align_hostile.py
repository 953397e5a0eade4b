"""Hostile input to `kvscope align`: damaged exports, failing writes, failing nsys exports. Every case ends in one
line on stderr and exit code 2 (or a KvscopeError from the functions), and leaves no output folder behind."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import fail, leftovers, snapshot
from paths import DATA
from synthetic_export import sqlite_copy

import kvscope.analysis.align.pipeline as report_align
from kvscope.analysis.align.pipeline import OUTPUT_FILES, analyse
from kvscope.analysis.nsys.export import export_rep, load_export
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, read_metadata, write_parquet
from kvscope.schema import CLASS_ROOFLINE_FILE

DATA = DATA / "nsys"
ENOSPC_MESSAGE = os.strerror(errno.ENOSPC)


# ---- class 1: the output folder is written whole or not at all -----------------------------------------------------
def _enospc_on_third(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    written: list[str] = []
    real = report_align.write_parquet

    def writer(df: pd.DataFrame, path: Path, metadata: dict) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, ENOSPC_MESSAGE, str(path))
        real(df, path, metadata)
        written.append(path.name)

    monkeypatch.setattr(report_align, "write_parquet", writer)
    return written


@pytest.mark.parametrize("state", ["absent", "absent-with-parents", "empty", "previous-output"])
def test_disk_full_on_third_table_leaves_out_untouched(state: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a" / "b" / "al" if state == "absent-with-parents" else tmp_path / "al"
    if state == "empty":
        out.mkdir()
    if state == "previous-output":
        assert main(["align", str(DATA / "tiny.sqlite"), "--out", str(out)]) == 0
        capsys.readouterr()
    before = snapshot(out) if out.exists() else None
    written = _enospc_on_third(monkeypatch)
    line = fail(["align", str(DATA / "tiny.sqlite"), "--out", str(out)], capsys)
    assert written == list(OUTPUT_FILES[:2])
    assert line == f"kvscope: error: cannot write --out {out}: {ENOSPC_MESSAGE}"
    if state.startswith("absent"):
        assert not out.exists()
        assert not (tmp_path / "a").exists()  # parents it made are removed too
    else:
        assert out.is_dir() and snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_failed_rename_leaves_previous_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "al"
    assert main(["align", str(DATA / "tiny.sqlite"), "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    real = os.replace
    calls: list[str] = []

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(Path(dst).name)
        if Path(dst) == out and ".partial-" in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    line = fail(["align", str(DATA / "tiny.sqlite"), "--out", str(out)], capsys)
    assert line == f"kvscope: error: cannot write --out {out}: {os.strerror(errno.EIO)}"
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_previous_output_is_replaced_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "al"
    assert main(["align", str(DATA / "tiny.sqlite"), "--out", str(out)]) == 0
    assert len(pd.read_parquet(out / "ranges.parquet")) == 165
    assert main(["align", str(DATA / "qwen25-05b.parquetdir"), "--model", "qwen2.5-0.5b", "--out", str(out)]) == 0
    assert len(pd.read_parquet(out / "ranges.parquet")) == 1573
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, "trace.json"])
    # an output with a class roofline is replaced whole by one without (no model given): none of it is left
    assert main(["align", str(DATA / "tiny.sqlite"), "--out", str(out)]) == 0
    without = [f for f in OUTPUT_FILES if f != CLASS_ROOFLINE_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted([*without, "trace.json"])
    assert leftovers(tmp_path) == []
    capsys.readouterr()


@pytest.mark.parametrize(("setup", "message"), [
    ("other-file", "already exists and holds other files; give a new or empty folder"),
    ("align-and-other", "already exists and holds other files; give a new or empty folder"),
    ("subfolder", "already exists and holds other files; give a new or empty folder"),
    ("file", "already exists and is a file; give a new or empty folder"),
    ("symlink", "is a symbolic link; give the folder's own path"),
])
def test_out_that_is_not_ours_is_refused_before_the_analysis(setup: str, message: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "al"
    if setup == "file":
        out.write_text("mine")
    elif setup == "symlink":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    else:
        out.mkdir()
        if setup == "subfolder":
            (out / "ranges.parquet").mkdir()
        else:
            (out / "notes.txt").write_text("mine")
        if setup == "align-and-other":
            (out / "align.parquet").write_bytes(b"x")
    before = snapshot(tmp_path)

    def no_analysis(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the analysis ran before --out was checked")

    monkeypatch.setattr(report_align, "load_export", no_analysis)
    line = fail(["align", str(DATA / "tiny.sqlite"), "--out", str(out)], capsys)
    assert line == f"kvscope: error: --out {out} {message}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["under-a-file", "under-a-file-deeper"])
def test_out_that_cannot_be_made(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "al" if where == "under-a-file" else blocker / "x" / "al"
    line = fail(["align", str(DATA / "tiny.sqlite"), "--out", str(out)], capsys)
    assert line == f"kvscope: error: --out {out} cannot be written ({blocker} is not a writable folder)"
    assert blocker.read_text() == "x"


def test_mkdir_refused_by_the_system(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the process may not write (root ignores mode bits, so the refusal is simulated)."""

    def refuse(*_args: object, **_kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "new" / "al"
    line = fail(["align", str(DATA / "tiny.sqlite"), "--out", str(out)], capsys)
    assert line == f"kvscope: error: --out {out} cannot be written: {os.strerror(errno.EACCES)}"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, KvscopeError])
def test_atomic_folder_discards_on_any_error(interrupt: type[BaseException], tmp_path: Path) -> None:
    final = tmp_path / "x" / "out"
    folder = AtomicFolder(final, "--out")
    with pytest.raises(interrupt), folder as tmp:
        (tmp / "a.txt").write_text("half")
        raise interrupt()
    assert not (tmp_path / "x").exists()


def test_atomic_folder_commits_with_a_plain_mode(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with AtomicFolder(final, "--out") as tmp:
        (tmp / "a.txt").write_text("whole")
    assert (final / "a.txt").read_text() == "whole"
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()
    assert leftovers(tmp_path) == []


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# ---- class 2: damaged or foreign exports -----------------------------------------------------------------------------
def _parquetdir(tmp_path: Path) -> Path:
    copy = tmp_path / "x.parquetdir"
    shutil.copytree(DATA / "tiny.parquetdir", copy)
    return copy


def _truncate(path: Path, keep_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:keep_bytes])


@pytest.mark.parametrize(("table", "damage", "message"), [
    ("NVTX_EVENTS", "truncate", "table NVTX_EVENTS cannot be read (Parquet magic bytes not found in footer."),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", "truncate", "table CUPTI_ACTIVITY_KIND_RUNTIME cannot be read (Parquet magic "
                                                "bytes not found in footer."),
    ("CUPTI_ACTIVITY_KIND_KERNEL", "empty", "table CUPTI_ACTIVITY_KIND_KERNEL cannot be read (Parquet file size is 0 "
                                            "bytes)"),
    ("StringIds", "text", "table StringIds cannot be read (Parquet magic bytes not found in footer."),
    ("CUPTI_ACTIVITY_KIND_KERNEL", "folder", "table CUPTI_ACTIVITY_KIND_KERNEL (CUPTI_ACTIVITY_KIND_KERNEL.parquet) "
                                             "is not a file"),
    ("NVTX_EVENTS", "foreign", "table NVTX_EVENTS lacks column(s) start, eventType, globalTid (a damaged or foreign "
                               "table)"),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", "foreign", "table CUPTI_ACTIVITY_KIND_RUNTIME lacks column(s) start, end, "
                                               "globalTid, correlationId"),
    ("CUPTI_ACTIVITY_KIND_KERNEL", "start-as-text", "table CUPTI_ACTIVITY_KIND_KERNEL column start holds 'soon' in "
                                                    "row 1, not an integer (a damaged or foreign table)"),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", "start-as-text", "table CUPTI_ACTIVITY_KIND_RUNTIME column start holds 'soon' in "
                                                     "row 1, not an integer"),
    ("CUPTI_ACTIVITY_KIND_KERNEL", "start-as-fraction", "table CUPTI_ACTIVITY_KIND_KERNEL column start holds 0.5 in "
                                                        "row 1, not an integer"),
    ("CUPTI_ACTIVITY_KIND_KERNEL", "start-empty", "table CUPTI_ACTIVITY_KIND_KERNEL column start is empty in 1 "
                                                  "row(s) (first: row 1): a damaged export"),
    ("CUPTI_ACTIVITY_KIND_RUNTIME", "gtid-overflow", "table CUPTI_ACTIVITY_KIND_RUNTIME column globalTid holds "
                                                     "18446744073709551615 in row 1, beyond the 64-bit integers (a "
                                                     "damaged or foreign table)"),
    ("StringIds", "remove", "export has no StringIds table, which CUPTI_ACTIVITY_KIND_KERNEL.demangledName refers to "
                            "for names (a damaged or partial export)"),
])
def test_damaged_parquetdir(table: str, damage: str, message: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    export = _parquetdir(tmp_path)
    file = export / f"{table}.parquet"
    if damage == "truncate":
        _truncate(file, file.stat().st_size // 2)
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "text":
        file.write_text("id,value\n1,a\n")
    elif damage == "folder":
        file.unlink()
        file.mkdir()
    elif damage == "foreign":
        pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), file)
    elif damage.startswith("start-"):
        df = pq.read_table(file).to_pandas()
        if damage == "start-as-text":
            df["start"] = df["start"].astype(str)
            df.loc[0, "start"] = "soon"
        elif damage == "start-as-fraction":
            df["start"] = df["start"].astype(float)
            df.loc[0, "start"] = 0.5
        else:
            df["start"] = df["start"].astype("Int64")
            df.loc[0, "start"] = pd.NA
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), file)
    elif damage == "gtid-overflow":
        table_ = pq.read_table(file)
        gtid = pa.array([2**64 - 1] * table_.num_rows, type=pa.uint64())
        pq.write_table(table_.set_column(table_.schema.get_field_index("globalTid"), "globalTid", gtid), file)
    elif damage == "remove":
        file.unlink()
    out = tmp_path / "out"
    line = fail(["align", str(export), "--out", str(out)], capsys)
    assert line.startswith(f"kvscope: error: {export}: ")
    assert message in line
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(KvscopeError) as info:
        analyse(export)
    assert message in str(info.value)


def _sqlite(tmp_path: Path, *statements: str) -> Path:
    return sqlite_copy(DATA / "tiny.sqlite", tmp_path / "x.sqlite", *statements)


@pytest.mark.parametrize(("statements", "message"), [
    (["UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET start = 'soon' WHERE rowid = 7"],
     "table CUPTI_ACTIVITY_KIND_KERNEL column start holds 'soon' in row 7, not an integer (a damaged or foreign "
     "table)"),
    (["UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET \"end\" = '12x' WHERE rowid = 3"],
     "table CUPTI_ACTIVITY_KIND_KERNEL column end holds '12x' in row 3, not an integer"),
    (["UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET correlationId = 'abc' WHERE rowid = 2"],
     "table CUPTI_ACTIVITY_KIND_RUNTIME column correlationId holds 'abc' in row 2, not an integer"),
    (["UPDATE CUPTI_ACTIVITY_KIND_MEMCPY SET correlationId = NULL WHERE rowid IN (2, 5)"],
     "table CUPTI_ACTIVITY_KIND_MEMCPY column correlationId is empty in 2 row(s) (first: row 2): a damaged export"),
    (["UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET globalTid = NULL WHERE rowid = 9"],
     "table CUPTI_ACTIVITY_KIND_RUNTIME column globalTid is empty in 1 row(s) (first: row 9)"),
    (["UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET globalPid = 'p1' WHERE rowid = 1"],
     "table CUPTI_ACTIVITY_KIND_KERNEL column globalPid holds 'p1' in row 1, not an integer"),
    (["UPDATE NVTX_EVENTS SET start = 1.5 WHERE eventType = 59 AND rowid = (SELECT min(rowid) FROM NVTX_EVENTS "
      "WHERE eventType = 59)"],
     "table NVTX_EVENTS column start holds 1.5 in row"),
    (["UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET \"end\" = start - 1 WHERE rowid = 4"],
     "table CUPTI_ACTIVITY_KIND_KERNEL has 1 row(s) that end before they start (first: row 4): a damaged export"),
    (["UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET \"end\" = start - 5 WHERE rowid IN (10, 11)"],
     "table CUPTI_ACTIVITY_KIND_RUNTIME has 2 row(s) that end before they start (first: row 10)"),
    (["DROP TABLE StringIds"],
     "export has no StringIds table, which CUPTI_ACTIVITY_KIND_KERNEL.demangledName refers to for names (a damaged "
     "or partial export)"),
    (["DELETE FROM StringIds WHERE id = (SELECT max(textId) FROM NVTX_EVENTS)"],
     "row(s) of NVTX_EVENTS.textId refer to string ids missing from StringIds (first: "),
    (["ALTER TABLE StringIds RENAME TO S2", "CREATE TABLE StringIds (id INTEGER, value TEXT)",
      "INSERT INTO StringIds SELECT id, value FROM S2", "INSERT INTO StringIds SELECT id, value FROM S2 LIMIT 1"],
     "table StringIds holds id "),
    (["ALTER TABLE CUPTI_ACTIVITY_KIND_RUNTIME RENAME COLUMN correlationId TO corr"],
     "table CUPTI_ACTIVITY_KIND_RUNTIME lacks column(s) correlationId (a damaged or foreign table)"),
    (["DROP TABLE NVTX_EVENTS"], "export has no NVTX_EVENTS table"),
    (["DROP TABLE CUPTI_ACTIVITY_KIND_RUNTIME"], "export has no CUPTI_ACTIVITY_KIND_RUNTIME table"),
    (["DELETE FROM CUPTI_ACTIVITY_KIND_RUNTIME"],
     "none of the export's 736 GPU operations has its launching CUDA API call in CUPTI_ACTIVITY_KIND_RUNTIME (same "
     "process and correlation id): a damaged or partial export"),
    (["UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET correlationId = correlationId + 1000000"],
     "none of the export's 736 GPU operations has its launching CUDA API call"),
    (["UPDATE StringIds SET value = 'not a region ' || id WHERE id IN (SELECT textId FROM NVTX_EVENTS)"],
     "none of the 165 ranges in the NVTX domain 'kvscope' has a kvscope region name"),
])
def test_damaged_sqlite(statements: list[str], message: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    export = _sqlite(tmp_path, *statements)
    out = tmp_path / "out"
    line = fail(["align", str(export), "--out", str(out)], capsys)
    assert line.startswith(f"kvscope: error: {export}")
    assert message in line, line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is not an nsys export (an empty file)"),
    (b"\x00\x01garbage" * 300, "is not an nsys export (not an SQLite database: file is not a database)"),
    (b"id,value\n1,a\n", "is not an nsys export (not an SQLite database: file is not a database)"),
    ("half", ": a damaged SQLite database (database disk image is malformed): a truncated or damaged export"),
    ("no-nsys-tables", "is not an nsys export (an SQLite database without any of its tables)"),
])
def test_file_that_is_not_an_export(content: bytes | str, message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "x.sqlite"
    if content == "half":
        export.write_bytes((DATA / "tiny.sqlite").read_bytes()[:200_000])
    elif content == "no-nsys-tables":
        con = sqlite3.connect(export)
        con.execute("CREATE TABLE t (a INTEGER)")
        con.commit()
        con.close()
    else:
        export.write_bytes(content)
    line = fail(["align", str(export), "--out", str(tmp_path / "out")], capsys)
    assert line == f"kvscope: error: {export}{'' if content == 'half' else ' '}{message}".replace(" :", ":")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table", ["CUPTI_ACTIVITY_KIND_KERNEL", "NVTX_EVENTS", "StringIds"])
def test_damaged_page_inside_sqlite(table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A table's first page overwritten: the schema reads, the table does not."""
    con = sqlite3.connect(DATA / "tiny.sqlite")
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    con.close()
    data = bytearray((DATA / "tiny.sqlite").read_bytes())
    page_bytes = int.from_bytes(data[16:18], "big")
    data[(root - 1) * page_bytes:root * page_bytes] = b"\xff" * page_bytes
    export = tmp_path / "x.sqlite"
    export.write_bytes(bytes(data))
    line = fail(["align", str(export), "--out", str(tmp_path / "out")], capsys)
    assert line == (f"kvscope: error: {export}: table {table} cannot be read (database disk image is malformed): a "
                    "truncated, damaged or foreign export")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("how", "message"), [
    ("truncate", "cannot read {t} (Could not open Parquet input source"),
    ("empty", "{t} is empty (0 bytes)"),
    ("folder", "{t} is not a file"),
    ("no-rows", "{t} has no rows"),
    ("no-dur", "{t} lacks column(s) dur_ms (not kvscope timings, or a damaged one)"),
    ("dur-text", "{t}: column dur_ms holds 'slow' in row 2, not a number (not kvscope timings, or a damaged one)"),
    ("rep-fraction", "{t}: column rep holds 1.5 in row 2, not a whole number"),
    ("batch-text", "{t}: column batch holds 'one' in row 1, not a number"),
])
def test_damaged_timings(how: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(DATA / "tiny-run", run)
    t = run / "timings.parquet"
    df = pd.read_parquet(t)
    if how == "truncate":
        t.write_bytes(t.read_bytes()[:300])
    elif how == "empty":
        t.write_bytes(b"")
    elif how == "folder":
        t.unlink()
        t.mkdir()
    elif how == "no-rows":
        df.iloc[:0].to_parquet(t)
    elif how == "no-dur":
        df.drop(columns="dur_ms").to_parquet(t)
    elif how == "dur-text":
        df.astype({"dur_ms": str}).assign(dur_ms=lambda d: d["dur_ms"].where(d.index != 1, "slow")).to_parquet(t)
    elif how == "rep-fraction":
        df.astype({"rep": "float64"}).assign(rep=lambda d: d["rep"].where(d.index != 1, 1.5)).to_parquet(t)
    elif how == "batch-text":
        df.astype({"batch": str}).assign(batch=lambda d: d["batch"].where(d.index != 0, "one")).to_parquet(t)
    out = tmp_path / "out"
    line = fail(["align", str(DATA / "tiny.sqlite"), "--timings", str(run), "--out", str(out)], capsys)
    assert line.startswith("kvscope: error: " + message.format(t=t)), line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("rows", "rank", "message"), [
    ([7], False, "timings hold 2 rows of the region 'sample' (rep 0, step 0; in 'run bs=1 seq=32 gen=4'); a run's "
                 "timings hold each region once"),
    ([0, 0], False, "timings hold 3 rows of the region 'run bs=1 seq=32 gen=4'; a run's timings hold each region once"),
    ([], True, "timings hold 2 rows of the region 'run bs=1 seq=32 gen=4'; a run's timings hold each region once (a "
               "tensor-parallel run's: align each rank with its own rows)"),
])
def test_the_join_refuses_a_region_timed_twice(rows: list[int], rank: bool, message: str) -> None:
    """Timings that reach the join unchecked (not through read_timings) with a region twice: each would match the same
    range, so every such region would be counted twice; refused."""
    t = pd.read_parquet(DATA / "tiny-run" / "timings.parquet")
    t = pd.concat([t, t.iloc[rows]], ignore_index=True)
    if rank:  # two ranks' rows, given to the one-process alignment
        t = pd.concat([t.assign(rank=0), t.assign(rank=1)], ignore_index=True)
    with pytest.raises(KvscopeError) as info:
        analyse(DATA / "tiny.sqlite", t)
    assert str(info.value) == message


@pytest.mark.parametrize(("how", "message"), [
    ("nan", "column dur_ms holds nan in row 1; a duration is a finite number >= 0"),
    ("negative", "column dur_ms holds -1.0 in row 1; a duration is a finite number >= 0"),
    ("repeated", "rows 53 and 54 are the same region ('sample', rep 1, step 3): a run's timings hold each "
                 "region once (rows repeated, or two runs' timings in one file?)"),
])
def test_align_refuses_what_the_run_never_wrote(how: str, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`kvscope align --timings` with a duration that is NaN or negative, or a region twice: refused in one line,
    nothing written (it was aligned with exit code 0)."""
    t = DATA / "tiny-run" / "timings.parquet"
    df = pd.read_parquet(t)
    if how == "repeated":
        df = pd.concat([df, df.tail(1)], ignore_index=True)
    else:
        df.loc[0, "dur_ms"] = float("nan") if how == "nan" else -1.0
    run = tmp_path / "run"
    shutil.copytree(DATA / "tiny-run", run)
    write_parquet(df, run / "timings.parquet", read_metadata(t))
    out = tmp_path / "out"
    line = fail(["align", str(DATA / "tiny.sqlite"), "--timings", str(run), "--out", str(out)], capsys)
    assert line == f"kvscope: error: {run / 'timings.parquet'}: {message}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_valid_exports_still_align() -> None:
    """The checks accept both real captures in both formats."""
    for name, ranges in (("tiny.sqlite", 165), ("tiny.parquetdir", 165), ("qwen25-05b.sqlite", 1573)):
        assert len(analyse(DATA / name).ranges) == ranges


# ---- class 6: a failed nsys export names the user's file -----------------------------------------------------------
def _fake_nsys(tmp_path: Path, body: str) -> Path:
    """A stand-in for nsys: `nsys export --type sqlite --force-overwrite true -o TARGET REP` runs `body` with
    $TARGET and $REP set."""
    exe = tmp_path / "nsys"
    exe.write_text(f'#!/bin/sh\nTARGET="$7"\nREP="$8"\n{body}\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize(("body", "message"), [
    ('echo "Error: could not write $TARGET" >&2; exit 3',
     "nsys export of {rep} failed (exit code 3): Error: could not write the SQLite output"),
    ('echo "cannot create folder $(dirname "$TARGET")" >&2; exit 1',
     "nsys export of {rep} failed (exit code 1): cannot create folder the output folder"),
    ("exit 0", "nsys export of {rep} failed (exit code 0): no output"),
    ('echo "wrote $TARGET"; exit 2', "nsys export of {rep} failed (exit code 2): wrote the SQLite output"),
    ('printf "garbage" > "$TARGET"', "{rep} is not an nsys export (not an SQLite database: file is not a database)"),
    (': > "$TARGET"', "{rep} is not an nsys export (an empty file)"),
])
def test_failed_rep_export_names_the_rep(body: str, message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    rep = tmp_path / "capture.nsys-rep"
    rep.write_bytes(b"rep")
    exe = _fake_nsys(tmp_path, body)
    line = fail(["align", str(rep), "--nsys", str(exe), "--out", str(tmp_path / "out")], capsys)
    assert line == "kvscope: error: " + message.format(rep=rep)
    assert str(tmp_root) not in line
    assert list(tmp_root.iterdir()) == []  # the temporary export is gone
    assert not (tmp_path / "out").exists()


def test_rep_export_that_works_names_the_rep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    rep = tmp_path / "capture.nsys-rep"
    rep.write_bytes(b"rep")
    exe = _fake_nsys(tmp_path, f'cp "{DATA / "tiny.sqlite"}" "$TARGET"')
    exp = load_export(rep, nsys=str(exe))
    assert exp.source == rep and len(exp.ranges) == 165
    assert list(tmp_root.iterdir()) == []
    # a damaged export behind an .nsys-rep is named by the .nsys-rep
    damaged = _sqlite(tmp_path, "DROP TABLE StringIds")
    exe = _fake_nsys(tmp_path, f'cp "{damaged}" "$TARGET"')
    with pytest.raises(KvscopeError) as info:
        load_export(rep, nsys=str(exe))
    assert str(info.value).startswith(f"{rep}: export has no StringIds table")
    assert list(tmp_root.iterdir()) == []


def test_nsys_that_cannot_run(tmp_path: Path) -> None:
    rep = tmp_path / "capture.nsys-rep"
    rep.write_bytes(b"rep")
    exe = tmp_path / "nsys"
    exe.write_text("not a program")
    exe.chmod(0o644)
    with pytest.raises(KvscopeError) as info:
        export_rep(rep, str(exe))
    assert str(info.value) == f"nsys export of {rep} failed: cannot run {exe} ({os.strerror(errno.EACCES)})"


# ---- analysis imports no torch and no pyplot ---------------------------------------------------------------------
def test_analysis_imports_neither_torch_nor_pyplot() -> None:
    code = ("import sys\n"
            "import kvscope.analysis.align.join, kvscope.analysis.inputs, kvscope.analysis.align.kernel_classes\n"
            "import kvscope.analysis.kv_math, kvscope.analysis.nsys.export, kvscope.analysis.nsys.projection\n"
            "import kvscope.analysis.report.build, kvscope.analysis.align.pipeline, kvscope.analysis.roofline\n"
            "import kvscope.io\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'kvscope.profiler'))\n"
            "       or m == 'matplotlib.pyplot']\n"
            "print(bad)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_contract_constants_match_the_profiler() -> None:
    from kvscope.profiler import graph
    from kvscope.schema import GRAPH_CLOCK

    assert graph.GRAPH_CLOCK == GRAPH_CLOCK
