"""The run's host-memory guard: the readings (/proc/meminfo, the cgroup's limit, a process's RSS), the floor, the
reason, and the NVML child that sends the run SIGTERM with that reason before the kernel's OOM killer would SIGKILL
it (what ended `kvscope run` under compute-sanitizer's racecheck with exit code 9 and no message)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvscope.errors import KvscopeError
from kvscope.measure.run import raise_guard_reason
from kvscope.profiler.host_memory import (
    GUARD_FLOOR_MAX_BYTES,
    GUARD_FLOOR_MIN_BYTES,
    MIB,
    HostMemory,
    cgroup_room,
    guard_floor,
    low_memory_reason,
    meminfo,
    read_host_memory,
    rss_bytes,
)
from kvscope.profiler.nvml import NvmlSampler

GIB = 1024 * MIB


def test_meminfo_reads_kib_as_bytes(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       131072000 kB\nMemAvailable:    2048 kB\nHugePages_Total:       0\n")
    assert meminfo(f) == {"MemTotal": 131072000 * 1024, "MemAvailable": 2048 * 1024, "HugePages_Total": 0}
    assert meminfo(tmp_path / "missing") == {}


def test_cgroup_room_is_the_limit_less_the_usage(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    assert cgroup_room(tmp_path) == 73741824
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_room(tmp_path) is None
    assert cgroup_room(tmp_path / "none") is None


def test_rss_of_a_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tpython3\nVmRSS:\t  130799276 kB\n")
    assert rss_bytes(42, tmp_path) == 130799276 * 1024
    assert rss_bytes(43, tmp_path) is None
    assert rss_bytes(os.getpid()) > 0  # this process, from the real /proc


def test_the_floor_is_five_percent_between_its_bounds() -> None:
    assert guard_floor(4 * GIB) == GUARD_FLOOR_MIN_BYTES
    assert guard_floor(40 * GIB) == 2 * GIB
    assert guard_floor(128 * GIB) == GUARD_FLOOR_MAX_BYTES


def test_above_the_floor_there_is_no_reason() -> None:
    assert low_memory_reason(HostMemory(128 * GIB, 5 * GIB, None, 0)) is None  # the 128 GiB host's floor: 4 GiB
    assert low_memory_reason(HostMemory(128 * GIB, 3 * GIB, None, 0)) is not None
    assert low_memory_reason(None) is None  # no /proc/meminfo: no guard


def test_below_the_floor_the_reason_is_one_line() -> None:
    reason = low_memory_reason(HostMemory(125 * GIB, 512 * MIB, None, 120 * GIB), floor_bytes=GIB)
    assert reason is not None and "\n" not in reason
    assert reason.startswith("host memory ran out: 512 MiB left of 128,000 MiB; this run's process holds 122,880 MiB")
    assert "OOM killer" in reason and "racecheck" in reason


def test_a_cgroup_limit_counts_when_it_is_lower() -> None:
    assert low_memory_reason(HostMemory(128 * GIB, 100 * GIB, 200 * MIB, None), floor_bytes=GIB) is not None
    assert low_memory_reason(HostMemory(128 * GIB, 100 * GIB, 2 * GIB, None), floor_bytes=GIB) is None
    assert read_host_memory(os.getpid()).total > 0  # this host, from the real /proc


def test_the_child_stops_the_run_with_sigterm_and_says_why(tmp_path: Path) -> None:
    """The NVML child with a floor no host can meet: it writes the reason and sends SIGTERM to the guarded process
    (here a stand-in `sleep`), also where NVML is unavailable (no driver here: the guard runs alone)."""
    victim = subprocess.Popen(["sleep", "30"])
    out = tmp_path / "samples.txt"
    said_r, said_w = os.pipe()  # stands in for the run's stderr, which the child writes the reason to at once
    child = subprocess.Popen([sys.executable, "-m", "kvscope.profiler.nvml_child", "--interval-ms", "20", "--out",
                              str(out), "--guard-pid", str(victim.pid), "--guard-floor-mib", str(2**40),
                              "--guard-fd", str(said_w)], stdin=subprocess.PIPE, pass_fds=(said_w,))
    os.close(said_w)
    try:
        assert victim.wait(timeout=30) == -signal.SIGTERM
    finally:
        victim.kill()
        child.stdin.close()
        child.wait(timeout=30)
    guard_lines = [line for line in out.read_text().splitlines() if line.startswith("g,")]
    assert len(guard_lines) == 1 and "host memory ran out" in guard_lines[0]
    with os.fdopen(said_r) as said:
        lines = said.read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvscope: stopping the run (SIGTERM): host memory ran out: ")


def test_without_a_guard_pid_the_child_guards_nothing(tmp_path: Path) -> None:
    out = tmp_path / "samples.txt"
    child = subprocess.Popen([sys.executable, "-m", "kvscope.profiler.nvml_child", "--interval-ms", "20", "--out",
                              str(out), "--guard-floor-mib", str(2**40)], stdin=subprocess.PIPE)
    time.sleep(0.5)
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    assert not any(line.startswith("g,") for line in out.read_text().splitlines())


def test_the_run_reports_the_guards_reason(tmp_path: Path) -> None:
    """The parent's side: a `g,` line read at stop() becomes `stopped_run`, and the run raises it as its error."""
    sampler = NvmlSampler(torch.device("cpu"))
    f = tmp_path / "samples.txt"
    f.write_text('h,{"error": "NVML unavailable: no driver"}\ng,"host memory ran out: 10 MiB left of 1,000 MiB"\n')
    sampler._path = f
    sampler._read(0, b"")
    assert sampler.stopped_run == "host memory ran out: 10 MiB left of 1,000 MiB"
    with pytest.raises(KvscopeError, match=r"^host memory ran out: 10 MiB left of 1,000 MiB$"):
        raise_guard_reason(sampler)
    raise_guard_reason(NvmlSampler(torch.device("cpu")))  # no reason: nothing raised
