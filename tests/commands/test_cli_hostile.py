"""Hostile command-line arguments and run output folders: every bad input ends in exactly one stderr line
`kvscope: error: ...` naming the flag, exit code 2, no traceback, and no file made, changed or lost."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT

from kvscope.argtypes import INT64_MAX, INT64_MIN, UINT64_MAX
from kvscope.cli import error_line, join_dash_values, main
from kvscope.engine.plan import RunSpec, prepare
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder
from kvscope.measure import output as run_output
from kvscope.measure import run as run_mod
from kvscope.measure.output import OUT_LABEL, RunResult

RUN = ["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "2", "--warmup", "0", "--reps", "1"]
GEN = ["generate", "--model", "tiny", "--device", "cpu"]
KV = ["kv-math", "--model", "tiny"]
SWEEP = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "2", "--warmup", "0", "--reps", "1"]
HUGE = str(10**30)
RANGE64 = f"must fit in 64 bits ({INT64_MIN} to {INT64_MAX})"
SEED_RANGE = f"must be an integer from 0 to {UINT64_MAX}"


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr; it must start with the one `kvscope: error: ` prefix."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvscope: error: ") and lines[0].count("kvscope") == 1, lines[0]
    assert "Traceback" not in err
    return lines[0]


def _run_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of a `kvscope run` that failed after the model loaded: the last stderr line, the only error
    line; before it only the run's own progress log (`kvscope: tiny ready in ...`)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kvscope: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith("kvscope: tiny ready in ") for line in lines[:-1]), err
    assert "Traceback" not in err and errors[0].count("kvscope") == 1
    return errors[0]


# ---- 1. non-finite and huge numbers -----------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "line"), [
    ([*KV, "--gpu-mem-gb", "inf"], "kv-math: argument --gpu-mem-gb: must be a finite number, got 'inf'"),
    ([*KV, "--gpu-mem-gb", "nan"], "kv-math: argument --gpu-mem-gb: must be a finite number, got 'nan'"),
    ([*KV, "--gpu-mem-gb", "-inf"], "kv-math: argument --gpu-mem-gb: must be a finite number, got '-inf'"),
    ([*KV, "--gpu-mem-gb", "1e999"], "kv-math: argument --gpu-mem-gb: must be a finite number, got '1e999'"),
    ([*KV, "--gpu-mem-gb", "Infinity"], "kv-math: argument --gpu-mem-gb: must be a finite number, got 'Infinity'"),
    ([*KV, "--gpu-mem-gb", "1e300"], "kv-math: argument --gpu-mem-gb: must be at most 8,589,934,592 GiB, got '1e300'"),
    ([*KV, "--gpu-mem-gb", "-1e3"], "--gpu-mem-gb must be positive, got -1000.0"),
    ([*KV, "--rps", "nan", "--latency-s", "1"], "kv-math: argument --rps: must be a finite number, got 'nan'"),
    ([*KV, "--rps", "inf", "--latency-s", "1"], "kv-math: argument --rps: must be a finite number, got 'inf'"),
    ([*KV, "--rps", "1e10", "--latency-s", "1"], "kv-math: argument --rps: must be at most 1,000,000,000, got '1e10'"),
    ([*KV, "--rps", "-1", "--latency-s", "1"], "--rps and --latency-s must be positive, got -1.0 and 1.0"),
    ([*KV, "--rps", "1", "--latency-s", "nan"], "kv-math: argument --latency-s: must be a finite number, got 'nan'"),
    ([*KV, "--rps", "1", "--latency-s", "inf"], "kv-math: argument --latency-s: must be a finite number, got 'inf'"),
    ([*KV, "--rps", "1", "--latency-s", "-inf"], "kv-math: argument --latency-s: must be a finite number, got '-inf'"),
    ([*KV, "--reserve-gb", "nan"], "kv-math: argument --reserve-gb: must be a finite number, got 'nan'"),
    ([*KV, "--reserve-gb", "inf"], "kv-math: argument --reserve-gb: must be a finite number, got 'inf'"),
    ([*KV, "--reserve-gb", "1e300"], "kv-math: argument --reserve-gb: must be at most 8,589,934,592 GiB, got '1e300'"),
    ([*KV, "--gpu-mem-gb", "x"], "kv-math: argument --gpu-mem-gb: invalid float value: 'x'"),
    ([*RUN, "--nvml-interval-ms", "nan"], "run: argument --nvml-interval-ms: must be a finite number, got 'nan'"),
    ([*RUN, "--nvml-interval-ms", "inf"], "run: argument --nvml-interval-ms: must be a finite number, got 'inf'"),
    ([*RUN, "--nvml-interval-ms", "1e300"],
     "run: argument --nvml-interval-ms: must be at most 3,600,000 ms, got '1e300'"),
    ([*RUN, "--nvml-interval-ms", "0"], "--nvml-interval-ms must be positive, got 0.0"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv", "--collapse-factor", "nan"],
     "sweep: argument --collapse-factor: must be a finite number, got 'nan'"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv", "--collapse-factor", "inf"],
     "sweep: argument --collapse-factor: must be a finite number, got 'inf'"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv", "--collapse-factor", "0"],
     "--collapse-factor must be > 1, got 0.0"),
])
def test_non_finite_and_huge_floats(argv: list[str], line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert _error(capsys) == f"kvscope: error: {line}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cmd", [RUN, [*GEN, "--prompt-ids", "1"],
                                 [*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv"]])
@pytest.mark.parametrize(("value", "shown"), [
    (str(2**64), repr(str(2**64))), (HUGE, repr(HUGE)), ("-1", "'-1'"), (str(-(2**63)), repr(str(-(2**63)))),
])
def test_seed_beyond_64_bits_or_negative(cmd: list[str], value: str, shown: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, "--seed", value]) == 2
    assert _error(capsys) == f"kvscope: error: {cmd[0]}: argument --seed: {SEED_RANGE}, got {shown}"
    assert list(tmp_path.iterdir()) == []


def test_seed_at_the_64_bit_limit_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*GEN, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--seed", str(UINT64_MAX)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


_INT_FLAGS = [(RUN, f) for f in ("--batch-size", "--seq", "--gen-tokens", "--warmup", "--reps")] + [
    ([*GEN, "--prompt-ids", "1"], "--max-new-tokens"),
    (KV, "--batch-size"), (KV, "--seq"), (KV, "--page-size"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv"], "--gen-tokens"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv"], "--warmup"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out", "s.csv"], "--reps"),
]


@pytest.mark.parametrize(("cmd", "flag"), _INT_FLAGS)
@pytest.mark.parametrize("value", [HUGE, str(2**63), str(-(10**30)), "9" * 5000],
                         ids=["1e30", "2**63", "-1e30", "5000-digits"])
def test_every_int_flag_beyond_64_bits(cmd: list[str], flag: str, value: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, flag, value]) == 2
    shown = repr(value) if len(value) <= 40 else f"{value[:20]!r}... ({len(value)} characters)"
    assert _error(capsys) == f"kvscope: error: {cmd[0]}: argument {flag}: {RANGE64}, got {shown}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("cmd", "flag"), _INT_FLAGS)
def test_every_int_flag_refuses_a_non_integer(cmd: list[str], flag: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, flag, "1e3"]) == 2
    assert _error(capsys) == f"kvscope: error: {cmd[0]}: argument {flag}: invalid int value: '1e3'"


@pytest.mark.parametrize(("batch", "asked"), [
    (10**12, "an allocation of 5,120,000,000,000,000 bytes failed"),  # past any address space: fails at once
    (2**50, "an allocation of 5,764,607,523,034,234,880 bytes failed"),
    (2**62, "a tensor size beyond 64 bits was asked for"),
    (INT64_MAX, "a tensor size beyond 64 bits was asked for"),
])
def test_run_batch_too_large_to_allocate(batch: int, asked: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a" / "run"
    assert main([*RUN, "--batch-size", str(batch), "--out", str(out)]) == 2
    kv = 2 * 2 * 2 * 16 * 4 * 10 * batch  # tiny: 2 layers, K and V, 2 KV heads of 16, float32; 8 + 2 positions
    assert _run_error(capsys) == (f"kvscope: error: out of memory on cpu for --batch-size {batch} --seq 8 "
                                  f"(--gen-tokens 2): {asked}; the KV cache alone takes {kv:,} bytes")
    assert list(tmp_path.iterdir()) == []


def test_run_cuda_out_of_memory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    def oom(*_a: object, **_k: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.2 GiB is free.\nmore text")

    monkeypatch.setattr(run_mod, "measure", oom)
    assert main([*RUN, "--batch-size", "3", "--out", str(tmp_path / "r")]) == 2
    assert _run_error(capsys) == ("kvscope: error: out of memory on cpu for --batch-size 3 --seq 8 (--gen-tokens 2): "
                                  "an allocation of 20.00 GiB failed; the KV cache alone takes 15,360 bytes")
    assert list(tmp_path.iterdir()) == []


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*_a: object, **_k: object) -> None:
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(run_mod, "measure", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug stays a traceback, not "out of memory"
        run_mod.execute(RunSpec(model="tiny", device="cpu", seq=8, gen_tokens=2, warmup=0, reps=1,
                                out=str(tmp_path / "r")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 2**63, f"--batch-size must fit in 64 bits (at most {INT64_MAX}), got {2**63}"),
    ("reps", 10**30, f"--reps must fit in 64 bits (at most {INT64_MAX}), got {10**30}"),
    ("seed", -1, f"--seed must be an integer from 0 to {UINT64_MAX}, got -1"),
    ("seed", 2**64, f"--seed must be an integer from 0 to {UINT64_MAX}, got {2**64}"),
    ("nvml_interval_ms", float("nan"), "--nvml-interval-ms must be positive, got nan"),
    ("nvml_interval_ms", float("inf"), "--nvml-interval-ms must be at most 3,600,000 ms, got inf"),
    ("out", "", "--out must not be empty, got '' (leave it out for the default folder)"),
    ("out", "  ", "--out must not be empty, got '  ' (leave it out for the default folder)"),
])
def test_run_spec_refuses_the_same_values(field: str, value: object, message: str) -> None:
    fields: dict[str, object] = {"model": "tiny", "device": "cpu", "seq": 8, "gen_tokens": 2, "warmup": 0, "reps": 1}
    spec = RunSpec(**{**fields, field: value})
    with pytest.raises(KvscopeError) as info:
        prepare(spec)
    assert str(info.value) == message


# ---- 2. empty --out, --out FILE, two runs into the same folder ---------------------------------------------------
@pytest.mark.parametrize(("argv", "flag"), [
    ([*RUN, "--out"], "--out"),
    ([*SWEEP, "--seq", "8", "--batch-sizes", "1", "--out"], "--out"),
    (["report", "src", "--out"], "--out"),
    (["report"], "source"),
    (["align", "x.sqlite", "--out"], "--out"),
    (["align", "x.sqlite", "--out", "o", "--timings"], "--timings"),
    (["align", "x.sqlite", "--out", "o", "--nsys"], "--nsys"),
    (["align", "--out", "o"], "export"),
    (["nsys", "--out"], "--out"),
    (["nsys", "--nsys"], "--nsys"),
    ([*KV[:1], "--model"], "--model"),
    ([*KV, "--dtype"], "--dtype"),
    ([*KV, "--device"], "--device"),
    ([*RUN, "--model"], "--model"),
    ([*RUN, "--dtype"], "--dtype"),
    ([*RUN, "--device"], "--device"),
    ([*GEN, "--prompt-ids", "1", "--model"], "--model"),
    (["calibrate", "--model"], "--model"),
    (["calibrate", "--device"], "--device"),
])
@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_empty_paths_and_names_are_refused(argv: list[str], flag: str, value: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, value]) == 2
    assert _error(capsys) == f"kvscope: error: {argv[0]}: argument {flag}: must not be empty, got {value!r}"
    assert list(tmp_path.iterdir()) == []  # in particular no traces/ default folder


def test_nul_in_a_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--out", f"{tmp_path}/a\0b"]) == 2
    assert _error(capsys) == "kvscope: error: run: argument --out: must not contain a NUL character"


@pytest.mark.parametrize("kind", ["file", "empty file"])
def test_run_out_is_a_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.txt"
    out.write_text("" if kind == "empty file" else "keep me")
    assert main([*RUN, "--out", str(out)]) == 2
    assert _error(capsys) == (f"kvscope: error: output folder {out} already exists and is a file; give a new or "
                              "empty folder")
    assert out.read_text() == ("" if kind == "empty file" else "keep me")
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


@pytest.mark.parametrize("target", ["file", "empty folder", "nothing"])
def test_run_out_is_a_link(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    if target == "file":
        dest.write_text("keep me")
    elif target == "empty folder":
        dest.mkdir()
    link = tmp_path / "link"
    link.symlink_to(dest)
    assert main([*RUN, "--out", str(link)]) == 2
    assert _error(capsys) == (f"kvscope: error: output folder {link} is a symbolic link; give the folder's own "
                              "path")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == (
        ["link"] if target == "nothing" else ["dest", "link"])
    if target == "file":
        assert dest.read_text() == "keep me"


def test_run_out_is_a_device(capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    assert main([*RUN, "--out", "/dev/null"]) == 2
    assert _error(capsys) == ("kvscope: error: output folder /dev/null already exists and is not a folder; give a "
                              "new or empty folder")


def _race(final: Path) -> tuple[AtomicFolder, AtomicFolder]:
    """Two runs into the same folder: both pass the check at the start, each writes its own temporary folder."""
    a, b = AtomicFolder(final, OUT_LABEL), AtomicFolder(final, OUT_LABEL)
    a_tmp, b_tmp = a.open(), b.open()
    assert a_tmp != b_tmp
    (a_tmp / "summary.parquet").write_text("winner")
    (b_tmp / "summary.parquet").write_text("loser")
    return a, b


@pytest.mark.parametrize("layout", ["new", "empty folder", "new parents"])
def test_two_runs_into_the_same_folder(layout: str, tmp_path: Path) -> None:
    final = tmp_path / "x" / "y" / "run" if layout == "new parents" else tmp_path / "run"
    if layout == "empty folder":
        final.mkdir()
    a, b = _race(final)
    b_tmp = b.tmp
    assert a.commit() == final
    with pytest.raises(KvscopeError) as info:
        b.commit()
    assert str(info.value) == (f"output folder {final} was filled by another run while this one ran; that folder "
                               "is kept and this run's files were discarded")
    assert [p.name for p in final.iterdir()] == ["summary.parquet"]
    assert (final / "summary.parquet").read_text() == "winner"
    assert b.tmp is None and b_tmp is not None and not b_tmp.exists()
    assert [p.name for p in final.parent.iterdir()] == ["run"]  # no temporary folder left beside it


def test_race_lost_inside_a_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    write_run = run_mod.write_run

    def write_then_lose(result: RunResult, folder: Path) -> None:
        write_run(result, folder)
        out.mkdir()  # another `kvscope run --out SAME` finished first
        (out / "summary.parquet").write_text("the other run's")

    monkeypatch.setattr(run_mod, "write_run", write_then_lose)
    assert main([*RUN, "--out", str(out)]) == 2
    assert _run_error(capsys) == (f"kvscope: error: output folder {out} was filled by another run while this one "
                                  "ran; that folder is kept and this run's files were discarded")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (out / "summary.parquet").read_text() == "the other run's"


def test_commit_onto_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    final = tmp_path / "run"
    folder = AtomicFolder(final, OUT_LABEL)
    folder.open()
    final.write_text("appeared")
    with pytest.raises(KvscopeError) as info:
        folder.commit()
    assert str(info.value) == (f"output folder {final} appeared while this run ran and is not a folder; it is kept "
                               "and this run's files were discarded")
    assert final.read_text() == "appeared" and [p.name for p in tmp_path.iterdir()] == ["run"]


# ---- 3. disk full while writing the run folder ---------------------------------------------------------------------
@pytest.mark.parametrize(("target", "exc", "reason"), [
    ("write_parquet", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("write_parquet", OSError(errno.ENOSPC, "No space left on device", "/disk/timings.parquet"),
     "No space left on device (/disk/timings.parquet)"),
    ("write_json", OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
    ("write_parquet", OSError("[Errno 28] Error writing bytes to file.\nDetail: [errno 28] No space left"),
     "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left"),  # pyarrow: no errno attribute
])
def test_disk_full_while_writing(target: str, exc: OSError, reason: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def full(*_a: object, **_k: object) -> None:
        raise exc

    monkeypatch.setattr(run_output, target, full)
    out = tmp_path / "deep" / "run"
    assert main([*RUN, "--out", str(out)]) == 2
    assert _run_error(capsys) == f"kvscope: error: cannot write the run folder {out}: {reason}; nothing was kept"
    assert list(tmp_path.iterdir()) == []


# ---- 4. values that start with "-" ------------------------------------------------------------------------------
@pytest.mark.parametrize(("ids", "line"), [
    (["--prompt-ids", "-1,2"], "prompt 0: token id -1 outside the vocabulary [0, 512)"),
    (["--prompt-ids=-1,2"], "prompt 0: token id -1 outside the vocabulary [0, 512)"),
    (["--prompt-ids", "-1"], "prompt 0: token id -1 outside the vocabulary [0, 512)"),
    (["--prompt-ids", "-5;3"], "prompt 0: token id -5 outside the vocabulary [0, 512)"),
    (["--prompt-ids", "3;-5,1"], "prompt 1: token id -5 outside the vocabulary [0, 512)"),
    (["--prompt-ids", "-1, 2"], "prompt 0: token id -1 outside the vocabulary [0, 512)"),
    (["--prompt-ids", "-x"], "generate: argument --prompt-ids: expected one argument"),
])
def test_prompt_ids_starting_with_a_minus(ids: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*GEN, *ids]) == 2
    assert _error(capsys) == f"kvscope: error: {line}"


def test_join_dash_values() -> None:
    assert join_dash_values(["generate", "--prompt-ids", "-1,2"]) == ["generate", "--prompt-ids=-1,2"]
    assert join_dash_values(["kv-math", "--gpu-mem-gb", "-inf", "--rps", "-.5"]) == [
        "kv-math", "--gpu-mem-gb=-inf", "--rps=-.5"]
    assert join_dash_values(["--prompt-ids=-1", "-2"]) == ["--prompt-ids=-1", "-2"]  # has its value already
    assert join_dash_values(["run", "--json", "--seq", "8"]) == ["run", "--json", "--seq", "8"]
    assert join_dash_values(["-h", "-1"]) == ["-h", "-1"]  # short options are left alone
    assert join_dash_values(["nsys", "--", "--seq", "-1"]) == ["nsys", "--", "--seq", "-1"]  # after --: run's


# ---- 5. unrecognised arguments name the subcommand ---------------------------------------------------------------
@pytest.mark.parametrize(("argv", "line"), [
    (["run", "--bogus"], "run: unrecognized arguments: --bogus"),
    (["run", "--bogus", "1", "--seq", "8"], "run: unrecognized arguments: --bogus 1"),
    ([*GEN, "--prompt-ids", "1", "extra"], "generate: unrecognized arguments: extra"),
    ([*KV, "--frobnicate=3"], "kv-math: unrecognized arguments: --frobnicate=3"),
    (["report", "a", "b"], "report: unrecognized arguments: b"),
    (["align", "a.sqlite", "--out", "o", "b"], "align: unrecognized arguments: b"),
    (["calibrate", "--json", "--fast"], "calibrate: unrecognized arguments: --fast"),
    (["--bogus", "run"], "unrecognized arguments: --bogus"),  # before the subcommand: the top level's
])
def test_unrecognised_arguments_name_the_subcommand(argv: list[str], line: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert _error(capsys) == f"kvscope: error: {line}"


def test_unrecognised_run_argument_under_nsys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nsys", "--out", str(tmp_path / "n"), "--", "--bogus"]) == 2
    assert _error(capsys) == "kvscope: error: run: unrecognized arguments: --bogus"
    assert list(tmp_path.iterdir()) == []


def test_subprocess_unrecognised_argument_has_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "kvscope", "run", "--bogus"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2
    assert out.stderr == "kvscope: error: run: unrecognized arguments: --bogus\n"


# ---- 6. one `kvscope: error:` prefix ------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "line"), [
    (["run", "--seq", "x"], "run: argument --seq: invalid int value: 'x'"),
    (["run", "--granularity", "kernel"],
     "run: argument --granularity: invalid choice: 'kernel' (choose from 'none', 'phase', 'layer', 'op')"),
    (["kv-math"], "kv-math: the following arguments are required: --model"),
    (["generate", "--model", "tiny"], "generate: one of the arguments --prompt-ids --prompt is required"),
    (["run", "--seq"], "run: argument --seq: expected one argument"),
    ([], "the following arguments are required: command"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from 'generate', 'run', 'sweep', "
                     "'serve', 'calibrate', 'report', 'diff', 'capacity', 'kv-math', 'align', "
                     "'nsys')"),
    (["calibrate", "--device", "cpu"], "calibrate: measures a GPU, so it needs --device cuda and a CUDA device"),
    (["nsys", "--out", "n", "--", "--out", "x"], "nsys: give --out before --, not among the run arguments"),
    (["nsys", "--out", "n", "--", "--no-nvtx"], "nsys: needs NVTX ranges: drop --no-nvtx"),
    (["nsys", "--", "--seq", "x"], "run: argument --seq: invalid int value: 'x'"),
])
def test_one_prefix(argv: list[str], line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert _error(capsys) == f"kvscope: error: {line}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("message", "line"), [
    ("kvscope: error: kvscope: bad", "kvscope: error: bad"),
    ("kvscope: bad", "kvscope: error: bad"),
    ("bad\n  on two lines", "kvscope: error: bad on two lines"),
    ("kvscope's kernels need CUDA", "kvscope: error: kvscope's kernels need CUDA"),
])
def test_error_line(message: str, line: str) -> None:
    assert error_line(KvscopeError(message)) == line


def test_no_error_message_carries_its_own_prefix() -> None:
    root = ROOT / "kvscope"
    own = re.compile(r"""KvscopeError\(f?["']kvscope[ :]""")
    found = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
             for i, text in enumerate(p.read_text().splitlines(), 1) if own.search(text)]
    assert found == []
