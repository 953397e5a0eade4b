"""Timed regions inside a captured CUDA graph: marks recorded into the graph, read back after its replays.

A region entered while `Instrument.capturing()` is on gets no NVTX range and no host-side state; its start and end
become marks of the graph, and every replay records them again. One interface (`GraphTimer`) hides the two kinds of
mark:

- event-record nodes (`torch.cuda.Event(external=True)`, about 3 µs of GPU time each on an H100, derived from step
  times in docs/benchmarks.md);
- with a timestamp buffer (`stamps`), slots of it that a kernel fills with the GPU's global timer (ns): the engine's
  RMSNorm kernel fills the pending slot of a region marked `stamped` (`take_stamp()`), and a one-thread
  kvscope_stamp kernel fills any other. The graph's last node copies the slots into page-locked host memory.

Siblings marked `chain` (back-to-back, no GPU work between one's exit and the next one's entry) share their boundary
mark; a mark requested while another is pending (no GPU work since) shares its slot.

After a replay (`GraphReadback.replayed`) its marks are read just before the same graph's next replay
(`before_replay`: one named sync on that replay's end) or by `collect()`, into rows whose `clock` is `cuda-graph`.
Timestamps are placed on the run's clock by taking the graph's first timestamp as the time of the start event of the
step region the replay ran in (its `anchor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvscope.kernels import stamp as k_stamp
from kvscope.kernels.launch import memcpy_d2h_async
from kvscope.profiler.scope import RegionRecord, Scope, row
from kvscope.schema import GRAPH_CLOCK, NS_PER_MS

# what one replay left, as read before the next one: (start ms on the run's clock, duration ms) per region from event
# nodes, or the timestamps (ns) copied to the host
Reading = list[tuple[float, float]] | torch.Tensor


class GraphTimer:
    """The timed regions of one captured CUDA graph, in capture order, each with its start and end marks
    (`RegionRecord.start` / `.end`): event-record nodes, or indices into `stamps`, the graph's timestamp buffer.
    Every replay records the same events, or writes the same slots, again."""

    def __init__(self, stamps: torch.Tensor | None = None, host: torch.Tensor | None = None) -> None:
        if stamps is not None and (stamps.dtype != torch.int64 or stamps.dim() != 1):
            raise ValueError(f"capturing: stamps must be int64 (n,), got {stamps.dtype} {tuple(stamps.shape)}")
        if host is not None and (stamps is None or host.shape != stamps.shape or host.dtype != torch.int64):
            raise ValueError(f"capturing: host {tuple(host.shape)} must be an int64 twin of stamps")
        self.marks: list[RegionRecord] = []
        self.last_end: dict[str, Any] = {}  # level -> end mark of the region of that level that closed last
        self.stamps = stamps  # int64 (n,) on the device, or None (event-record nodes)
        self.used = 0  # slots handed out
        self.pending: int | None = None  # a slot handed out whose timestamp no kernel has written yet
        self.done: Any = None  # with stamps: an event recorded after each replay (created at the first)
        self.host = host  # with stamps on a GPU: the page-locked buffer the graph copies the slots into

    # ---- capture ----------------------------------------------------------------------------------------------
    def mark(self, defer: bool) -> Any:
        """A new mark at this point of the capture: an event-record node, or a timestamp slot, written now unless
        `defer` (then by the next stamping kernel, or by the next mark request that cannot wait)."""
        if self.stamps is None:
            return _graph_event()
        if self.pending is None:
            if self.used >= self.stamps.numel():
                raise RuntimeError(f"graph timestamp buffer of {self.stamps.numel()} slots is full")
            self.pending, self.used = self.used, self.used + 1
        slot = self.pending  # a pending slot means no GPU work since it was handed out: share it
        if not defer:
            self.flush()
        return slot

    def flush(self) -> None:
        """Write the pending slot's timestamp with a one-thread kernel."""
        if self.pending is not None:
            k_stamp.stamp(self.stamps[self.pending:self.pending + 1])
            self.pending = None

    def take_stamp(self) -> torch.Tensor | None:
        """The pending timestamp slot (one int64 on the device) for the kernel about to run, or None."""
        if self.pending is None:
            return None
        slot, self.pending = self.pending, None
        return self.stamps[slot:slot + 1]

    def open_region(self, name: str, level: str, keys: dict[str, Any]) -> RegionRecord:
        """A timed region entered during the capture: its record, with its start mark."""
        # a region that follows its sibling with no GPU work between (`chain` key, set by the engine for its
        # back-to-back layer and op regions) starts at the sibling's end mark: half the marks
        start = self.last_end.get(level) if keys.get("chain") else None
        stamped = bool(keys.get("stamped"))
        if start is None:
            start = self.mark(defer=stamped)
        elif start == self.pending and not stamped:
            self.flush()  # this region's first GPU work is not a stamping kernel: write the timestamp now
        return RegionRecord(name, level, None, None, None, keys.get("layer"), keys.get("op"), keys.get("tokens"),
                            keys.get("context_len"), 0, start=start)

    def close_region(self, rec: RegionRecord, chain: bool) -> None:
        """The region of `rec` left during the capture: its end mark."""
        # a chained region's end waits for the next mark request: that is its sibling's start (see chain)
        rec.end = self.mark(defer=chain)
        self.marks.append(rec)
        self.last_end = {rec.level: rec.end}  # work of another level breaks the chain

    def finish_capture(self) -> None:
        """The capture's last nodes: the pending timestamp, and the copy of the timestamps into host memory."""
        if self.pending is not None:
            self.flush()
        if self.host is not None:
            memcpy_d2h_async(self.host, self.stamps)

    # ---- replays ----------------------------------------------------------------------------------------------
    def after_replay(self, anchor: RegionRecord | None) -> None:
        """The graph was just replayed inside the timed step region `anchor` (None: no timed step region)."""
        if self.stamps is None:
            return
        if anchor is None:
            raise RuntimeError("a graph with timestamps was replayed outside a timed step region")
        if self.done is None:
            self.done = torch.cuda.Event()
        self.done.record()

    def wait_replay(self) -> None:
        """Named sync: the end of this graph's last replay (its last event node, or the event after it)."""
        if self.stamps is None:
            self.marks[-1].end.synchronize()
        else:
            self.done.synchronize()

    def read(self, origin: Any, device_synced: bool) -> Reading:
        """What the last replay left, read before the next one writes it again: with events, each region's
        (start ms from `origin`, duration ms); with timestamps, a host copy of the slots (ns), from the page-locked
        twin, or from the device after a device-wide sync."""
        if self.stamps is None:
            return [(origin.elapsed_time(r.start), r.start.elapsed_time(r.end)) for r in self.marks]
        if device_synced:
            return self.stamps[:self.used].cpu()
        return self.host[:self.used].clone()

    def rows(self, reading: Reading, scope: Scope, anchor: RegionRecord | None, origin: Any) -> list[dict[str, Any]]:
        """Rows of one replay from what `read` returned (events), or placed on the run's clock by the graph's first
        timestamp, taken as the time of the anchor's start event (timestamps)."""
        if self.stamps is None:
            times = reading
        else:
            ns = reading.tolist()
            first = min(ns[r.start] for r in self.marks)
            anchor_ms = origin.elapsed_time(anchor.start)
            times = [(anchor_ms + (ns[r.start] - first) / NS_PER_MS, (ns[r.end] - ns[r.start]) / NS_PER_MS)
                     for r in self.marks]
        return [row(r, scope.rep, scope.phase, scope.step, start_ms, dur_ms, math.nan, GRAPH_CLOCK)
                for r, (start_ms, dur_ms) in zip(self.marks, times, strict=True)]


