"""Run folders and timings that do not hold one run, or hold impossible values (issue 22, cause 6): every reader
(`kvscope report`, `kvscope align --timings`, `kvscope.load_run`, `kvscope.align`) refuses them in one line naming
the file and its first bad row; a run's own files, copied or rewritten, are still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import fail, leftovers
from paths import DATA
from tiny_run import tiny_run

import kvscope
from kvscope.analysis.align.pipeline import analyse, write
from kvscope.analysis.inputs import checked_timings
from kvscope.analysis.report.run import run_report
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata, write_parquet

NSYS = DATA / "nsys"
TINY = NSYS / "tiny-run"  # bs=1 seq=32 gen=4 at layer granularity, 53 timed regions
QWEN = NSYS / "qwen25-05b-run"  # another run of the same shape


def _copy(tmp_path: Path, source: Path = TINY, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(source, run)
    return run


def _rewrite(path: Path, df: pd.DataFrame, like: Path | None = None) -> None:
    """`df` written to `path` with the kvscope metadata of `like` (default: `path`'s own)."""
    write_parquet(df, path, read_metadata(like or path))


def _api_message(fn: Any, *args: Any) -> str:
    with pytest.raises(KvscopeError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- values that no run writes -----------------------------------------------------------------------------------
def _damaged(t: pd.DataFrame, how: str) -> pd.DataFrame:
    t = t.copy()
    if how == "nan-duration":
        t.loc[3, "dur_ms"] = np.nan
    elif how == "negative-duration":
        t.loc[4, "dur_ms"] = -0.5
    elif how == "infinite-duration":
        t.loc[5, "dur_ms"] = np.inf
    elif how == "empty-duration":
        t["dur_ms"] = t["dur_ms"].astype("Float64")
        t.loc[2, "dur_ms"] = pd.NA
    elif how == "nan-start":
        t.loc[2, "start_ms"] = np.nan
    elif how == "infinite-start":
        t.loc[6, "start_ms"] = -np.inf
    elif how == "repeated-region":
        t = pd.concat([t, t.iloc[[7]]], ignore_index=True)
    elif how == "two-runs":
        t["run_id"] = t["run_id"].astype(object)
        t.loc[9, "run_id"] = "other"
    return t


_BAD_VALUES = [
    ("nan-duration", "column dur_ms holds nan in row 4; a duration is a finite number >= 0"),
    ("negative-duration", "column dur_ms holds -0.5 in row 5; a duration is a finite number >= 0"),
    ("infinite-duration", "column dur_ms holds inf in row 6; a duration is a finite number >= 0"),
    ("empty-duration", "column dur_ms holds an empty cell in row 3; a duration is a finite number >= 0"),
    ("nan-start", "column start_ms holds nan in row 3; a start time is a finite number"),
    ("infinite-start", "column start_ms holds -inf in row 7; a start time is a finite number"),
    ("repeated-region", "rows 8 and 54 are the same region ('sample', rep 0, step 0): a run's timings hold each "
                        "region once (rows repeated, or two runs' timings in one file?)"),
    ("two-runs", "row 10 is of run 'other' and row 1 of run 'tiny-run': the timings of one run hold one run_id (two "
                 "runs' timings in one file?)"),
]


@pytest.mark.parametrize(("how", "message"), _BAD_VALUES)
def test_impossible_timings_are_refused_by_every_reader(how: str, message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(tmp_path)
    bad = _damaged(pd.read_parquet(run / "timings.parquet"), how)
    _rewrite(run / "timings.parquet", bad)
    named = f"{run / 'timings.parquet'}: {message}"
    out = tmp_path / "out"
    assert fail(["report", str(run), "--out", str(out)], capsys) == f"kvscope: error: {named}"
    assert fail(["align", str(NSYS / "tiny.sqlite"), "--timings", str(run), "--out", str(out)], capsys) == (
        f"kvscope: error: {named}")
    assert not out.exists() and leftovers(tmp_path) == []
    assert _api_message(kvscope.load_run, run) == named
    assert _api_message(kvscope.align, NSYS / "tiny.sqlite", run) == named
    assert _api_message(kvscope.align, NSYS / "tiny.sqlite", bad) == f"the timings DataFrame: {message}"


def test_regions_repeat_only_across_ranks() -> None:
    """A tensor-parallel run's timings hold every region once per rank; twice in one rank is refused."""
    rows = [{"run_id": "r", "rank": rank, "rep": 0, "level": "phase", "phase": "prefill", "step": 0,
             "name": "prefill", "start_ms": 1.0, "dur_ms": 2.0} for rank in (0, 1)]
    t = pd.DataFrame(rows).astype({"rep": "Int64", "step": "Int64"})
    assert len(checked_timings(t, "t.parquet")) == 2
    twice = pd.concat([t, t.iloc[[0]]], ignore_index=True)
    with pytest.raises(KvscopeError) as info:
        checked_timings(twice, "t.parquet")
    assert str(info.value) == ("t.parquet: rows 1 and 3 are the same region ('prefill', rank 0, rep 0, step 0): a "
                               "run's timings hold each region once (rows repeated, or two runs' timings in one file?)")


# ---- files of two runs in one folder -----------------------------------------------------------------------------
def _created(path: Path) -> str:
    return json.dumps(read_metadata(path)["created_utc"])


def _mix(run: Path, how: str) -> str:
    """Put a file of another run (QWEN) into `run` (a copy of TINY); the message that refuses it."""
    summary = run / "summary.parquet"
    if how == "timings-of-another-run":
        shutil.copy(QWEN / "timings.parquet", run)
        return (f"{run / 'timings.parquet'}: row 1 is of run 'qwen25-05b-run', and {summary} of run 'tiny-run': a run "
                "folder holds the files of one run (a file copied from another run?)")
    if how == "timings-of-another-run-renamed":  # its run_id rewritten: the metadata still tells
        t = pd.read_parquet(QWEN / "timings.parquet").assign(run_id="tiny-run")
        _rewrite(run / "timings.parquet", t, like=QWEN / "timings.parquet")
        return (f"{run / 'timings.parquet'} is not of the run of {summary}: their kvscope metadata differ in "
                f"created_utc ({_created(QWEN / 'timings.parquet')} vs {_created(TINY / 'summary.parquet')}); a run "
                "folder holds the files of one run (a file copied from another run?)")
    if how == "nvml-of-another-run":
        shutil.copy(QWEN / "nvml.parquet", run)
        return (f"{run / 'nvml.parquet'} is not of the run of {summary}: their kvscope metadata differ in "
                f"created_utc ({_created(QWEN / 'nvml.parquet')} vs {_created(TINY / 'summary.parquet')}); a run "
                "folder holds the files of one run (a file copied from another run?)")
    if how == "rank-summary-of-another-run":
        ranks = pd.read_parquet(QWEN / "summary.parquet")
        ranks.insert(0, "rank", 0)
        write_parquet(ranks, run / "rank_summary.parquet", read_metadata(QWEN / "summary.parquet"))
        return (f"{run / 'rank_summary.parquet'}: row 1 is of run 'qwen25-05b-run', and {summary} of run 'tiny-run': "
                "a run folder holds the files of one run (a file copied from another run?)")
    assert how == "swapped"  # summary.parquet and timings.parquet swapped
    (run / "timings.parquet").rename(run / "t")
    (run / "summary.parquet").rename(run / "timings.parquet")
    (run / "t").rename(summary)
    return (f"{summary} lacks column(s) model, device, dtype, attn, granularity, reps, warmup (not a kvscope summary, "
            "or a damaged one)")


@pytest.mark.parametrize("how", ["timings-of-another-run", "timings-of-another-run-renamed", "nvml-of-another-run",
                                 "rank-summary-of-another-run", "swapped"])
@pytest.mark.parametrize("layout", ["run", "nsys"])
def test_files_of_another_run_are_refused(how: str, layout: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(tmp_path, name="run" if layout == "run" else "nsys-out/run")
    given = run if layout == "run" else run.parent  # a `kvscope nsys` folder is read through its run/
    message = _mix(run, how)
    out = tmp_path / "report"
    assert fail(["report", str(given), "--out", str(out)], capsys) == f"kvscope: error: {message}"
    assert not out.exists() and leftovers(tmp_path) == []
    assert _api_message(kvscope.load_run, given) == message


def test_a_runs_own_files_copied_or_rewritten_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder renamed (its run_id is the folder's first name), its timings rewritten by pandas (no metadata
    left: the run_id still tells), its summary's metadata the only one: still one run."""
    run = _copy(tmp_path, name="renamed")
    pd.read_parquet(run / "timings.parquet").to_parquet(run / "timings.parquet")
    (run / "nvml.parquet").unlink()
    loaded = kvscope.load_run(run)
    assert (len(loaded.timings), loaded.nvml, loaded.metadata) == (53, None, read_metadata(TINY / "summary.parquet"))
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.startswith("report: ")


def test_a_run_without_timed_regions_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--granularity none` times no region: its timings have no rows, and that is no damage."""
    tiny_run(tmp_path, "--granularity", "none", "--reps", "2")
    run = tmp_path / "r"
    loaded = kvscope.load_run(run)
    assert (len(loaded.timings), loaded.summary.loc[0, "granularity"]) == (0, "none")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert "granularity none" in (tmp_path / "report" / "report.md").read_text()
    summary = pd.read_parquet(run / "summary.parquet").assign(granularity="layer")  # then no rows is damage
    _rewrite(run / "summary.parquet", summary)
    assert _api_message(kvscope.load_run, run) == f"{run / 'timings.parquet'} has no rows"


def test_damaged_metadata_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, payload in (("summary.parquet", b"{not json"), ("timings.parquet", b"{not json"),
                          ("nvml.parquet", b"\xff\xfe not UTF-8")):
        run = _copy(tmp_path, name=f"run-{name}")
        table = pq.read_table(run / name)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"kvscope": payload}), run / name)
        message = f"{run / name}: its kvscope metadata is not JSON (a damaged file)"
        assert fail(["report", str(run), "--out", str(tmp_path / "out")], capsys) == f"kvscope: error: {message}"
        assert _api_message(kvscope.load_run, run) == message
    run = _copy(tmp_path, name="run-list")
    table = pa.Table.from_pandas(pd.read_parquet(run / "nvml.parquet"), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"kvscope": b"[1, 2]"}), run / "nvml.parquet")
    assert _api_message(kvscope.load_run, run) == (f"{run / 'nvml.parquet'}: its kvscope metadata is not a JSON "
                                                   "object (a damaged file)")


# ---- align results beside a run folder ---------------------------------------------------------------------------
def test_align_results_of_another_capture_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `kvscope nsys` folder whose run/ is not the run its align tables were computed from (the export's run range
    names another shape): refused, naming the steps file and its row."""
    tiny_run(tmp_path)  # bs=1 seq=8 gen=4, on the CPU
    folder = tmp_path / "nsys-out"
    folder.mkdir()
    (tmp_path / "r").rename(folder / "run")
    write(analyse(NSYS / "tiny.sqlite", TINY), folder, {"command": "test"})  # a capture of bs=1 seq=32 gen=4
    capsys.readouterr()
    summary = folder / "run" / "summary.parquet"
    message = (f"{folder / 'steps.parquet'}: row 1 is of 'run bs=1 seq=32 gen=4', and {summary} of 'run bs=1 seq=8 "
               "gen=4': these align results are of another run's capture")
    for given in (folder, folder / "run"):
        assert fail(["report", str(given), "--out", str(tmp_path / "out")], capsys) == f"kvscope: error: {message}"
    assert not (tmp_path / "out").exists()


def test_align_results_beside_a_plain_run_folder_are_not_its_own(tmp_path: Path) -> None:
    """Only a `kvscope nsys` folder's run/ takes the align tables of the folder above it: a run folder kept in a folder
    that holds another analysis is reported alone."""
    holder = tmp_path / "results"
    holder.mkdir()
    write(analyse(NSYS / "tiny.sqlite", TINY), holder, {"command": "test"})
    run = _copy(holder, name="my-run")
    assert "Kernel time by class" not in run_report(run).markdown()
    nsys = _copy(holder, name="run")  # the same folder as an nsys folder's run/ does take them
    assert "Kernel time by class" in run_report(nsys).markdown()
