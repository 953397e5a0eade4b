"""Every command that writes follows one policy (issue 22, causes 1 and 9): never over one of its inputs, never over
anything but its own earlier output, atomically, with the output path checked before any work or printing; and two
commands into one new output at once never both report success while one output is lost.

The writers: `capacity --out` (a file: `kvscope.io.OutputFile`), `run`, `nsys`, `align`, `report` (folders:
`kvscope.io.AtomicFolder`), `sweep --nsys`'s capture folders, `calibrate`'s cache (tests/profiler), and the Python
API's `run`."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import fail, snapshot
from paths import DATA

import kvscope.api as api
import kvscope.commands.align as align_cmd
import kvscope.commands.capacity as capacity_cmd
from kvscope.analysis.report.markdown import Report
from kvscope.cli import main
from kvscope.measure import run as run_mod
from kvscope.schema import ALIGN_OUTPUT_FILES

EXPORT = DATA / "nsys" / "tiny.sqlite"
RUN_FOLDER = DATA / "nsys" / "tiny-run"
RUN = ["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "2", "--warmup", "0", "--reps", "1",
       "--no-nvtx"]
CAPACITY_HEADER = "scenario,quantity,value,unit,source,note"
NOT_OURS = ("already exists and is not a kvscope capacity table (kvscope replaces only its own earlier output); give "
            "a new file name")


def batch_sweep() -> pd.DataFrame:
    """A batch sweep of the tiny preset (as tests/analysis/test_capacity.py's): prompt 100, output 28, bfloat16."""
    b = np.array([1, 2, 4, 8, 16, 32])
    tpot = [10.0, 10.5, 11.0, 12.0, 16.0, 24.0]
    return pd.DataFrame({"seq_len": 100, "batch": b, "gen_tokens": 28, "tpot_p50_ms": tpot,
                         "decode_p50_ms_per_tok": tpot, "ttft_ms": [50.0, 90.0, 170.0, 330.0, 650.0, 1290.0],
                         "flag": "", "model": "tiny", "model_source": "preset:tiny", "dtype": "bfloat16",
                         "weights_bytes": 303_744, "kv_predicted_bytes": 256 * b * 128})


def _capacity(sweep: Path, *extra: str) -> list[str]:
    return ["capacity", "--sweep", str(sweep), "--gpu-mem-gb", str(1_000_000 / 2**30), "--tpot-slo-ms", "14",
            "--ttft-slo-ms", "450", "--prompt", "100", "--output", "28", "--reserve-gb", "0", *extra]


def _sweep(tmp_path: Path) -> Path:
    path = tmp_path / "batch.csv"
    batch_sweep().to_csv(path, index=False)
    return path


def _no_plan(*_a: object, **_k: object) -> None:
    raise AssertionError("the sweep was read before --out was checked")


def _fail_quietly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`fail`, and nothing on stdout: the error comes before any table."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("kvscope: error: "), err
    return err.strip()


# ---- capacity --out: never its input, never another file -----------------------------------------------------------
@pytest.mark.parametrize("how", ["same", "relative", "dotted", "absolute-of-relative", "link", "hard-link"])
@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_capacity_out_is_never_the_sweep_it_reads(how: str, flags: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the plan replaced the measurements, exit code 0."""
    sweep = _sweep(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "l.csv").symlink_to(sweep)
    os.link(sweep, tmp_path / "h.csv")
    monkeypatch.chdir(tmp_path)
    given = Path("batch.csv") if how in ("relative", "absolute-of-relative") else sweep
    out = {"same": sweep, "relative": Path("batch.csv"), "dotted": Path("sub") / ".." / "batch.csv",
           "absolute-of-relative": sweep, "link": Path("l.csv"), "hard-link": Path("h.csv")}[how]
    before = snapshot(tmp_path)
    monkeypatch.setattr(capacity_cmd, "plan_from_sweep", _no_plan)
    line = _fail_quietly(_capacity(given, *flags, "--out", str(out)), capsys)
    assert line == (f"kvscope: error: --out {out} is the --sweep file {given}; kvscope never writes over its input: "
                    "give another file")
    assert snapshot(tmp_path) == before


def test_capacity_out_is_never_the_model_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(CAPACITY_HEADER + "\n")  # even a model file that starts like a capacity table
    before = snapshot(tmp_path)
    monkeypatch.setattr(capacity_cmd, "plan_from_sweep", _no_plan)
    line = _fail_quietly(_capacity(sweep, "--model", str(config), "--out", str(config)), capsys)
    assert line == (f"kvscope: error: --out {config} is the --model {config}; kvscope never writes over its input: "
                    "give another file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["run-summary", "run-timings", "another-sweep", "notes", "empty", "header-later",
                                  "folder", "fifo"])
def test_capacity_out_is_never_a_file_it_did_not_write(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a run folder's Parquet (or any file) was replaced by the table, exit code 0."""
    sweep = _sweep(tmp_path)
    shutil.copytree(RUN_FOLDER, tmp_path / "run")
    out = {"run-summary": tmp_path / "run" / "summary.parquet", "run-timings": tmp_path / "run" / "timings.parquet",
           "folder": tmp_path / "run"}.get(kind, tmp_path / "o.csv")
    if kind == "another-sweep":
        batch_sweep().to_csv(out, index=False)
    elif kind == "notes":
        out.write_text("my notes\n")
    elif kind == "empty":
        out.write_text("")
    elif kind == "header-later":
        out.write_text(f"# mine\n{CAPACITY_HEADER}\n")
    elif kind == "fifo":
        os.mkfifo(out)
    message = {"folder": "is a folder; give a file name", "fifo": "is not a regular file; give a file name"}
    before = snapshot(tmp_path)
    monkeypatch.setattr(capacity_cmd, "plan_from_sweep", _no_plan)
    line = _fail_quietly(_capacity(sweep, "--out", str(out)), capsys)
    assert line == f"kvscope: error: --out {out} {message.get(kind, NOT_OURS)}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_capacity_out_replaces_its_own_earlier_table(flags: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path)
    out = tmp_path / "plan.csv"
    assert main(_capacity(sweep, *flags, "--out", str(out))) == 0
    first = out.read_text()
    assert first.splitlines()[0] == CAPACITY_HEADER
    out.write_text(first.replace("computed", "stale"))
    assert main(_capacity(sweep, *flags, "--out", str(out))) == 0
    assert out.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv", "plan.csv"]
    capsys.readouterr()


@pytest.mark.parametrize(("kind", "message"), [
    ("read-only", "--out {out} cannot be written: folder {tmp}/ro: Read-only file system"),
    ("no-permission", "--out {out} cannot be written: folder {tmp}/ro: Permission denied"),
    ("no-folder", "--out {out}: folder {tmp}/missing does not exist"),
    ("under-a-file", "--out {out}: {tmp}/batch.csv is not a folder"),
    ("too-long", "--out {out}: File name too long"),
    ("loop", "--out {out}: Too many levels of symbolic links"),
])
def test_capacity_out_it_cannot_write_is_one_line_before_the_table(kind: str, message: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Root ignores mode bits: a folder's refusal is simulated where the check asks the system."""
    sweep = _sweep(tmp_path)
    (tmp_path / "ro").mkdir()
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = {"no-folder": tmp_path / "missing" / "p.csv", "under-a-file": sweep / "p.csv",
           "too-long": tmp_path / ("p" * 300 + ".csv"), "loop": tmp_path / "a" / "p.csv"}.get(kind, tmp_path / "ro"
                                                                                                / "p.csv")
    real_access, real_statvfs = os.access, os.statvfs
    ro = tmp_path / "ro"
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))

    class Flags:
        f_flag = os.ST_RDONLY if kind == "read-only" else 0

    monkeypatch.setattr(os, "statvfs", lambda p: Flags() if Path(p) == ro else real_statvfs(p))
    before = snapshot(tmp_path)
    line = _fail_quietly(_capacity(sweep, "--out", str(out)), capsys)
    assert line == "kvscope: error: " + message.format(out=out, tmp=tmp_path)
    assert snapshot(tmp_path) == before


def test_capacity_out_write_error_is_one_line_and_keeps_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path)
    out = tmp_path / "plan.csv"
    out.write_text(CAPACITY_HEADER + "\nold\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    line = _fail_quietly(_capacity(sweep, "--out", str(out)), capsys)
    assert line == f"kvscope: error: cannot write --out {out}: No space left on device"
    assert out.read_text() == CAPACITY_HEADER + "\nold\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv", "plan.csv"]


