"""Hostile input to `kvscope report`: damaged run folders and sweep files, output folders it cannot write, a full
disk, and numbers that are not numbers. Bad input (in a sweep file: text, an infinity or a negative value in a number
column) ends in one line on stderr and exit code 2 and leaves no report folder; a missing value is left out of the
plots, and no percentage prints as inf or nan."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import fail, leftovers, snapshot
from matplotlib.figure import Figure
from paths import DATA
from rich.console import Console

from kvscope.analysis.align.join import class_breakdown, ratio, step_activity
from kvscope.analysis.align.pipeline import analyse, summary_tables, write
from kvscope.analysis.report.build import (
    Report,
    make_report,
    md_table,
    percent_change,
    percent_of_total,
    run_report,
    sweep_report,
)
from kvscope.cli import main
from kvscope.errors import KvscopeError

DATA = DATA / "nsys"
RUN = DATA / "qwen25-05b-run"
ENOSPC_MESSAGE = os.strerror(errno.ENOSPC)
INF_OR_NAN = re.compile(r"\b(inf|nan)\b", re.IGNORECASE)


def sweep_frame() -> pd.DataFrame:
    """Four configurations with the columns a sweep file holds."""
    seq, batch = [8, 8, 16, 16], [1, 2, 1, 2]
    return pd.DataFrame({
        "seq_len": seq, "batch": batch,
        "prefill_p50_ms": [1.0, 1.5, 2.0, 3.0], "prefill_ms_per_tok": [0.125, 0.094, 0.125, 0.094],
        "prefill_tok_s": [8000.0, 10600.0, 8000.0, 10600.0], "decode_p50_ms_per_tok": [0.5, 0.3, 0.6, 0.35],
        "decode_tok_s": [2000.0, 6600.0, 1660.0, 5700.0], "total_tok_s": [3000.0, 8000.0, 2500.0, 7000.0],
        "vram_reserved_mb": [10.0, 12.0, 14.0, 18.0], "flag": ["", "", "", ""],
        "model": "tiny", "device": "cpu", "dtype": "float32",
        "kv_predicted_bytes": [s * b * 704 for s, b in zip(seq, batch, strict=True)],
        "kv_alloc_bytes": [s * b * 704 for s, b in zip(seq, batch, strict=True)],
    })


def write_sweep(tmp_path: Path, df: pd.DataFrame | None = None, name: str = "seq.csv") -> Path:
    path = tmp_path / name
    (sweep_frame() if df is None else df).to_csv(path, index=False)
    return path


def run_copy(tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(RUN, copy)
    return copy


def nsys_folder(tmp_path: Path) -> Path:
    """A `kvscope nsys`-shaped folder: run/ plus the align tables beside it."""
    folder = tmp_path / "nsys-out"
    folder.mkdir()
    shutil.copytree(RUN, folder / "run")
    write(analyse(DATA / "qwen25-05b.sqlite", RUN), folder, {"command": "test"})
    return folder


# ---- class 3: damaged run folders --------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    if how == "remove":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "no-rows":
        pd.read_parquet(path).iloc[:0].to_parquet(path)
    elif how == "wrong-columns":
        pd.DataFrame({"a": [1, 2]}).to_parquet(path)
    elif how == "text-numbers":
        df = pd.read_parquet(path)
        col = "dur_ms" if "dur_ms" in df.columns else "batch"
        df[col] = df[col].astype(str)
        df.loc[0, col] = "slow"
        df.to_parquet(path)


@pytest.mark.parametrize(("file", "how", "message"), [
    ("timings.parquet", "remove", "{run}/timings.parquet is missing"),
    ("timings.parquet", "truncate", "cannot read {run}/timings.parquet (Could not open Parquet input source"),
    ("timings.parquet", "empty", "{run}/timings.parquet is empty (0 bytes)"),
    ("timings.parquet", "folder", "{run}/timings.parquet is not a file"),
    ("timings.parquet", "no-rows", "{run}/timings.parquet has no rows"),
    ("timings.parquet", "wrong-columns", "{run}/timings.parquet lacks column(s) level, phase, name, dur_ms (not "
                                         "kvscope timings, or a damaged one)"),
    ("timings.parquet", "text-numbers", "{run}/timings.parquet: column dur_ms holds 'slow' in row 1, not a number"),
    ("summary.parquet", "truncate", "cannot read {run}/summary.parquet ("),
    ("summary.parquet", "empty", "{run}/summary.parquet is empty (0 bytes)"),
    ("summary.parquet", "folder", "{run}/summary.parquet is not a file"),
    ("summary.parquet", "no-rows", "{run}/summary.parquet has no rows"),
    ("summary.parquet", "wrong-columns", "{run}/summary.parquet lacks column(s) run_id, model, device, dtype, attn, "
                                         "granularity, batch, seq_len, gen_tokens, reps, warmup"),
    ("summary.parquet", "text-numbers", "{run}/summary.parquet: column batch holds 'slow' in row 1, not a number"),
    ("summary.parquet", "remove", "{run} is not a kvscope run folder (no summary.parquet in it or in its run/ "
                                  "subfolder)"),
])
def test_damaged_run_folder(file: str, how: str, message: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    run = run_copy(tmp_path)
    _damage(run / file, how)
    out = tmp_path / "rep"
    line = fail(["report", str(run), "--out", str(out)], capsys)
    assert line.startswith("kvscope: error: " + message.format(run=run)), line
    assert not out.exists() and leftovers(tmp_path) == []
    line = fail(["report", str(run)], capsys)  # the default folder, run-report, is not left behind either
    assert not (tmp_path / "run-report").exists()
    with pytest.raises(KvscopeError):
        make_report(run, tmp_path / "rep2")
    assert not (tmp_path / "rep2").exists()


@pytest.mark.parametrize("layout", ["empty-run", "no-run", "run-is-a-file"])
def test_nsys_folder_message_names_what_the_user_gave(layout: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "nsys-out"
    folder.mkdir()
    (folder / "report.sqlite").write_bytes(b"x")
    if layout == "empty-run":
        (folder / "run").mkdir()
    elif layout == "run-is-a-file":
        (folder / "run").write_text("x")
    line = fail(["report", str(folder)], capsys)
    assert line == (f"kvscope: error: {folder} is not a kvscope run folder (no summary.parquet in it or in its run/ "
                    "subfolder)")
    assert not (tmp_path / "nsys-out-report").exists()


def test_damaged_file_inside_nsys_folder_is_named_by_its_path(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = nsys_folder(tmp_path)
    (folder / "run" / "timings.parquet").write_bytes(b"")
    line = fail(["report", str(folder)], capsys)
    assert line == f"kvscope: error: {folder}/run/timings.parquet is empty (0 bytes)"
    assert not (tmp_path / "nsys-out-report").exists()


@pytest.mark.parametrize(("file", "how", "message"), [
    ("kernel_classes.parquet", "truncate", "cannot read {folder}/kernel_classes.parquet ("),
    ("kernel_classes.parquet", "empty", "{folder}/kernel_classes.parquet is empty (0 bytes)"),
    ("kernel_classes.parquet", "wrong-columns", "{folder}/kernel_classes.parquet lacks column(s) phase, kernel_class, "
                                                "ops, time_ms, share_pct"),
    ("steps.parquet", "wrong-columns", "{folder}/steps.parquet lacks column(s) phase, gpu_busy_ms, gpu_idle_ms, "
                                       "launch_bound"),
    ("steps.parquet", "folder", "{folder}/steps.parquet is not a file"),
])
def test_damaged_align_results_beside_the_run(file: str, how: str, message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = nsys_folder(tmp_path)
    _damage(folder / file, how)
    line = fail(["report", str(folder), "--out", str(tmp_path / "r")], capsys)
    assert line.startswith("kvscope: error: " + message.format(folder=folder)), line
    assert not (tmp_path / "r").exists()


def test_nsys_folder_report_has_align_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = nsys_folder(tmp_path)
    assert main(["report", str(folder)]) == 0
    out = tmp_path / "nsys-out-report"
    md = (out / "report.md").read_text()
    assert "## Kernel time by class (Nsight Systems)" in md
    assert "decode steps are launch-bound (GPU idle above 20% of the step's span)." in md
    assert sorted(p.name for p in out.iterdir()) == ["decode_busy_idle.png", "decode_layers.png", "report.md"]
    assert capsys.readouterr().out.startswith(f"report: {out}/report.md")


# ---- class 3: damaged sweep files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    (b"", "{path} is empty: not a kvscope sweep file"),
    (b"\n\n", "{path} is empty: not a kvscope sweep file"),
    (b"seq_len,batch,decode_tok_s\n", "{path} has no rows"),
    (b"a,b\n1,2\n", "{path} is not a kvscope sweep file: no column seq_len"),
    (b"seq_len,decode_tok_s\n8,1.0\n", "{path} is not a kvscope sweep file: no column batch"),
    (b"seq_len,batch,batch\n8,1,1\n", "{path} is not a kvscope sweep file: column batch appears twice"),
    (b"seq_len,batch\neight,1\n", "{path}: column seq_len, line 2: 'eight' is not a positive integer"),
    (b"seq_len,batch\n8,1\n16,NaN\n", "{path}: column batch, line 3: 'NaN' is not a positive integer"),
    (b"seq_len,batch\n8,1\n16,\n", "{path}: column batch, line 3: '' is not a positive integer"),
    (b"seq_len,batch\n8,0\n", "{path}: column batch, line 2: '0' is not a positive integer"),
    (b"seq_len,batch\n8,1\n-16,1\n", "{path}: column seq_len, line 3: '-16' is not a positive integer"),
    (b"seq_len,batch\n8,1.5\n", "{path}: column batch, line 2: '1.5' is not a positive integer"),
    (b"seq_len,batch\ninf,1\n", "{path}: column seq_len, line 2: 'inf' is not a positive integer"),
    (b"seq_len,batch\n8,true\n", "{path}: column batch, line 2: 'true' is not a positive integer"),
    (b"seq_len,batch\n8,1\n\n8,1\n", "{path}: line 4 repeats seq_len=8, batch=1 of line 2; a sweep file holds "
                                     "each configuration once"),
    (b"seq_len,batch\n8,1\n16\n", "{path}: line 3 has 1 fields, the header has 2"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "cannot read {path}: not a CSV file ('utf-8' codec can't decode byte "
                                          "0x89 in position 0: invalid start byte)"),
])
def test_damaged_sweep_csv(content: bytes, message: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "seq.csv"
    path.write_bytes(content)
    line = fail(["report", str(path)], capsys)
    assert line == "kvscope: error: " + message.format(path=path)
    assert not (tmp_path / "seq-report").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["truncate", "empty", "wrong-columns"])
def test_damaged_sweep_parquet(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "seq.parquet"
    sweep_frame().to_parquet(path)
    _damage(path, how)
    line = fail(["report", str(path)], capsys)
    expected = {"truncate": f"cannot read {path}: not a Parquet file (", "empty": f"{path} is empty: not a kvscope "
                "sweep file", "wrong-columns": f"{path} is not a kvscope sweep file: no column seq_len"}[how]
    assert line.startswith("kvscope: error: " + expected), line
    assert not (tmp_path / "seq-report").exists()


# ---- class 3: output folders it cannot write ---------------------------------------------------------------------
@pytest.mark.parametrize(("setup", "message"), [
    ("file", "--out {out} already exists and is a file; give a new or empty folder"),
    ("under-a-file", "--out {out} cannot be written ({tmp}/blocker is not a writable folder)"),
    ("other-content", "--out {out} already exists and holds other files; give a new or empty folder"),
    ("report-and-other", "--out {out} already exists and holds other files; give a new or empty folder"),
    ("source-itself", "--out {out} already exists and holds other files; give a new or empty folder"),
])
def test_out_it_cannot_write(setup: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_sweep(tmp_path)
    out = tmp_path / "o"
    if setup == "file":
        out.write_text("mine")
    elif setup == "under-a-file":
        (tmp_path / "blocker").write_text("x")
        out = tmp_path / "blocker" / "o"
    elif setup in ("other-content", "report-and-other"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if setup == "report-and-other":
            (out / "report.md").write_text("old")
    elif setup == "source-itself":
        out = tmp_path
    before = snapshot(tmp_path)
    line = fail(["report", str(source), "--out", str(out)], capsys)
    assert line == "kvscope: error: " + message.format(out=out, tmp=tmp_path)
    assert snapshot(tmp_path) == before


def test_default_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_sweep(tmp_path)
    (tmp_path / "seq-report").write_text("mine")
    line = fail(["report", str(source)], capsys)
    assert line == (f"kvscope: error: report folder {tmp_path / 'seq-report'} already exists and is a file; give a "
                    "new or empty folder")
    assert (tmp_path / "seq-report").read_text() == "mine"


@pytest.mark.parametrize("errno_code", [errno.EACCES, errno.EROFS])
def test_out_refused_by_the_system(errno_code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the process may not write (root ignores mode bits, so the refusal is simulated)."""
    source = write_sweep(tmp_path)

    def refuse(*_args: object, **_kwargs: object) -> str:
        raise OSError(errno_code, os.strerror(errno_code))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "deep" / "o"
    line = fail(["report", str(source), "--out", str(out)], capsys)
    assert line == f"kvscope: error: --out {out} cannot be written: {os.strerror(errno_code)}"
    assert not (tmp_path / "deep").exists()


