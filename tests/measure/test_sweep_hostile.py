"""Hostile inputs to `kvscope sweep`: two writers of one file, repeated sizes, batches too large to allocate, a
failing disk, a bad `--out`. Every bad input ends in one `kvscope: error: ...` line and exit code 2, with no traceback
and no finished row lost or changed. A resume of a malformed, hand-edited or foreign file: test_sweep_resume_hostile.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import sweep_checks
import torch
from paths import ROOT
from sweep_checks import (
    BASE,
    SUFFIXES,
    copy_made,
    error_line,
    log_text,
    names_in,
    only_error_line,
    pairs_of,
    sweep_cli,
)

from kvscope.analysis.sweep_file import read_sweep
from kvscope.engine.plan import RunPlan, RunSpec
from kvscope.errors import KvscopeError
from kvscope.measure import sweep as sweep_mod
from kvscope.measure.memory import allocation_failure

REPO = ROOT
HUGE_BATCH = 10**9  # tiny's KV cache at batch 10**9 and 11 positions: 5.6 TB


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return sweep_checks.made_sweeps(tmp_path_factory.mktemp("made"))


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """The lock a running sweep holds, held by the test."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _busy(out: Path, lock: Path) -> str:
    return (f"kvscope: error: {out} is being written by another kvscope sweep (it holds {lock}); wait for it to end "
            "or choose another --out")


# ---- 1. two writers of one file ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_writer_is_refused_while_the_lock_is_held(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                           resume: bool, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, suffix) if resume else tmp_path / f"s{suffix}"
    lock = tmp_path / f".s{suffix}.lock"
    with _held(lock):
        assert sweep_cli(out, "8,16,32", "1,2", *(["--resume"] if resume else [])) == 2
    assert only_error_line(capsys) == _busy(out, lock)
    assert lock.exists()  # the refused sweep leaves the holder's lock file alone
    if resume:
        assert out.read_bytes() == made[suffix]
        assert names_in(tmp_path) == sorted([lock.name, out.name])
    else:
        assert names_in(tmp_path) == [lock.name]