def _graph_event() -> torch.cuda.Event:
    """A timing event recorded as an event-record node of the graph under capture (`external=True`)."""
    ev = torch.cuda.Event(enable_timing=True, external=True)
    ev.record()
    return ev


@dataclass(slots=True)
class Replay:
    """One replay of a graph with marks: the scope it ran in and its timed step region (the anchor of its
    timestamps)."""

    scope: Scope
    anchor: RegionRecord | None


class GraphReadback:
    """Replays whose marks are not read yet (`pending`, by graph), and readings whose rows are not built yet."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[GraphTimer, Replay]] = {}
        self._readings: list[tuple[GraphTimer, Replay, Reading]] = []

    def replayed(self, timer: GraphTimer, scope: Scope, anchor: RegionRecord | None) -> None:
        timer.after_replay(anchor)
        self.pending[id(timer)] = (timer, Replay(scope, anchor))

    def before_replay(self, timer: GraphTimer, origin: Any) -> None:
        """Read the marks of this graph's previous replay (one named sync on its end) before they are written
        again; rows are built in `rows()`, after the measured work."""
        entry = self.pending.pop(id(timer), None)
        if entry is not None:
            timer.wait_replay()
            self._readings.append((timer, entry[1], timer.read(origin, device_synced=False)))

    def rows(self, origin: Any) -> list[dict[str, Any]]:
        """Rows of every replay read so far and of those still pending, in replay order; call it after a
        device-wide sync."""
        for timer, replay in self.pending.values():
            self._readings.append((timer, replay, timer.read(origin, device_synced=True)))
        self.pending.clear()
        out: list[dict[str, Any]] = []
        for timer, replay, reading in self._readings:
            out += timer.rows(reading, replay.scope, replay.anchor, origin)
        self._readings.clear()
        return out