def test_earlier_report_is_replaced_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_sweep(tmp_path)
    assert main(["report", str(source)]) == 0
    out = tmp_path / "seq-report"
    (out / "stale_plot.png").write_bytes(b"old")
    df = sweep_frame()
    df["decode_tok_s"] = np.nan  # its plots go
    write_sweep(tmp_path, df)
    assert main(["report", str(source)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "stale_plot.png" not in names and "decode_tok_s_vs_batch.png" not in names
    assert "decode_p50_ms_per_tok_vs_batch.png" in names
    assert leftovers(tmp_path) == []
    capsys.readouterr()


# ---- class 4: numbers that are not numbers; no inf or nan percentages ---------------------------------------------
def _line_data(rep: Report) -> list[np.ndarray]:
    data = []
    for fig in rep.figures.values():
        for ax in fig.axes:
            for line in ax.get_lines():
                data += [np.asarray(line.get_xdata()), np.asarray(line.get_ydata())]
    return data


@pytest.mark.parametrize("spelling", ["NaN", "nan", "NA", "N/A", "null", "None", " ", ""])
def test_missing_value_spellings_are_missing_not_categories(spelling: str, tmp_path: Path) -> None:
    df = sweep_frame().astype({"decode_tok_s": object})
    df.loc[1, "decode_tok_s"] = spelling
    rep = sweep_report(write_sweep(tmp_path, df))
    data = _line_data(rep)
    assert data and all(d.dtype.kind in "if" for d in data)  # numbers, never text categories
    ys = [np.asarray(ln.get_ydata(), dtype=float) for ln in rep.figures["decode_tok_s_vs_seq_len.png"].axes[0].lines]
    np.testing.assert_array_equal(np.sort(np.concatenate(ys)), [1660.0, 2000.0, 5700.0, np.nan])
    assert rep.notes == []
    assert "| 8 | 2 | 1.500 | 0.094 | 10,600.000 | 0.300 |  | 8,000.000 | 12.000 |  |" in rep.markdown()


@pytest.mark.parametrize(("column", "value", "what"), [
    ("decode_tok_s", "fast", "a number"), ("prefill_tok_s", "12 tok/s", "a number"),
    ("vram_reserved_mb", "1,024", "a number"), ("kv_alloc_bytes", "lots", "a number"),
    ("decode_p50_ms_per_tok", "True", "a number"), ("ttft_ms", "inf", "a finite number >= 0"),
    ("decode_tok_s", "-inf", "a finite number >= 0"), ("prefill_p50_ms", "-0.5", "a finite number >= 0"),
    ("kv_predicted_bytes", "-5", "a finite number >= 0"), ("peak_allocated_mib", "-1e3", "a finite number >= 0"),
])
def test_a_bad_number_in_a_sweep_is_refused_not_left_out(column: str, value: str, what: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Text, an infinity or a negative value in a number column: one line naming the cell (the reader of `--resume`
    and `kvscope capacity` says the same), no report, never a column silently left out."""
    df = sweep_frame()
    if column not in df.columns:
        df[column] = 1.0
    df = df.astype({column: object})
    df.loc[2, column] = value
    path = write_sweep(tmp_path, df)
    message = f"kvscope: error: {path}: column {column}, line 4: {value!r} is not {what}"
    assert fail(["report", str(path)], capsys) == message
    assert not (tmp_path / "seq-report").exists() and leftovers(tmp_path) == []
    with pytest.raises(KvscopeError) as info:
        sweep_report(path)
    assert f"kvscope: error: {info.value}" == message
    assert fail(["capacity", "--sweep", str(path), "--gpu-mem-gb", "1", "--tpot-slo-ms", "10", "--ttft-slo-ms",
                 "100", "--prompt", "8", "--output", "2"], capsys) == message


def test_sections_without_data_are_not_written(tmp_path: Path) -> None:
    df = sweep_frame()
    for col in ("prefill_ms_per_tok", "prefill_tok_s", "decode_p50_ms_per_tok", "decode_tok_s", "vram_reserved_mb"):
        df[col] = "n/a"
    df["kv_predicted_bytes"] = np.nan
    df["kv_alloc_bytes"] = np.nan
    rep = sweep_report(write_sweep(tmp_path, df))
    md = rep.markdown()
    assert "## Against" not in md and "## KV cache" not in md and rep.figures == {}
    assert "## Results" in md and rep.notes == []


def test_one_configuration_per_axis_has_no_axis_section(tmp_path: Path) -> None:
    df = sweep_frame()
    df = df[df["batch"] == 1]  # seq 8 and 16, batch 1 only
    rep = sweep_report(write_sweep(tmp_path, df))
    assert "## Against sequence length" in rep.markdown() and "## Against batch size" not in rep.markdown()


@pytest.mark.parametrize(("predicted", "alloc", "shown"), [
    (0, 5632, "n/a (predicted size is 0)"),
    (None, 5632, "n/a (missing value)"),
    (5632, None, "n/a (missing value)"),
    (5632, 5632, "0.0000"),
    (4000, 5000, "25.0000"),
])
def test_kv_percentages_never_inf_or_nan(predicted: int | None, alloc: int | None, shown: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    df = sweep_frame().astype({"kv_predicted_bytes": object, "kv_alloc_bytes": object})
    df.loc[0, "kv_predicted_bytes"] = predicted
    df.loc[0, "kv_alloc_bytes"] = alloc
    path = write_sweep(tmp_path, df)
    assert main(["report", str(path)]) == 0
    md = (tmp_path / "seq-report" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 8 | 1 | ") and ln.count("|") == 6)
    assert row.endswith(f"| {shown} |"), row
    assert not INF_OR_NAN.search(md)
    capsys.readouterr()


def test_percent_helpers() -> None:
    assert percent_change(pd.Series([5.0, 1.0, 1.0, np.nan]), pd.Series([4.0, 0.0, -1.0, 1.0]), "base") == [
        25.0, "n/a (base is 0)", "n/a (base is negative)", "n/a (missing value)"]
    assert percent_of_total(pd.Series([1.0, 3.0]), "total") == [25.0, 75.0]
    assert percent_of_total(pd.Series([0.0, 0.0]), "total") == ["n/a (total is 0)"] * 2
    assert percent_of_total(pd.Series([1.0, -3.0]), "total") == ["n/a (total is negative)"] * 2
    assert md_table(pd.DataFrame({"x": [np.inf, np.nan, 1.5], "y": [pd.NA, 2, 3]}, dtype=object)) == (
        "| x | y |\n| --- | --- |\n| n/a |  |\n|  | 2 |\n| 1.500 | 3 |")


# a negative duration is refused when the timings are read (tests/analysis/test_inputs_hostile.py)
@pytest.mark.parametrize("durations", [[0.0, 0.0]])
def test_decode_op_shares_without_a_positive_total(durations: list[float], tmp_path: Path) -> None:
    run = run_copy(tmp_path)
    t = pd.read_parquet(run / "timings.parquet")
    ops = t.index[t["phase"] == "decode"][:2]
    t["level"] = t["level"].astype(object)
    t.loc[ops, "level"] = "op"
    t["op"] = t["op"].astype(object)
    t.loc[ops, "op"] = ["qkv", "mlp"]
    t.loc[ops, "dur_ms"] = durations
    t.to_parquet(run / "timings.parquet")
    md = run_report(run).markdown()
    reason = "n/a (the decode ops' total time is " + ("0)" if sum(durations) == 0 else "negative)")
    assert md.count(reason) == 2
    assert not INF_OR_NAN.search(md)


def test_class_share_of_a_zero_phase_is_na(tmp_path: Path) -> None:
    folder = nsys_folder(tmp_path)
    classes = pd.read_parquet(folder / "kernel_classes.parquet")
    classes.loc[classes["phase"] == "outside", ["time_ms", "share_pct"]] = [0.0, np.nan]
    classes.to_parquet(folder / "kernel_classes.parquet")
    md = run_report(folder).markdown()
    n_outside = int((classes["phase"] == "outside").sum())
    assert n_outside > 0 and md.count("n/a (phase total 0 ms)") == n_outside
    assert not INF_OR_NAN.search(md)


def test_align_ratios_are_never_infinite() -> None:
    assert ratio(pd.Series([1.0, 1.0, 1.0]), pd.Series([0.0, -2.0, 4.0])).tolist()[2] == 0.25
    assert ratio(pd.Series([1.0, 1.0]), pd.Series([0.0, -2.0])).isna().all()
    kernels = pd.DataFrame({"phase": ["decode", "decode", "prefill"], "kernel_class": ["gemm", "norm", "gemm"],
                            "dur_ns": [0, 0, 10]})
    shares = class_breakdown(kernels).set_index("phase")["share_pct"]
    assert shares.loc["prefill"] == 100.0 and shares.loc["decode"].isna().all()
    steps = pd.DataFrame({"kind": ["step"], "phase": ["decode"], "run": ["r"], "rep": [0], "step": [1], "name": ["s"],
                          "start_ns": [0], "end_ns": [10], "gpu_start_ns": pd.array([5], dtype="Int64"),
                          "gpu_end_ns": pd.array([5], dtype="Int64"), "gpu_busy_ns": [0], "gpu_ops": [1],
                          "gpu_op_rows": [1]})
    act = step_activity(steps)
    assert act["gpu_idle_fraction"].isna().all() and not act["launch_bound"].fillna(False).any()


def test_align_summary_prints_na_not_nan() -> None:
    result = analyse(DATA / "tiny.sqlite")
    result.classes["share_pct"] = np.nan
    result.steps["gpu_idle_fraction"] = np.nan
    con = Console(record=True, width=200)
    for table in summary_tables(result):
        con.print(table)
    text = con.export_text()
    assert "n/a (phase total 0 ms)" in text and "n/a (no GPU span)" in text
    assert not INF_OR_NAN.search(text)


# ---- class 5: a full disk while writing --------------------------------------------------------------------------
def _enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, ENOSPC_MESSAGE)


@pytest.mark.parametrize("state", ["absent", "empty", "earlier-report"])
@pytest.mark.parametrize("what", ["figure", "markdown"])
@pytest.mark.parametrize("kind", ["sweep", "run"])
def test_disk_full_leaves_nothing(state: str, what: str, kind: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_sweep(tmp_path) if kind == "sweep" else run_copy(tmp_path)
    out = tmp_path / "o"
    if state == "empty":
        out.mkdir()
    elif state == "earlier-report":
        assert main(["report", str(source), "--out", str(out)]) == 0
        capsys.readouterr()
    before = snapshot(out) if out.exists() else None
    if what == "figure":
        calls: list[str] = []
        real = Figure.savefig

        def savefig(fig: Figure, path: Path, **kwargs: object) -> None:
            calls.append(Path(path).name)
            if kind == "run" or len(calls) == 3:
                _enospc()
            real(fig, path, **kwargs)

        monkeypatch.setattr(Figure, "savefig", savefig)
    else:
        real_write = Path.write_text

        def write_text(path: Path, text: str, *args: object, **kwargs: object) -> int:
            if path.name == "report.md":
                _enospc()
            return real_write(path, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    line = fail(["report", str(source), "--out", str(out)], capsys)
    assert line == f"kvscope: error: cannot write --out {out}: {ENOSPC_MESSAGE}"
    if state == "absent":
        assert not out.exists()
    else:
        assert out.is_dir() and snapshot(out) == before
    assert leftovers(tmp_path) == []


# ---- matplotlib: no pyplot, no global backend change -------------------------------------------------------------
def test_report_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    code = ("import sys, matplotlib\n"
            "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
            "from pathlib import Path\n"
            "from kvscope.analysis.report.build import make_report\n"
            f"make_report(Path({str(path)!r}), Path({str(tmp_path / 'r')!r}))\n"
            "after = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
            "print(before == after, 'matplotlib.pyplot' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True False"
    assert (tmp_path / "r" / "report.md").is_file()
