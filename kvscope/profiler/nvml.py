"""NVML samples from a separate process: utilisation, memory, clocks, power, temperature, clock-event reasons.

The sampler is a child process with its own interpreter (`kvscope.profiler.nvml_child`), never a thread of the
measured process: a Python thread shares the GIL, and each of its wake-ups delays the kernel launches of a prefill
that the host's launches bound. Start it (`NvmlSampler(...)`) before the model loads, mark the measured window with
`start(origin_ns)` and `stop()`; `stop()` ends the child and reads what it wrote.

The child also guards the run's host memory (`kvscope.profiler.host_memory`): when the host has almost none left it
sends this process SIGTERM and writes why; after `stop()`, `stopped_run` holds that reason, for the run to say.

Timestamps are on the run's clock: `t_ms` is host time since the origin the run gives (`origin_ns`, a
`time.perf_counter_ns()` value; on Linux CLOCK_MONOTONIC, the same in both processes). Rows cover the measured
window; each row holds the value of every metric as last sampled at or before `t_ms` (the driver's buffered samples
and the polled ones come at different times). Where there is no NVIDIA driver or no nvidia-ml-py, or the child
fails, the sampler is unavailable and says why (`reason`); it never raises for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kvscope.schema import NS_PER_MS, NVML_COLUMNS

_STOP_TIMEOUT_S = 10.0


class NvmlSampler:
    """NVML sampling in a child process for the CUDA device `device`; a no-op (with `reason`) elsewhere."""

    def __init__(self, device: torch.device, interval_ms: float = 20.0, mode: str = "auto") -> None:
        if not interval_ms > 0:
            raise ValueError(f"NVML sampling interval must be positive, got {interval_ms} ms")
        self.interval_ms = interval_ms
        self.reason = ""
        self.driver = ""
        self.mode = ""  # buffered | polled, as the child found the driver
        self.child_pid: int | None = None
        self.stopped_run = ""  # why the child stopped this process (host memory ran out), else empty
        self._frame: pd.DataFrame | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._path: Path | None = None
        self._window: tuple[int, int] | None = None
        self._origin_ns: int | None = None
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        fd, path = tempfile.mkstemp(prefix="kvscope-nvml-", suffix=".txt")
        os.close(fd)
        self._path = Path(path)
        cmd = [sys.executable, "-m", "kvscope.profiler.nvml_child", "--index", str(index), "--interval-ms",
               str(interval_ms), "--mode", mode, "--out", path, "--guard-pid", str(os.getpid())]
        if uuid is not None:
            cmd += ["--uuid", f"GPU-{uuid}"]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the child imports kvscope from where this process did
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        say_fd = _stderr_copy()  # the guard writes its reason there at once (see nvml_child._Guard)
        if say_fd is not None:
            cmd += ["--guard-fd", str(say_fd)]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, env=env, close_fds=True,
                                          pass_fds=() if say_fd is None else (say_fd,))
        except OSError as exc:
            self.reason = f"NVML sampler could not start: {exc.strerror or exc}"
            self._path.unlink(missing_ok=True)
            return
        finally:
            if say_fd is not None:
                os.close(say_fd)
        self.child_pid = self._proc.pid

    @property
    def available(self) -> bool:
        """Before `stop()`: the child is running; after it: samples were read."""
        if self._frame is not None:
            return True
        return self._proc is not None and not self.reason

    @property
    def samples(self) -> pd.DataFrame | None:
        """The samples of the measured window (columns NVML_COLUMNS), or None when there are none."""
        return self._frame

    def start(self, origin_ns: int) -> None:
        """The measured window opens now; `origin_ns` (perf_counter_ns) is time zero of `t_ms`."""
        self._origin_ns = origin_ns
        self._window = (time.perf_counter_ns(), 0)

    def stop(self) -> None:
        """Close the window, end the child and read its samples. Safe to call twice, or without `start()`."""
        end = time.perf_counter_ns()
        if self._window is not None and self._window[1] == 0:
            self._window = (self._window[0], end)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        err = b""
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child's stop signal
                proc.stdin = None  # communicate() must not touch it again
            try:
                _, err = proc.communicate(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                self.reason = f"NVML sampler did not stop within {_STOP_TIMEOUT_S:.0f} s; killed"
            self._read(proc.returncode, err)
        finally:
            if self._path is not None:
                self._path.unlink(missing_ok=True)

    def _read(self, returncode: int | None, stderr: bytes) -> None:
        lines = self._path.read_text().splitlines() if self._path is not None and self._path.exists() else []
        header: dict[str, Any] = {}
        rows: list[tuple[int, str, float]] = []
        for line in lines:
            kind, _, rest = line.partition(",")
            if kind == "h":
                header = json.loads(rest)
            elif kind == "s":
                t, metric, value = rest.split(",")
                rows.append((int(t), metric, float(value)))
            elif kind == "e" and not self.reason:
                self.reason = json.loads(rest)
            elif kind == "g":
                self.stopped_run = json.loads(rest)
        if "error" in header:
            self.reason = header["error"]
        elif not header:
            last = stderr.decode(errors="replace").strip().splitlines()
            self.reason = self.reason or (f"NVML sampler exited with code {returncode}"
                                          + (f": {last[-1]}" if last else ""))
        self.driver = header.get("driver", "")
        self.mode = header.get("mode", "")
        if rows and self._window is not None and self._origin_ns is not None:
            self._frame = _wide(rows, self._window, self._origin_ns)

    def metadata(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, "interval_ms": self.interval_ms,
                "process": "child" if self.child_pid is not None else None, "mode": self.mode or None}


def _stderr_copy() -> int | None:
    """A duplicate of this process's stderr descriptor for the child to inherit; None without one."""
    try:
        return os.dup(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real stderr (a notebook, a closed stream): the `g,` line only
        return None


def _wide(rows: list[tuple[int, str, float]], window: tuple[int, int], origin_ns: int) -> pd.DataFrame:
    """Long samples (t_ns, metric, value) -> one row per sample time inside the window, each metric carried forward
    from its last sample."""
    long = pd.DataFrame(rows, columns=["t_ns", "metric", "value"])
    wide = long.pivot_table(index="t_ns", columns="metric", values="value", aggfunc="last").sort_index().ffill()
    wide = wide.reindex(columns=list(NVML_COLUMNS[1:]))
    wide = wide[(wide.index >= window[0]) & (wide.index <= window[1])]
    out = pd.DataFrame({"t_ms": (wide.index.to_numpy() - origin_ns) / NS_PER_MS})
    for col in NVML_COLUMNS[1:]:
        out[col] = wide[col].to_numpy(dtype="float64")
    out["clock_event_reasons"] = out["clock_event_reasons"].round().astype("Int64")
    return out.reset_index(drop=True)