# ---- folders: never over an input ----------------------------------------------------------------------------------
def test_align_out_never_replaces_an_input_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier `align` output is replaced whole, unless it holds one of this command's inputs (the --classes file
    here)."""
    out = tmp_path / "al"
    assert main(["align", str(EXPORT), "--out", str(out)]) == 0
    classes = out / "trace.json"
    classes.write_text('{"rules": [{"pattern": "gemv", "class": "gemm"}]}')
    before = snapshot(tmp_path)
    monkeypatch.setattr(align_cmd, "analyse", _no_plan)
    capsys.readouterr()
    line = fail(["align", str(EXPORT), "--out", str(out), "--classes", str(classes)], capsys)
    assert line == (f"kvscope: error: --out {out} holds the --classes file {classes}; kvscope never writes over its "
                    "input: give another folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["source-inside", "source-is-the-folder"])
def test_report_out_never_replaces_its_source(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    source = out / "report.md" if how == "source-inside" else out
    before = snapshot(tmp_path)
    line = fail(["report", str(source), "--out", str(out)], capsys)
    verb = "holds" if how == "source-inside" else "is"
    assert line == (f"kvscope: error: --out {out} {verb} the source {source}; kvscope never writes over its input: "
                    "give another folder")
    assert snapshot(tmp_path) == before


# ---- two commands into one new output at once (cause 9) ---------------------------------------------------------
RACED = "was filled by another run while this one ran; that folder is kept and this run's files were discarded"


def _second_inside(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, second: Callable[[], object]
                   ) -> list[object]:
    """`owner.name` (what writes a command's files into its temporary folder) patched so that, after the first
    command wrote its files and before it commits them, `second` (another command into the same output) runs to
    its end; the list gets what `second` returned."""
    real = getattr(owner, name)
    done: list[object] = []

    def wrapped(*args: object, **kwargs: object) -> object:
        value = real(*args, **kwargs)
        if not done:
            done.append(None)  # the second command's own write goes straight through
            done[0] = second()
        return value

    monkeypatch.setattr(owner, name, wrapped)
    return done


def test_two_aligns_into_one_new_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before: both exit 0 and the first replaced the second's output. Now the second's output is kept and the first
    says so."""
    out = tmp_path / "al"
    second = _second_inside(monkeypatch, align_cmd, "write", lambda: main(
        ["align", str(DATA / "nsys" / "qwen25-05b.sqlite"), "--model", "qwen2.5-0.5b", "--out", str(out)]))
    rc = main(["align", str(EXPORT), "--out", str(out)])
    assert second == [0] and rc == 2
    assert capsys.readouterr().err.splitlines() == [f"kvscope: error: --out {out} {RACED}"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*ALIGN_OUTPUT_FILES, "trace.json"])
    assert len(pd.read_parquet(out / "ranges.parquet")) != 165  # the second's export (qwen2.5-0.5b), not tiny's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al"]


