"""The clocks of timed regions: CUDA events on a GPU, the host clock elsewhere.

Both give a region its start and end marks (`mark()`), set the run's time origin (`start()`: the one host sync
before the measured work on a GPU), and turn closed records into rows (`rows()`). On a GPU the events are taken
from a pool: `reserve()` creates them ahead, outside the measured work (torch creates the driver event lazily at
its first record, and creating one costs far more host time than recording one), and `rows()` returns resolved
events to the pool. The CUDA clock's origin event also places the marks of replayed CUDA graphs on the run's clock
(`origin_event`, see graph.GraphTimer).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvscope.profiler.scope import RegionRecord, row
from kvscope.schema import CUDA_CLOCK, HOST_CLOCK, NS_PER_MS


class Clock:
    """What a clock offers the instrument; `CudaClock` and `HostClock` fill it in."""

    name = ""

    def __init__(self) -> None:
        self.origin_event: Any = None  # the device origin, a CUDA event recorded by start() (None on the host)
        self.origin_host_ns = 0  # perf_counter_ns at start(); 0 before

    @property
    def started(self) -> bool:
        return self.origin_host_ns != 0

    def start(self) -> None:
        """Set the run's time origin: start offsets are measured from here."""
        raise NotImplementedError

    def reserve(self, regions: int) -> None:
        """Make the marks of `regions` timed regions ahead (nothing to make on the host clock)."""

    def mark(self) -> Any:
        """A mark of this instant, for a region's start or end."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until every mark made so far can be read (nothing to wait for on the host clock)."""

    def rows(self, records: list[RegionRecord]) -> list[dict[str, Any]]:
        """The closed `records` as rows (see scope.row), after `sync()`."""
        raise NotImplementedError


class HostClock(Clock):
    """`time.perf_counter_ns` around each region (a CPU device)."""

    name = HOST_CLOCK

    def start(self) -> None:
        self.origin_host_ns = time.perf_counter_ns()

    def mark(self) -> int:
        return time.perf_counter_ns()

    def rows(self, records: list[RegionRecord]) -> list[dict[str, Any]]:
        base = self.origin_host_ns
        return [row(r, r.rep, r.phase, r.step, (r.start - base) / NS_PER_MS, (r.end - r.start) / NS_PER_MS,
                    (r.host_exit_ns - r.host_enter_ns) / NS_PER_MS, HOST_CLOCK) for r in records]


class CudaClock(Clock):
    """CUDA timing events on the current stream of `device`, from a pool created ahead."""

    name = CUDA_CLOCK

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._pool: list[torch.cuda.Event] = []  # created ahead (reserve) or returned by rows()

    def start(self) -> None:
        torch.cuda.synchronize(self.device)  # named sync: before the measured region, aligns host and device
        self.origin_event = torch.cuda.Event(enable_timing=True)
        self.origin_event.record()
        self.origin_host_ns = time.perf_counter_ns()

    def reserve(self, regions: int) -> None:
        """Create the events of `regions` timed regions now; each new event is recorded once here, which creates
        its driver event."""
        missing = max(0, 2 * regions - len(self._pool))
        fresh = [torch.cuda.Event(enable_timing=True) for _ in range(missing)]
        for ev in fresh:
            ev.record()  # creates the driver event now
        self._pool.extend(fresh)

    def mark(self) -> torch.cuda.Event:
        ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        ev.record()  # a pooled event (reserve() created its driver event); a new one is created here, slower
        return ev

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)  # named sync: resolves the events, after the measured region

    def rows(self, records: list[RegionRecord]) -> list[dict[str, Any]]:
        out = []
        origin = self.origin_event
        for r in records:
            out.append(row(r, r.rep, r.phase, r.step, origin.elapsed_time(r.start), r.start.elapsed_time(r.end),
                           (r.host_exit_ns - r.host_enter_ns) / NS_PER_MS, CUDA_CLOCK))
            self._pool += (r.start, r.end)  # resolved: reusable
        return out


def clock_for(device: torch.device) -> Clock:
    """CUDA events on a CUDA device, the host clock elsewhere."""
    return CudaClock(device) if device.type == "cuda" else HostClock()