_GATED = """
import sys
import time
from pathlib import Path

from kvscope.measure import sweep

started, go = Path(sys.argv[1]), Path(sys.argv[2])
real = sweep.measure


def gated(*args, **kwargs):
    started.touch()  # the sweep holds its lock and measures its first configuration
    while not go.exists():
        time.sleep(0.01)
    return real(*args, **kwargs)


sweep.measure = gated
from kvscope.cli import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_two_real_sweeps_of_one_file(suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out, lock = tmp_path / f"s{suffix}", tmp_path / f".s{suffix}.lock"
    started, go, script = work / "started", work / "go", work / "gated.py"
    script.write_text(_GATED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [*BASE, "--seq", "8", "--batch-sizes", "1,2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, str(script), str(started), str(go), *argv], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sweep did not start"
            time.sleep(0.02)
        # the first sweep is in the middle of its first configuration: a second one, resuming or not, is refused
        assert sweep_cli(out, "8,16", "1,2") == 2
        assert only_error_line(capsys) == _busy(out, lock)
        assert sweep_cli(out, "8,16", "1,2", "--resume") == 2
        assert only_error_line(capsys) == _busy(out, lock)
        go.touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert pairs_of(out) == [(8, 1), (8, 2)]  # the first sweep's rows, each once
    assert names_in(tmp_path) == sorted([out.name, "work"])  # its lock file is gone
    assert sweep_cli(out, "8,16", "1,2", "--resume") == 0  # and a resume goes ahead once it is done
    assert pairs_of(out) == [(8, 1), (8, 2), (16, 1), (16, 2)]


def test_the_lock_file_goes_and_a_stale_one_blocks_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out, lock = tmp_path / "s.csv", tmp_path / ".s.csv.lock"
    lock.write_text("")  # left by a sweep that was killed: nobody holds it
    assert sweep_cli(out, "8", "1") == 0
    assert names_in(tmp_path) == ["s.csv"]
    capsys.readouterr()
    assert sweep_cli(out, "8", "1") == 2  # refused inside the lock (exists, no --resume): the lock file goes too
    assert "pass --resume" in only_error_line(capsys)
    assert names_in(tmp_path) == ["s.csv"]


def test_a_link_shares_the_lock_of_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target, link = tmp_path / "s.csv", tmp_path / "link.csv"
    link.symlink_to(target)
    with _held(tmp_path / ".s.csv.lock"):
        assert sweep_cli(link, "8", "1") == 2
    assert only_error_line(capsys) == _busy(link, tmp_path / ".s.csv.lock")
    assert sweep_cli(link, "8", "1") == 0
    assert link.is_symlink() and link.resolve() == target and pairs_of(target) == [(8, 1)]

# ---- 2. repeated sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seqs", "batches", "pairs", "notes"), [
    ("16,16,32", "1,1", [(16, 1), (32, 1)], ["--seq: 16", "--batch-sizes: 1"]),
    ("8,8,8", "2,1,2", [(8, 2), (8, 1)], ["--seq: 8", "--batch-sizes: 2"]),
    ("8,16,8,16", "1", [(8, 1), (16, 1)], ["--seq: 8, 16"]),
    ("8, 08 ,8", "1", [(8, 1)], ["--seq: 8"]),
    ("16,8", "2,1", [(16, 2), (16, 1), (8, 2), (8, 1)], []),
])
def test_repeated_sizes_are_measured_once(seqs: str, batches: str, pairs: list[tuple[int, int]], notes: list[str],
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert sweep_cli(out, seqs, batches) == 0
    assert pairs_of(out) == pairs
    log = log_text(capsys)
    for note in notes:
        assert f"kvscope: {note} given more than once; each configuration is measured once" in log
    assert log.count("given more than once") == len(notes)


def test_repeated_sizes_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert sweep_cli(out, "16", "1") == 0
    assert sweep_cli(out, "16,16,32", "1,1", "--resume") == 0
    assert pairs_of(out) == [(16, 1), (32, 1)]
    assert "1 configuration(s) to run" in log_text(capsys)

# ---- 3. batches too large to allocate ------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_batch_too_large_for_memory_is_oom_and_the_sweep_goes_on(suffix: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"s{suffix}"
    peak = _peak_rss_bytes()
    assert sweep_cli(out, "8,16", f"1,{HUGE_BATCH},2") == 0
    assert _peak_rss_bytes() - peak < 2**30  # nothing of the 5.6 TB was ever touched
    df = read_sweep(out)
    assert pairs_of(out) == [(8, 1), (8, HUGE_BATCH), (8, 2), (16, 1), (16, HUGE_BATCH), (16, 2)]
    oom = df["batch"] == HUGE_BATCH
    assert df.loc[oom, "flag"].tolist() == ["oom", "oom"] and df.loc[oom, "decode_tok_s"].isna().all()
    assert (df.loc[~oom, "decode_tok_s"] > 0).all() and not df.loc[~oom, "flag"].str.contains("oom").any()
    assert df["seed"].tolist() == [0] * 6 and df["collapse_factor"].tolist() == [2.0] * 6  # oom rows record them too
    log = log_text(capsys)
    assert re.search(rf"kvscope: seq 8 batch {HUGE_BATCH}: needs at least 5,\d{{3}}\.\d GiB, more than [\d,.]+ GiB; "
                     "recorded as oom without running", log), log


@pytest.mark.parametrize("batch", [10**12, 10**15])
def test_a_failed_allocation_is_oom_on_the_cpu(batch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """With no memory size to predict from, the allocator itself refuses (sizes past any address space fail at
    once, whatever the overcommit policy) and the RuntimeError it raises is taken for oom."""
    monkeypatch.setattr(sweep_mod, "device_memory", lambda _device: None)
    out = tmp_path / "s.csv"
    peak = _peak_rss_bytes()
    assert sweep_cli(out, "8", f"1,{batch},2") == 0
    assert _peak_rss_bytes() - peak < 2**30
    df = read_sweep(out)
    assert df["flag"].str.contains("oom").tolist() == [False, True, False]
    assert df["decode_tok_s"].notna().tolist() == [True, False, True]
    log = log_text(capsys)
    kv = 2 * 2 * batch * 11 * 2 * 16 * 4  # tiny: 2 layers, K and V, 11 positions, 2 KV heads of 16, float32
    assert (f"kvscope: seq 8 batch {batch}: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to "
            f"allocate {kv} bytes. Error code 12 (Cannot allocate memory)); recorded as oom") in log


def _cpu_allocation_error() -> RuntimeError:
    try:
        torch.empty(2**60, dtype=torch.uint8)  # an exabyte: refused at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("an exabyte was allocated")


@pytest.mark.parametrize(("exc", "expected"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 5632000000000 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("Storage size calculation overflowed with sizes=[2, 2, 100000000000000000, 11, 2, 16]"), True),
    (RuntimeError("simulated crash"), False),
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (5) at non-singleton dimension 1"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("out of memory"), False),
    (KvscopeError("out of memory"), False),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), False),
])
def test_what_counts_as_an_allocation_failure(exc: BaseException, expected: bool) -> None:
    assert allocation_failure(exc) is expected


def test_the_cpu_allocators_own_error_counts() -> None:
    exc = _cpu_allocation_error()
    assert "can't allocate memory" in str(exc) and allocation_failure(exc)


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered", "shape mismatch"])
def test_other_errors_stop_the_sweep_and_keep_what_it_finished(message: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = sweep_mod.measure

    def fail_second(model: object, plan: RunPlan, *a: object, **k: object) -> object:
        if plan.spec.batch_size == 2:
            raise RuntimeError(message)
        return real(model, plan, *a, **k)

    monkeypatch.setattr(sweep_mod, "measure", fail_second)
    out = tmp_path / "s.csv"
    with pytest.raises(RuntimeError, match=message):  # a bug is not taken for memory
        sweep_cli(out, "8", "1,2")
    assert pairs_of(out) == [(8, 1)] and names_in(tmp_path) == ["s.csv"]


def test_a_model_too_large_to_load_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def oom(*_a: object, **_k: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 99 bytes.\nsecond line")

    monkeypatch.setattr(sweep_mod, "load_model", oom)
    assert sweep_cli(tmp_path / "s.csv", "8", "1") == 2
    assert only_error_line(capsys) == ("kvscope: error: cannot load tiny on cpu: out of memory (DefaultCPUAllocator: "
                                   "can't allocate memory: you tried to allocate 99 bytes.)")
    assert names_in(tmp_path) == []


# ---- 4. a failing disk -------------------------------------------------------------------------------------------
def _fail(err: int) -> Callable[..., None]:
    def raise_(*_a: object, **_k: object) -> None:
        raise OSError(err, os.strerror(err))
    return raise_


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("where", "err"), [
    ("fsync", errno.ENOSPC), ("fsync", errno.EDQUOT), ("fsync", errno.EIO),
    ("replace", errno.EROFS), ("replace", errno.EACCES),
])
@pytest.mark.parametrize("resume", [False, True])
def test_a_failing_write_is_one_line_and_keeps_the_file(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                        where: str, err: int, resume: bool,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, suffix) if resume else tmp_path / f"s{suffix}"
    monkeypatch.setattr(os, where, _fail(err))
    assert sweep_cli(out, "8,16,32", "1,2", *(["--resume"] if resume else [])) == 2
    monkeypatch.undo()
    after = "the file is as it was, with 4 configuration(s)" if resume else "no file was made"
    assert error_line(capsys) == f"kvscope: error: cannot write {out}: {os.strerror(err)}; {after}"
    if resume:
        assert out.read_bytes() == made[suffix]
        assert names_in(tmp_path) == [out.name]  # no temporary file, no lock file
    else:
        assert names_in(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_file_size_limit_mid_sweep(made: dict[str, bytes], tmp_path: Path, suffix: str) -> None:
    """A real write that fails in the kernel (RLIMIT_FSIZE: EFBIG, "File too large"), in a process of its own."""
    out = copy_made(made, tmp_path, suffix)
    limit = len(made[suffix]) + 64  # room for the file as it is, not for one more row
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "kvscope", *BASE, "--seq", "8,16,32", "--batch-sizes", "1,2", "--out", str(out),
            "--resume"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"kvscope: error: cannot write {out}: File too large; the file is "
                                                    "as it was, with 4 configuration(s)")
    assert out.read_bytes() == made[suffix]
    assert names_in(tmp_path) == [out.name]


def test_an_unwritable_folder_or_file_is_refused_before_any_work(made: dict[str, bytes], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".csv")
    real = os.access
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    assert only_error_line(capsys) == f"kvscope: error: --out {out}: folder {tmp_path} is not writable"
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    assert only_error_line(capsys) == f"kvscope: error: --resume: {out} is not readable and writable"
    assert out.read_bytes() == made[".csv"] and names_in(tmp_path) == [out.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert sweep_cli(folder / "s.csv", "8", "1") == 2
        assert only_error_line(capsys) == f"kvscope: error: --out {folder / 's.csv'}: folder {folder} is not writable"
    finally:
        folder.chmod(0o755)


def test_a_resumed_file_keeps_its_mode(made: dict[str, bytes], tmp_path: Path) -> None:
    out = copy_made(made, tmp_path, ".csv")
    out.chmod(0o640)
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 0
    assert out.stat().st_mode & 0o777 == 0o640


# ---- 5. a bad --out ------------------------------------------------------------------------------------------
def _never_loaded(*_a: object, **_k: object) -> None:
    raise AssertionError("the model was loaded before --out was checked")


def _setup_out(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """An --out of the given kind, and the message it must get ({out} stands for the path)."""
    ext = "{out}: the sweep file must end in .csv or .parquet"
    folder = "{out} is a folder: give a FILE.csv or FILE.parquet"
    plain = {"txt": "s.txt", "none": "s", "bak": "s.csv.bak", "space": "s.csv ", "json": "s.json", "csvx": "s.csvx"}
    if kind in plain:
        return tmp_path / plain[kind], ext
    if kind in ("dotfile", "dotfile-parquet"):  # a name that is only the extension: no wrong suffix to speak of
        name = ".csv" if kind == "dotfile" else ".Parquet"
        return tmp_path / name, f"{{out}}: the file name is only the extension {name}; give a name before it, such " \
                                f"as sweep{name}"
    if kind in ("dir", "dir.csv", "dir.parquet"):
        path = tmp_path / kind
        path.mkdir()
        return path, folder
    if kind == "link-to-dir":
        (tmp_path / "d").mkdir()
        (tmp_path / "l.csv").symlink_to(tmp_path / "d")
        return tmp_path / "l.csv", folder
    if kind == "link-to-txt":
        (tmp_path / "t.txt").write_text("")
        (tmp_path / "l.csv").symlink_to(tmp_path / "t.txt")
        return tmp_path / "l.csv", "{out} is a link to " + str(tmp_path / "t.txt") + ", which does not end in .csv"
    if kind == "fifo":
        os.mkfifo(tmp_path / "f.csv")
        return tmp_path / "f.csv", "{out} is not a regular file"
    if kind == "parent-is-file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "s.csv", "{out}: " + str(tmp_path / "file") + " is not a folder"
    if kind == "no-parent":
        return tmp_path / "missing" / "s.csv", "{out}: folder " + str(tmp_path / "missing") + " does not exist"
    if kind == "long-name":
        return tmp_path / ("x" * 240 + ".csv"), "{out}: the file name takes 244 bytes, at most 237 here (the sweep " \
                                                "writes .NAME.<random>.tmp beside it)"
    if kind == "too-long-name":
        return tmp_path / ("x" * 300 + ".csv"), "{out}: File name too long"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "none", "bak", "space", "dotfile", "dotfile-parquet", "json", "csvx", "dir",
                                  "dir.csv",
                                  "dir.parquet", "link-to-dir", "link-to-txt", "fifo", "parent-is-file", "no-parent",
                                  "long-name", "too-long-name"])
def test_a_bad_out_is_refused_before_the_model_loads(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, message = _setup_out(kind, tmp_path)
    before = names_in(tmp_path)
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    for extra in ([], ["--resume"]):
        assert sweep_cli(out, "8", "1", *extra) == 2
        assert only_error_line(capsys) == "kvscope: error: --out " + message.format(out=out)
        assert names_in(tmp_path) == before


def test_a_link_loop_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    assert sweep_cli(tmp_path / "a.csv", "8", "1") == 2
    assert only_error_line(capsys).startswith(f"kvscope: error: --out {tmp_path / 'a.csv'}: ")
    assert names_in(tmp_path) == ["a.csv", "b.csv"]


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_out_is_refused(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    assert sweep_cli(text, "8", "1") == 2
    assert "--out" in only_error_line(capsys)
    assert names_in(tmp_path) == []


@pytest.mark.parametrize(("out", "message"), [
    (Path(""), "--out . is a folder: give a FILE.csv or FILE.parquet"),
    (Path("."), "--out . is a folder: give a FILE.csv or FILE.parquet"),
    (Path("s\0.csv"), "--out must not contain a NUL character"),
])
def test_the_api_refuses_an_empty_out(out: Path, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.chdir(tmp_path)
    spec = sweep_mod.SweepSpec(RunSpec(model="tiny", device="cpu", gen_tokens=3, warmup=0, reps=2), (8,), (1,), out)
    with pytest.raises(KvscopeError) as info:
        sweep_mod.run_sweep(spec)
    assert str(info.value) == message


@pytest.mark.parametrize(("name", "read"), [("S.CSV", pd.read_csv), ("S.Parquet", pd.read_parquet)])
def test_the_extension_is_read_in_any_case(name: str, read: Callable, tmp_path: Path) -> None:
    assert sweep_cli(tmp_path / name, "8", "1,2") == 0
    assert read(tmp_path / name)["batch"].tolist() == [1, 2]