def test_two_reports_into_one_new_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    sweep = _sweep(tmp_path)
    second = _second_inside(monkeypatch, Report, "write", lambda: main(["report", str(RUN_FOLDER), "--out", str(out)]))
    rc = main(["report", str(sweep), "--out", str(out)])
    assert second == [0] and rc == 2
    assert capsys.readouterr().err.splitlines() == [f"kvscope: error: --out {out} {RACED}"]
    assert "tiny" in (out / "report.md").read_text()  # the run folder's report, the second's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv", "rep"]


@pytest.mark.parametrize("second_by", ["cli", "api"])
def test_two_runs_into_one_new_out(second_by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`kvscope run` and `kvscope.run` (the API) detect the race alike (a guard: runs already did)."""
    out = tmp_path / "r"
    second = _second_inside(monkeypatch, run_mod, "write_run", lambda: (
        main([*RUN, "--out", str(out)]) if second_by == "cli" else
        api.run("tiny", device="cpu", seq=8, gen_tokens=2, warmup=0, reps=1, out=out)))
    rc = main([*RUN, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvscope: error:")]
    assert rc == 2 and (second == [0] if second_by == "cli" else isinstance(second[0], api.Run))
    assert err == [f"kvscope: error: output folder {out} {RACED}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert {"summary.parquet", "timings.parquet"} <= {p.name for p in out.iterdir()}
