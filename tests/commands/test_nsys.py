"""`kvscope nsys -- COMMAND`: any command profiled under a stand-in nsys (no GPU here), extra nsys flags passed through,
`kvscope run` still the default for run options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from paths import DATA

from kvscope.cli import main, parse_args
from kvscope.errors import KvscopeError
from kvscope.measure.nsys import COMMAND_PROFILE_FLAGS, NSYS_PROFILE_FLAGS, extra_flags, profile_flags

# what the stand-in nsys exports (its content is not what these tests check; any export aligns)
EXPORT = DATA / "nsys" / "qwen25-05b.sqlite"

# a stand-in nsys: `profile` records its arguments, writes the report and runs the program (everything after
# `-f true`); `export` copies a real export of a foreign program to its -o path
_FAKE_NSYS = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
if args[0] == "export":
    out = args[args.index("-o") + 1]
    shutil.copy({str(EXPORT)!r}, out)
    sys.exit(0)
log = os.environ["FAKE_NSYS_LOG"]
with open(log, "w") as f:
    json.dump({{"argv": args, "tmpdir": os.environ.get("TMPDIR")}}, f)
report = args[args.index("-o") + 1]
program = args[args.index("-f") + 2:]
code = subprocess.run(program).returncode
open(report + ".nsys-rep", "w").write("rep")
sys.exit(code)
"""


@pytest.fixture
def fake_nsys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    exe = tmp_path / "bin" / "nsys"
    exe.parent.mkdir()
    exe.write_text(_FAKE_NSYS)
    exe.chmod(0o755)
    log = tmp_path / "nsys-argv.json"
    monkeypatch.setenv("FAKE_NSYS_LOG", str(log))
    return exe, log


def test_any_command_is_profiled_exported_and_aligned(fake_nsys: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    exe, log = fake_nsys
    marker = tmp_path / "ran"
    out = tmp_path / "n"
    rc = main(["nsys", "--nsys", str(exe), "--out", str(out), "--nsys-flag=--sample=cpu", "--nsys-flag",
               "-t cuda,nvtx,osrt", "--json", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert rc == 0, capsys.readouterr().err
    assert marker.is_file()  # the program itself ran under nsys
    argv = json.loads(log.read_text())["argv"]
    program_at = argv.index("-f") + 2
    assert argv[program_at:] == [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    flags = argv[1:program_at - 4]
    assert flags == ["--cpuctxsw=none", "--cuda-graph-trace=node", "--sample=cpu", "-t", "cuda,nvtx,osrt"]
    assert not any(f.startswith("--capture-range") for f in argv)  # a foreign command is profiled whole
    files = sorted(p.name for p in out.iterdir())
    assert "run" not in files and "nsys-tmp" not in files
    assert {"report.nsys-rep", "report.sqlite", "ranges.parquet", "kernels.parquet", "trace.json"} <= set(files)
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["out"] == str(out) and payload["profiled_exit_code"] == 0 and payload["kernels"] > 0


def test_a_failing_command_is_still_aligned_and_said(fake_nsys: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    exe, _ = fake_nsys
    out = tmp_path / "n"
    assert main(["nsys", "--nsys", str(exe), "--out", str(out), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 0
    assert "the profiled command exited with code 3" in capsys.readouterr().out
    assert (out / "kernels.parquet").is_file()


def test_no_report_is_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe = tmp_path / "nsys"
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(0o755)
    out = tmp_path / "n"
    assert main(["nsys", "--nsys", str(exe), "--out", str(out), "--", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nsys wrote no report" in err[0] and "exit code 1" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".n.partial*"))


@pytest.mark.parametrize(("after", "run_args", "command"), [
    ([], [], []),
    (["--model", "tiny", "--seq", "8"], ["--model", "tiny", "--seq", "8"], []),
    (["kvscope", "run", "--seq", "8"], ["--seq", "8"], []),
    (["python3", "serve.py", "--port", "1"], [], ["python3", "serve.py", "--port", "1"]),
])
def test_run_options_or_a_command(after: list[str], run_args: list[str], command: list[str]) -> None:
    ns = parse_args(["nsys", "--", *after])
    assert ns.run_args == run_args and ns.command_args == command
    assert (ns.run is None) == bool(command)


def test_flag_values_that_look_like_options() -> None:
    ns = parse_args(["nsys", "--nsys-flag", "--sample=cpu", "--nsys-flag=--trace=cuda", "--", "--seq", "8"])
    assert ns.nsys_flag == ["--sample=cpu", "--trace=cuda"] and ns.run_args == ["--seq", "8"]


def test_extra_flags_replace_kvscopes_own() -> None:
    assert profile_flags(NSYS_PROFILE_FLAGS, ["--capture-range=none"]) == [
        *(f for f in NSYS_PROFILE_FLAGS if not f.startswith("--capture-range=")), "--capture-range=none"]
    assert profile_flags(COMMAND_PROFILE_FLAGS, extra_flags(["-s cpu"]))[-2:] == ["-s", "cpu"]
    assert "--sample=none" not in profile_flags(COMMAND_PROFILE_FLAGS, ["-s", "cpu"])


@pytest.mark.parametrize(("value", "message"), [
    ("-o=x", "kvscope sets the report's name"),
    ("--output=elsewhere", "kvscope sets the report's name"),
    ("--force-overwrite=false", "kvscope sets the report's name"),
    ("sample=cpu", "is not an nsys option"),
    ("'--trace=cuda", "No closing quotation"),
])
def test_bad_extra_flags(value: str, message: str) -> None:
    with pytest.raises(KvscopeError, match=message):
        extra_flags([value])
