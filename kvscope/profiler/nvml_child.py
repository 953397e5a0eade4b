"""The NVML sampling process: `python3 -m kvscope.profiler.nvml_child --uuid U --interval-ms X --out FILE`.

It runs beside the measured process with its own interpreter, so its wake-ups never take the measured process's GIL (a
sampling thread inside it delayed a launch-bound prefill by several percent). It imports only the standard library,
nvidia-ml-py and `kvscope.schema` (names only). Stop it by closing its standard input (the parent does; a parent that
dies closes it too).

Where the driver keeps buffered samples (`nvmlDeviceGetSamples`: utilisation, SM and memory clocks, power), the child
collects them at its rare wake-ups (every `max(interval, BUFFERED_WAKE_MS)`); what the driver does not buffer
(memory used, temperature, clock-event reasons, and any buffered metric whose query fails) is read at each wake-up.
Without buffered samples it wakes every `interval` ms and reads everything then.

Output, one record a line: a header `h,<json>` (gpu, driver, mode, metrics by source, or an error), then samples
`s,<t_ns>,<metric>,<value>` with `t_ns` on `time.perf_counter_ns()`'s clock (CLOCK_MONOTONIC, shared by every process
of the machine), so the parent places them on its run's clock without any exchange.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from typing import Any, TextIO

from kvscope.profiler.host_memory import low_memory_reason, read_host_memory
from kvscope.schema import MIB_BYTES, MS_PER_S, NS_PER_US

BUFFERED_WAKE_MS = 250.0
# NVML reports power in mW and sample timestamps in µs (NS_PER_US); the other units are the metrics' own
MW_PER_W = 1000.0
# buffered sample types of NVML (nvmlSamplingType_t) -> (metric, scale to the metric's unit)
_BUFFERED = (("power_w", "NVML_TOTAL_POWER_SAMPLES", 1 / MW_PER_W),
             ("gpu_util_pct", "NVML_GPU_UTILIZATION_SAMPLES", 1.0),
             ("mem_util_pct", "NVML_MEMORY_UTILIZATION_SAMPLES", 1.0),
             ("sm_clock_mhz", "NVML_PROCESSOR_CLK_SAMPLES", 1.0), ("mem_clock_mhz", "NVML_MEMORY_CLK_SAMPLES", 1.0))
# how far a buffered sample's timestamp may lie from now and still be taken as on a known clock
_CLOCK_TOLERANCE_NS = 30 * 10**9


def _value(nv: Any, value_type: int, value: Any) -> float:
    field = {nv.NVML_VALUE_TYPE_DOUBLE: "dVal", nv.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
             nv.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal", nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
             nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal"}.get(value_type, "siVal")
    return float(getattr(value, field))


class _Buffered:
    """One buffered metric: the samples the driver kept since the last read, on the monotonic clock."""

    def __init__(self, nv: Any, handle: Any, metric: str, sampling_type: int, scale: float) -> None:
        self.nv, self.handle, self.metric, self.type, self.scale = nv, handle, metric, sampling_type, scale
        self.last_us = 0
        self.offset_ns: int | None = None  # sample clock -> monotonic clock

    def probe(self, wall_to_mono_ns: int) -> bool:
        """Whether the driver buffers this metric on a clock we can place (wall clock or monotonic)."""
        _, samples = self.nv.nvmlDeviceGetSamples(self.handle, self.type, 0)
        if not samples:
            return False
        newest_ns = max(int(s.timeStamp) for s in samples) * NS_PER_US
        mono, wall = time.perf_counter_ns(), time.time_ns()
        if abs(newest_ns - wall) < _CLOCK_TOLERANCE_NS:
            self.offset_ns = wall_to_mono_ns
        elif abs(newest_ns - mono) < _CLOCK_TOLERANCE_NS:
            self.offset_ns = 0
        else:
            return False
        return True

    def read(self, out: TextIO) -> None:
        value_type, samples = self.nv.nvmlDeviceGetSamples(self.handle, self.type, self.last_us)
        for s in samples:
            ts = int(s.timeStamp)
            if ts <= self.last_us:
                continue
            out.write(f"s,{ts * NS_PER_US + self.offset_ns},{self.metric},"
                      f"{_value(self.nv, value_type, s.sampleValue) * self.scale}\n")
        if samples:
            self.last_us = max(self.last_us, *(int(s.timeStamp) for s in samples))


def _polled(nv: Any, handle: Any, metrics: set[str]) -> list[tuple[str, float]]:
    """One instantaneous reading of the metrics not buffered."""
    out: list[tuple[str, float]] = []
    if "gpu_util_pct" in metrics or "mem_util_pct" in metrics:
        util = nv.nvmlDeviceGetUtilizationRates(handle)
        out += [("gpu_util_pct", float(util.gpu)), ("mem_util_pct", float(util.memory))]
    if "sm_clock_mhz" in metrics:
        out.append(("sm_clock_mhz", float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM))))
    if "mem_clock_mhz" in metrics:
        out.append(("mem_clock_mhz", float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_MEM))))
    if "power_w" in metrics:
        out.append(("power_w", nv.nvmlDeviceGetPowerUsage(handle) / MW_PER_W))
    out.append(("mem_used_mib", nv.nvmlDeviceGetMemoryInfo(handle).used / MIB_BYTES))
    out.append(("temp_c", float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))))
    reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    if reasons is not None:
        out.append(("clock_event_reasons", float(reasons(handle))))
    return out


def _handle(nv: Any, uuid: str | None, index: int) -> Any:
    if uuid:
        try:
            return nv.nvmlDeviceGetHandleByUUID(uuid)
        except nv.NVMLError:
            pass  # a driver that does not know the UUID: the device by its index, as torch numbers it
    return nv.nvmlDeviceGetHandleByIndex(index)


def _stopped(timeout_s: float) -> bool:
    """Wait up to `timeout_s` on standard input; True once it is closed (the parent's stop)."""
    ready, _, _ = select.select([sys.stdin], [], [], max(0.0, timeout_s))
    return bool(ready) and os.read(sys.stdin.fileno(), 4096) == b""


class _Guard:
    """The run's host-memory guard (`kvscope.profiler.host_memory`): at each wake-up, when the host (or the cgroup)
    has less than the floor left, write the reason (`g,` line) and send the run SIGTERM, once."""

    def __init__(self, pid: int | None, floor_bytes: int | None, out: TextIO, say_fd: int | None = None) -> None:
        self.pid, self.floor, self.out, self.fired = pid, floor_bytes, out, False
        self.say_fd = say_fd  # the run's own stderr, passed down: the reason reaches the user even if the run is
        self.next_s = 0.0  # then SIGKILLed before its SIGTERM handler runs (a main thread inside a long C call)

    def check(self) -> None:
        """At most every BUFFERED_WAKE_MS, whatever the sampling interval (a few /proc reads each time)."""
        now = time.perf_counter()
        if self.pid is None or self.fired or now < self.next_s:
            return
        self.next_s = now + BUFFERED_WAKE_MS / MS_PER_S
        reason = low_memory_reason(read_host_memory(self.pid), self.floor)
        if reason is None:
            return
        self.fired = True
        self.out.write("g," + json.dumps(reason) + "\n")
        self.out.flush()
        if self.say_fd is not None:
            with contextlib.suppress(OSError):  # a closed stderr: the `g,` line still tells the run
                os.write(self.say_fd, f"kvscope: stopping the run (SIGTERM): {reason}\n".encode())
        with contextlib.suppress(ProcessLookupError):  # the run ended by itself meanwhile: nothing to stop
            os.kill(self.pid, signal.SIGTERM)

    def watch(self) -> None:
        """Without NVML: the guard alone, until the parent closes standard input."""
        if self.pid is None:
            return
        while True:
            self.check()
            if _stopped(BUFFERED_WAKE_MS / MS_PER_S):
                return


def sample(uuid: str | None, index: int, interval_ms: float, mode: str, out: TextIO,
           guard: _Guard | None = None) -> None:
    guard = guard or _Guard(None, None, out)

    def header(**fields: Any) -> None:
        out.write("h," + json.dumps(fields) + "\n")
        out.flush()

    try:
        import pynvml as nv

        nv.nvmlInit()
        handle = _handle(nv, uuid, index)
        gpu = nv.nvmlDeviceGetName(handle)
        driver = nv.nvmlSystemGetDriverVersion()
    except Exception as exc:  # no driver or no library: the parent records the reason, the run goes on
        header(error=f"NVML unavailable: {type(exc).__name__}: {exc}")
        guard.watch()
        return
    buffered: list[_Buffered] = []
    if mode != "polled":
        wall_to_mono_ns = time.perf_counter_ns() - time.time_ns()  # one offset for every metric: rows line up
        for metric, type_name, scale in _BUFFERED:
            b = _Buffered(nv, handle, metric, getattr(nv, type_name), scale)
            try:
                if b.probe(wall_to_mono_ns):
                    buffered.append(b)
            except nv.NVMLError:
                pass  # not buffered by this driver: polled instead
    polled = {m for m, _, _ in _BUFFERED} - {b.metric for b in buffered}
    wake_s = (max(interval_ms, BUFFERED_WAKE_MS) if buffered else interval_ms) / MS_PER_S
    header(gpu=gpu.decode() if isinstance(gpu, bytes) else str(gpu),
           driver=driver.decode() if isinstance(driver, bytes) else str(driver),
           mode="buffered" if buffered else "polled", buffered=[b.metric for b in buffered],
           polled=sorted(polled), wake_ms=wake_s * MS_PER_S)
    next_t = time.perf_counter()
    while True:
        try:
            for b in buffered:
                b.read(out)
            t = time.perf_counter_ns()
            for metric, value in _polled(nv, handle, polled):
                out.write(f"s,{t},{metric},{value}\n")
        except Exception as exc:  # a failing query ends sampling (the parent records why); the guard goes on
            out.write("e," + json.dumps(f"NVML sampling stopped: {type(exc).__name__}: {exc}") + "\n")
            guard.watch()
            return
        guard.check()
        next_t += wake_s
        if _stopped(next_t - time.perf_counter()):
            for b in buffered:  # what the driver buffered since the last wake-up
                try:
                    b.read(out)
                except Exception as exc:  # the samples already written stand; the parent records the loss
                    out.write("e," + json.dumps(f"NVML: the last buffered samples were lost: {type(exc).__name__}: "
                                                f"{exc}") + "\n")
                    break
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvscope-nvml-child")
    p.add_argument("--uuid", default=None)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--interval-ms", type=float, required=True)
    p.add_argument("--mode", choices=["auto", "buffered", "polled"], default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--guard-pid", type=int, default=None, help="the run's process: stopped when host memory runs out")
    p.add_argument("--guard-floor-mib", type=float, default=None, help="the guard's floor (default: host_memory's)")
    p.add_argument("--guard-fd", type=int, default=None, help="the run's stderr, inherited")
    ns = p.parse_args(argv)
    floor = None if ns.guard_floor_mib is None else int(ns.guard_floor_mib * MIB_BYTES)
    with open(ns.out, "w", buffering=1 << 16) as out:
        sample(ns.uuid, ns.index, ns.interval_ms, ns.mode, out, _Guard(ns.guard_pid, floor, out, ns.guard_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
