"""NVML samples on a background thread: utilisation, memory, clocks, power, temperature, clock-event reasons.

Timestamps are on the run's clock: `t_ms` is host time since the origin the run gives (`origin_ns`, a
`time.perf_counter_ns()` value). Where there is no NVIDIA driver or no nvidia-ml-py, the sampler is unavailable and
says why (`reason`); it never raises for that.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

COLUMNS = ("t_ms", "gpu_util_pct", "mem_util_pct", "mem_used_mb", "sm_clock_mhz", "mem_clock_mhz", "power_w",
           "temp_c", "clock_event_reasons")


class NvmlSampler:
    def __init__(self, device: torch.device, interval_ms: float = 20.0) -> None:
        if interval_ms <= 0:
            raise ValueError(f"NVML sampling interval must be positive, got {interval_ms} ms")
        self.interval_s = interval_ms / 1000.0
        self.samples: list[tuple[Any, ...]] = []
        self.reason = ""
        self.gpu_name = ""
        self.driver = ""
        self._nvml: Any = None
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._origin_ns = 0
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no driver, no library: NVML is optional
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return
        self._nvml = pynvml
        self._handle = self._handle_for(device)
        self.gpu_name = _str(pynvml.nvmlDeviceGetName(self._handle))
        self.driver = _str(pynvml.nvmlSystemGetDriverVersion())
        self._reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _handle_for(self, device: torch.device) -> Any:
        """The NVML handle of torch's device, matched by UUID (CUDA_VISIBLE_DEVICES may renumber devices)."""
        nv = self._nvml
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                return nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except nv.NVMLError:
                pass
        return nv.nvmlDeviceGetHandleByIndex(index)

    def start(self, origin_ns: int) -> None:
        if not self.available:
            return
        self._origin_ns = origin_ns
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvscope-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _sample(self) -> tuple[Any, ...]:
        nv, h = self._nvml, self._handle
        t_ms = (time.perf_counter_ns() - self._origin_ns) / 1e6
        util = nv.nvmlDeviceGetUtilizationRates(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        reasons = self._reasons(h) if self._reasons is not None else None
        return (t_ms, int(util.gpu), int(util.memory), mem.used / 2**20,
                int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
                nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                None if reasons is None else int(reasons))

    def _loop(self) -> None:
        next_t = time.perf_counter()
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as exc:  # a failing query ends sampling; the reason is kept for the metadata
                self.reason = f"NVML sampling stopped: {type(exc).__name__}: {exc}"
                return
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.perf_counter()))


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
