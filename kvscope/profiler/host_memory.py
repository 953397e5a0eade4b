"""The host's memory as the kernel's OOM killer sees it, read from /proc and the cgroup files (standard library only:
the NVML child process imports it).

Why: a process the OOM killer ends gets SIGKILL and cannot say a word. Under compute-sanitizer's racecheck, a
`kvscope run` of qwen2.5-0.5b grew to 130 GB resident on a 128 GiB host (racecheck's own shadow state, in the run's
process) and ended with exit code 9 and no message (lent H100, 2026-12-07: `dmesg` showed "Out of memory: Killed
process ... python3"). The NVML child, a separate process that wakes every 250 ms, watches the run's host memory with
`low_memory_reason`: it writes the reason to the run's stderr at once and stops the run with SIGTERM (the run prints
the reason as its error), before the kernel kills it. A run whose main thread is held in one long C call may still be
SIGKILLed before its handler runs; the child's line has said why by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
# the guard's floor: stop the run when less than this is left, of the host or of the cgroup's limit
GUARD_FLOOR_MIN_BYTES = 512 * MIB
GUARD_FLOOR_MAX_BYTES = 4096 * MIB
GUARD_FLOOR_SHARE = 0.05


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes (`MemTotal`, `MemAvailable`, ...); empty where it cannot be read."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return {}
    return out


def cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, None without a limit or where it cannot be read."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - current)


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Resident memory of process `pid`, None where it cannot be read (gone, or not Linux)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def guard_floor(total_bytes: int) -> int:
    """The floor for a host of `total_bytes`: 5% of it, at least 512 MiB and at most 4 GiB."""
    return int(min(GUARD_FLOOR_MAX_BYTES, max(GUARD_FLOOR_MIN_BYTES, GUARD_FLOOR_SHARE * total_bytes)))


@dataclass(frozen=True)
class HostMemory:
    """One reading: the host's total and available bytes, the room under the cgroup's limit (None: no limit), the
    watched process's resident bytes (None: unknown)."""

    total: int
    available: int
    room: int | None
    rss: int | None

    @property
    def left(self) -> int:
        return self.available if self.room is None else min(self.available, self.room)


def read_host_memory(pid: int) -> HostMemory | None:
    """The reading for process `pid` now; None where /proc/meminfo cannot be read (not Linux)."""
    info = meminfo()
    if "MemTotal" not in info or "MemAvailable" not in info:
        return None
    return HostMemory(info["MemTotal"], info["MemAvailable"], cgroup_room(), rss_bytes(pid))


def low_memory_reason(reading: HostMemory | None, floor_bytes: int | None = None) -> str | None:
    """Why the watched process should stop now (the host, or its cgroup, has less than the floor left: by default
    `guard_floor` of the host), or None."""
    if reading is None:
        return None
    floor = guard_floor(reading.total) if floor_bytes is None else floor_bytes
    if reading.left >= floor:
        return None
    mine = f"; this run's process holds {reading.rss / MIB:,.0f} MiB" if reading.rss is not None else ""
    return (f"host memory ran out: {reading.left / MIB:,.0f} MiB left of {reading.total / MIB:,.0f} MiB{mine}; the "
            f"run was stopped before the kernel's OOM killer would end it with SIGKILL (a tool inside the process, "
            f"such as compute-sanitizer's racecheck, can grow it without bound: fewer --reps / --gen-tokens, a "
            f"smaller model, or another tool)")
