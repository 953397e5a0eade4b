"""Paths the system refuses, and the command line's last resorts (issue 22, causes 2 and 10).

Every path a user gives (an argument, a flag, a Python API parameter) is checked by one function,
`kvscope.io.check_path`: a name longer than the file system allows, a loop of links or a file where a folder is
expected is one line naming the flag, the path and the reason (before: a traceback from six entry points, or "File
exists" for a loop). An OSError that still escapes a command is one line and exit code 2; warnings are never printed
before the error line; `--nsys PATH` that is not there is named; a file named only `.csv` is not "a wrong suffix".
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import fail, snapshot
from paths import DATA, ROOT

import kvscope.api as api
import kvscope.commands.kv_math as kv_math_cmd
from kvscope.analysis.nsys.export import find_nsys
from kvscope.cli import main
from kvscope.errors import KvscopeError

EXPORT = DATA / "nsys" / "tiny.sqlite"
RUN_FOLDER = DATA / "nsys" / "tiny-run"
TINY = ["--model", "tiny", "--device", "cpu"]
RUN = ["run", *TINY, "--seq", "8", "--gen-tokens", "2", "--warmup", "0", "--reps", "1", "--no-nvtx"]
CAPACITY = ["--gpu-mem-gb", "1", "--tpot-slo-ms", "14", "--ttft-slo-ms", "450", "--prompt", "100", "--output", "28"]
REASON = {"too-long": "File name too long", "loop": "Too many levels of symbolic links",
          "in-a-loop": "Too many levels of symbolic links"}


def _bad(kind: str, tmp: Path, suffix: str = "") -> Path:
    """A path of the given kind in `tmp` (a loop of links `a` <-> `b` is made there for every kind)."""
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    (tmp / "file").write_text("x")
    return {"too-long": tmp / ("x" * 300 + suffix), "loop": tmp / "a", "in-a-loop": tmp / "a" / f"x{suffix}",
            "under-a-file": tmp / "file" / f"x{suffix}"}[kind]


# (argv with {p} for the bad path, how the message names it: a parsed argument, else the writer's label)
INPUTS = [
    (["run", *TINY[2:], "--model", "{p}"], "run: argument --model: "),
    (["sweep", "--model", "{p}", "--seq", "8", "--batch-sizes", "1", "--out", "{tmp}/s.csv"],
     "sweep: argument --model: "),
    (["generate", "--model", "{p}", "--prompt-ids", "1"], "generate: argument --model: "),
    (["kv-math", "--model", "{p}"], "kv-math: argument --model: "),
    (["align", "{p}", "--out", "{tmp}/o"], "align: argument export: "),
    (["align", str(EXPORT), "--timings", "{p}", "--out", "{tmp}/o"], "align: argument --timings: "),
    (["align", str(EXPORT), "--classes", "{p}", "--out", "{tmp}/o"], "align: argument --classes: "),
    (["align", str(EXPORT), "--nsys", "{p}", "--out", "{tmp}/o"], "align: argument --nsys: "),
    (["report", "{p}"], "report: argument source: "),
    (["report", "{p}", "--out", "{tmp}/r"], "report: argument source: "),
    (["report", str(DATA / "x.csv"), "--compare", "{p}", "--out", "{tmp}/r"], "report: argument --compare: "),
    (["capacity", "--sweep", "{p}", *CAPACITY], "capacity: argument --sweep: "),
    (["capacity", "--sweep", "{tmp}/s.csv", "--model", "{p}", *CAPACITY], "capacity: argument --model: "),
    (["nsys", "--nsys", "{p}", "--out", "{tmp}/n"], "nsys: argument --nsys: "),
    (["sweep", *TINY, "--seq", "8", "--batch-sizes", "1", "--out", "{tmp}/s.csv", "--nsys", "{p}"],
     "sweep: argument --nsys: "),
]


@pytest.mark.parametrize("kind", ["too-long", "loop", "in-a-loop", "under-a-file"])
@pytest.mark.parametrize(("argv", "named"), INPUTS, ids=[f"{a[0]}:{n.split()[-1]}" for a, n in INPUTS])
def test_an_input_path_the_system_refuses_is_one_line(argv: list[str], named: str, kind: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad(kind, tmp_path)
    reason = REASON.get(kind) or f"{tmp_path / 'file'} is not a folder"
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = fail([a.format(p=bad, tmp=tmp_path) for a in argv], capsys)
    assert line == f"kvscope: error: {named}{bad}: {reason}"
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]


# (argv with {p} for the bad output path, how the message names it)
OUTPUTS = [
    ([*RUN, "--out", "{p}"], "output folder"),
    (["align", str(EXPORT), "--out", "{p}"], "--out"),
    (["report", str(RUN_FOLDER), "--out", "{p}"], "--out"),
    (["capacity", "--sweep", str(DATA / "x.csv"), *CAPACITY, "--out", "{p}"], "--out"),
    (["sweep", *TINY, "--seq", "8", "--batch-sizes", "1", "--out", "{p}"], "--out"),
    (["nsys", "--out", "{p}", "--", *TINY], "output folder"),
]


@pytest.mark.parametrize("kind", ["too-long", "loop", "in-a-loop"])
@pytest.mark.parametrize(("argv", "named"), OUTPUTS, ids=[a[0] for a, _ in OUTPUTS])
def test_an_output_path_the_system_refuses_is_one_line(argv: list[str], named: str, kind: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ENAMETOOLONG a traceback (run, align, report, capacity); a folder under a loop of links "cannot be
    written: File exists"."""
    bad = _bad(kind, tmp_path, ".csv" if argv[0] in ("sweep", "capacity") else "")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = fail([a.format(p=bad) for a in argv], capsys)
    assert line == f"kvscope: error: {named} {bad}: {REASON[kind]}"
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]


