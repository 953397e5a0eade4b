"""profiler.nvml: NVML sampled from a child process (no thread in the measured process), polled or from the driver's
buffered samples, a failure a reason and not an error; checked against a stand-in pynvml (no GPU here)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvscope.profiler.nvml import NvmlSampler
from kvscope.schema import NVML_COLUMNS

_FAKE_PYNVML = '''
"""A stand-in for nvidia-ml-py: a GPU whose utilisation rises 1 per query, buffered samples optional."""
import os, time

NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
NVML_TOTAL_POWER_SAMPLES, NVML_GPU_UTILIZATION_SAMPLES, NVML_MEMORY_UTILIZATION_SAMPLES = 0, 1, 2
NVML_PROCESSOR_CLK_SAMPLES, NVML_MEMORY_CLK_SAMPLES = 5, 6
NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG = 0, 1, 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_VALUE_TYPE_SIGNED_LONG_LONG = 3, 4
BUFFERED = os.environ.get("FAKE_NVML_BUFFERED") == "1"
_calls = {"n": 0}

class NVMLError(Exception):
    pass

class _U:
    gpu, memory = 0, 0

class _M:
    used = 3 * 2**30

class _V:
    def __init__(self, v): self.uiVal = v

class _S:
    def __init__(self, ts, v): self.timeStamp, self.sampleValue = ts, _V(v)

def nvmlInit():
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError("Driver Not Loaded")
def nvmlDeviceGetHandleByUUID(uuid): return uuid
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return b"Fake GPU"
def nvmlSystemGetDriverVersion(): return "999.1"
def nvmlDeviceGetUtilizationRates(h):
    _calls["n"] += 1
    u = _U(); u.gpu = _calls["n"] % 100; u.memory = 7; return u
def nvmlDeviceGetMemoryInfo(h): return _M()
def nvmlDeviceGetClockInfo(h, which): return 1980 if which == NVML_CLOCK_SM else 2619
def nvmlDeviceGetPowerUsage(h): return 123456
def nvmlDeviceGetTemperature(h, which): return 41
def nvmlDeviceGetCurrentClocksEventReasons(h): return 4
def nvmlDeviceGetSamples(h, sampling_type, last_us):
    if not BUFFERED:
        raise NVMLError("Not Supported")
    now_us = time.time_ns() // 1000
    # the driver keeps a sample every 10 ms (on a 10 ms grid) of the last 0.2 s
    stamps = [now_us - now_us % 10_000 - k * 10_000 for k in range(20)]
    value = {0: 250000, 1: 88, 2: 12, 5: 1755, 6: 2619}[sampling_type]
    return NVML_VALUE_TYPE_UNSIGNED_INT, [_S(t, value) for t in sorted(stamps) if t > last_us]
'''


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lib = tmp_path / "fakelib"
    lib.mkdir()
    (lib / "pynvml.py").write_text(_FAKE_PYNVML)
    monkeypatch.setenv("PYTHONPATH", str(lib))
    props = type("Props", (), {"uuid": "fake-uuid"})()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: props)
    return lib


def _sample_for(seconds: float, interval_ms: float = 10.0):
    threads = threading.active_count()
    s = NvmlSampler(torch.device("cuda"), interval_ms)
    assert s.child_pid is not None and s.child_pid != os.getpid()
    assert threading.active_count() == threads  # no thread in the measured process
    time.sleep(0.3)  # the child starts (model loading happens here in a run)
    origin = time.perf_counter_ns()
    s.start(origin)
    time.sleep(seconds)
    s.stop()
    return s, origin


def test_nvml_samples_come_from_a_child_process_polled(fake_gpu: Path) -> None:
    s, _ = _sample_for(0.4)
    assert s.available and s.reason == "" and s.mode == "polled"
    assert s.driver == "999.1"
    df = s.samples
    assert list(df.columns) == list(NVML_COLUMNS)
    assert 10 <= len(df) <= 60  # ~40 wake-ups of 10 ms inside a 0.4 s window
    assert df["t_ms"].is_monotonic_increasing and df["t_ms"].iloc[0] >= 0 and df["t_ms"].iloc[-1] <= 400 + 50
    assert (df["power_w"] == 123.456).all() and (df["sm_clock_mhz"] == 1980).all() and (df["temp_c"] == 41).all()
    assert (df["mem_used_mib"] == 3 * 1024).all() and (df["clock_event_reasons"] == 4).all()
    assert df["gpu_util_pct"].is_monotonic_increasing  # the fake's counter: every row is a fresh query
    meta = s.metadata()
    assert meta["process"] == "child" and meta["mode"] == "polled" and meta["available"] is True


def test_nvml_buffered_samples_wake_the_child_rarely(fake_gpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_BUFFERED", "1")
    s, _ = _sample_for(0.6)
    assert s.available and s.mode == "buffered"
    df = s.samples
    # buffered metrics arrive at the driver's 10 ms spacing although the child woke only every 250 ms
    assert len(df) >= 30
    assert (df["gpu_util_pct"] == 88).all() and (df["power_w"] == 250.0).all() and (df["sm_clock_mhz"] == 1755).all()
    gaps = np.diff(df["t_ms"].to_numpy())
    assert np.median(gaps) == pytest.approx(10.0, abs=1.0)
    # the polled memory reading came at a wake-up and is carried forward from there
    assert df["mem_used_mib"].notna().sum() >= len(df) - 30


def test_nvml_failure_is_a_reason_not_an_error(fake_gpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    s, _ = _sample_for(0.1)
    assert not s.available and s.samples is None
    assert s.reason == "NVML unavailable: NVMLError: Driver Not Loaded"


def test_nvml_on_cpu_starts_nothing() -> None:
    s = NvmlSampler(torch.device("cpu"))
    assert s.child_pid is None and not s.available and s.reason == "not a CUDA device"
    s.start(time.perf_counter_ns())
    s.stop()
    assert s.samples is None