@pytest.mark.parametrize(("argv", "named", "extra"), [
    ([*RUN, "--out", "{p}"], "output folder", " (kvscope writes .NAME.partial-<random> beside it)"),
    (["align", str(EXPORT), "--out", "{p}"], "--out", " (kvscope writes .NAME.partial-<random> beside it)"),
    (["report", str(RUN_FOLDER), "--out", "{p}"], "--out", " (kvscope writes .NAME.partial-<random> beside it)"),
])
def test_an_output_folder_name_with_no_room_for_its_temporary_folder(argv: list[str], named: str, extra: str,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A name the system takes, but not with `.NAME.partial-XXXXXXXX` around it: refused before any work (before: the
    work was done, then "File name too long")."""
    name = "r" * 240
    out = tmp_path / name
    line = fail([a.format(p=out) for a in argv], capsys)
    assert line == (f"kvscope: error: {named} {out}: the folder name {name[:20]}... takes 240 bytes, at most 237 "
                    f"here{extra}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function", ["load_run", "load_export", "project", "align-export", "align-timings"])
@pytest.mark.parametrize("kind", ["too-long", "loop", "under-a-file"])
def test_the_api_checks_paths_alike(function: str, kind: str, tmp_path: Path) -> None:
    """Before: `kvscope.api.load_run` of a name too long was a traceback (an OSError)."""
    bad = _bad(kind, tmp_path)
    reason = REASON.get(kind) or f"{tmp_path / 'file'} is not a folder"
    call, named = {
        "load_run": (lambda: api.load_run(bad), "load_run: path"),
        "load_export": (lambda: api.load_export(bad), "load_export: path"),
        "project": (lambda: api.project(bad), "project: export"),
        "align-export": (lambda: api.align(bad), "align: export"),
        "align-timings": (lambda: api.align(EXPORT, bad), "align: timings"),
    }[function]
    with pytest.raises(KvscopeError) as info:
        call()
    assert str(info.value) == f"{named} {bad}: {reason}"


@pytest.mark.parametrize(("argument", "named"), [("out", "output folder"), ("model", "run: argument --model:")])
def test_the_api_run_checks_paths_alike(argument: str, named: str, tmp_path: Path) -> None:
    bad = _bad("too-long", tmp_path)
    with pytest.raises(KvscopeError) as info:
        api.run(**{"model": "tiny", "device": "cpu", "seq": 8, "gen_tokens": 2, "warmup": 0, "reps": 1,
                   argument: bad})
    assert str(info.value) == f"{named} {bad}: File name too long"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]


# ---- the last resorts of the command line --------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "line"), [
    (OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "/x/" + "y" * 300),
     f"/x/{'y' * 300}: File name too long"),
    (OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/x/a"), "/x/a: Too many levels of symbolic links"),
    (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "/x/d"), "/x/d: Is a directory"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/f"), "/ro/f: Read-only file system"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    (OSError(errno.EIO, os.strerror(errno.EIO), "/d/a", None, "/d/b"), "/d/a -> /d/b: Input/output error"),
    (OSError("pyarrow: [errno 5] failed\nDetail: more"), "pyarrow: [errno 5] failed Detail: more"),
    (BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)), "Broken pipe"),
])
def test_an_os_error_that_escapes_a_command_is_one_line(exc: OSError, line: str, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def command(_ns: object) -> int:
        raise exc

    monkeypatch.setattr(kv_math_cmd, "command", command)
    assert fail(["kv-math", "--model", "tiny"], capsys) == f"kvscope: error: {line}"


def test_interrupts_keep_their_behaviour(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(_ns: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(kv_math_cmd, "command", interrupted)
    assert main(["kv-math", "--model", "tiny"]) == 130
    assert capsys.readouterr().err == "kvscope: interrupted\n"

    def terminated(_ns: object) -> int:
        raise SystemExit(143)  # what SIGTERM becomes (kvscope.cli._terminate)

    monkeypatch.setattr(kv_math_cmd, "command", terminated)
    with pytest.raises(SystemExit) as info:
        main(["kv-math", "--model", "tiny"])
    assert info.value.code == 143


# a command that warns as numpy and pandas do on values near 2**63, then fails or succeeds; in a fresh interpreter, so
# that the warnings take the way they take outside pytest (which records them itself)
_WARNS = """
import sys, warnings
import kvscope.commands.kv_math as k
from kvscope.errors import KvscopeError

def command(ns):
    warnings.warn("overflow encountered in scalar multiply", RuntimeWarning, stacklevel=1)
    warnings.warn("casting 9223372036854775807 to float64 loses precision", UserWarning, stacklevel=1)
    if sys.argv[1] == "kvscope":
        raise KvscopeError("--seq 9223372036854775807 is too large")
    if sys.argv[1] == "os":
        raise OSError(5, "Input/output error", "/x")
    print("the result")
    return 0

k.command = command
from kvscope.cli import main
sys.exit(main(["kv-math", "--model", "tiny"]))
"""


def _warns(how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WARNS, how], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)


@pytest.mark.parametrize(("how", "line"), [("kvscope", "kvscope: error: --seq 9223372036854775807 is too large"),
                                           ("os", "kvscope: error: /x: Input/output error")])
def test_no_warning_reaches_stderr_before_the_error_line(how: str, line: str) -> None:
    """Before: the library's warnings (two lines each) came first, then the error line."""
    done = _warns(how)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == line + "\n"


def test_the_warnings_of_a_command_that_succeeds_come_after_its_output() -> None:
    done = _warns("ok")
    assert done.returncode == 0 and done.stdout == "the result\n"
    assert done.stderr.count("RuntimeWarning: overflow encountered in scalar multiply") == 1
    assert done.stderr.count("UserWarning: casting 9223372036854775807 to float64 loses precision") == 1
    assert "Traceback" not in done.stderr


# ---- unclear messages (cause 10) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".csv", ".parquet", ".CSV"])
@pytest.mark.parametrize("extra", [[], ["--resume"]])
def test_a_sweep_file_named_only_by_its_extension(name: str, extra: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "the sweep file must end in .csv or .parquet" of a name that does end in .csv."""
    out = tmp_path / name
    line = fail(["sweep", *TINY, "--seq", "8", "--batch-sizes", "1", "--out", str(out), *extra], capsys)
    assert line == (f"kvscope: error: --out {out}: the file name is only the extension {name}; give a name before "
                    f"it, such as sweep{name}")
    assert list(tmp_path.iterdir()) == []


def _nsys_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NSYS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


@pytest.mark.parametrize("command", ["nsys", "sweep"])
@pytest.mark.parametrize(("given", "how"), [("{tmp}/no/such/nsys", "flag"), ("nsys-nowhere", "flag"),
                                            ("{tmp}/folder", "flag"), ("{tmp}/no/such/nsys", "env")])
def test_an_nsys_that_is_not_there_is_named(command: str, given: str, how: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "nsys not found: pass --nsys PATH, ..." for the path the user had passed."""
    _nsys_env(monkeypatch, tmp_path)
    (tmp_path / "folder").mkdir()
    value = given.format(tmp=tmp_path)
    flag = ["--nsys", value] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("NSYS", value)
    if command == "nsys":
        argv = ["nsys", *flag, "--out", str(tmp_path / "n"), "--", *TINY]
    else:
        argv = ["sweep", *TINY, "--seq", "8", "--batch-sizes", "1", "--out", str(tmp_path / "s.csv"),
                *(flag or ["--nsys"])]
    named = "--nsys" if how == "flag" else "$NSYS"
    expected = {"{tmp}/no/such/nsys": f"{named} {value}: nsys not found (no such file)",
                "nsys-nowhere": f"{named} {value}: nsys not found (no such file here, and no command of that name on "
                                "PATH)",
                "{tmp}/folder": f"{named} {value} is a folder, not the nsys executable"}[given]
    assert fail(argv, capsys) == f"kvscope: error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_no_nsys_anywhere_names_the_ways_to_give_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _nsys_env(monkeypatch, tmp_path)
    if find_nsys() is not None:
        pytest.skip("an nsys is installed in one of the usual folders")
    assert fail(["nsys", "--out", str(tmp_path / "n"), "--", *TINY], capsys) == (
        "kvscope: error: nsys not found: pass --nsys PATH, set $NSYS, or put nsys on PATH")
    assert list(tmp_path.iterdir()) == []
