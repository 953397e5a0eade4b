"""One region API for both clocks: a CUDA event pair (or host clock on a CPU device) and an NVTX range of one name.

    ins = Instrument(granularity="layer", device=torch.device("cuda"))
    with ins.region("prefill", "phase", phase="prefill", tokens=b * s):
        ...
    records = ins.collect()  # resolves the events: one synchronize, after the measured work

Levels: `run`, `rep`, `phase`, `step` are timed from granularity `phase` on, `layer` from `layer`, `op` at `op`.
NVTX ranges (domain `kvscope`, registered strings, one category per phase, the step as payload) are emitted for
every level while NVTX is on; they cost nothing unless a tool such as Nsight Systems is attached. With granularity
`none` and NVTX off, `region()` returns one shared null context: no allocation, no call into CUDA or NVTX.
Ranges close and events are recorded in `__exit__`, so they close on errors too.

Inside a CUDA-graph capture (`capturing()`), a timed region gets no NVTX range; its start and end become marks in
the graph, read after a replay (`before_replay` / `collect`) into rows whose `clock` is `cuda-graph`. A mark is either
an event-record node (`torch.cuda.Event(external=True)`, about 3 µs of GPU time each on an H100, derived from step
times in docs/benchmarks.md), or, when `capturing()` is given a timestamp buffer, a slot of that buffer that a kernel
fills with the GPU's global timer: the engine's RMSNorm kernel fills the pending slot of a region marked `stamped`
(`take_stamp()`), and a one-thread kvscope_stamp kernel fills any other. Siblings marked `chain` (back-to-back,
no GPU work between one's exit and the next one's entry) share their boundary mark; a mark requested while
another is pending (no GPU work since) shares its slot.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvscope.errors import KvscopeError
from kvscope.kernels import ops as kops
from kvscope.kernels.launch import memcpy_d2h_async

GRANULARITIES = ("none", "phase", "layer", "op")
LEVELS = ("run", "rep", "phase", "step", "layer", "op")
# the granularity from which a level gets a timer
_TIMED_FROM = {"run": 1, "rep": 1, "phase": 1, "step": 1, "layer": 2, "op": 3}
_GRANULARITY_RANK = {g: i for i, g in enumerate(GRANULARITIES)}
NVTX_DOMAIN = "kvscope"
# `clock` of regions timed by event-record nodes inside a CUDA graph (no NVTX range, no host enqueue time)
GRAPH_CLOCK = "cuda-graph"
NVTX_ENV = "KVSCOPE_NVTX"
_COLORS = {"run": 0x4C72B0, "rep": 0x8172B2, "prefill": 0xC44E52, "decode": 0x55A868, "layer": 0xCCB974,
           "op": 0x64B5CD}


def nvtx_enabled_by_env() -> bool:
    """`KVSCOPE_NVTX=0` (or `false`, `off`, `no`) switches NVTX ranges off."""
    return os.environ.get(NVTX_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass
class RegionRecord:
    """One timed region, before its events are resolved."""

    name: str
    level: str
    rep: int | None
    phase: str | None
    step: int | None
    layer: int | None
    op: str | None
    tokens: int | None
    context_len: int | None
    host_enter_ns: int
    host_exit_ns: int = 0
    start: Any = None  # torch.cuda.Event, or perf_counter_ns on the host clock
    end: Any = None


class _NullRegion:
    """What `region()` returns where a level is neither timed nor traced: does nothing, as `with` or decorator."""

    __slots__ = ()

    def __enter__(self) -> _NullRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, fn: Callable) -> Callable:
        return fn


_NULL = _NullRegion()


class _Region:
    __slots__ = ("_captured", "_ins", "_keys", "_level", "_live", "_name", "_rec", "_timed")

    def __init__(self, ins: Instrument, name: str, level: str, timed: bool, keys: dict[str, Any]) -> None:
        self._ins = ins
        self._name = name
        self._level = level
        self._timed = timed
        self._keys = keys
        self._rec: RegionRecord | None = None
        self._live = False
        self._captured = False

    def __call__(self, fn: Callable) -> Callable:
        """Decorator use: a fresh region around every call."""
        ins, name, level, timed, keys = self._ins, self._name, self._level, self._timed, self._keys

        @functools.wraps(fn)
        def inner(*a: Any, **kw: Any) -> Any:
            with _Region(ins, name, level, timed, keys):
                return fn(*a, **kw)

        return inner

    def __enter__(self) -> _Region:
        ins = self._ins
        if ins._capture is not None:  # inside CUDA-graph capture: a mark of the graph, no NVTX, no host state
            # (captured even while paused: the graph is captured during warm-up and replayed when measuring)
            self._live = True
            keys = self._keys
            self._captured = True
            if self._timed:
                cap = ins._capture
                # a region that follows its sibling with no GPU work between (`chain` key, set by the engine for
                # its back-to-back layer and op regions) starts at the sibling's end mark: half the marks
                start = cap.last_end.get(self._level) if keys.get("chain") else None
                stamped = bool(keys.get("stamped"))
                if start is None:
                    start = cap.mark(defer=stamped)
                elif start == cap.pending and not stamped:
                    cap.flush()  # this region's first GPU work is not a stamping kernel: write the timestamp now
                self._rec = RegionRecord(self._name, self._level, None, None, None, keys.get("layer"), keys.get("op"),
                                         keys.get("tokens"), keys.get("context_len"), 0, start=start)
            return self
        if ins._paused:
            return self
        self._live = True
        keys = self._keys
        if self._level == "step":
            ins._open_steps.append(None)
        for attr in ("phase", "step", "rep"):
            if attr in keys:
                ins._stack.append((attr, getattr(ins, "_" + attr)))
                setattr(ins, "_" + attr, keys[attr])
        if ins._domain is not None:
            ins._domain.push_range(ins._attributes(self._name, self._level, keys.get("step")))
        if self._timed:
            rec = RegionRecord(self._name, self._level, ins._rep, ins._phase, ins._step, keys.get("layer"),
                               keys.get("op"), keys.get("tokens"), keys.get("context_len"), time.perf_counter_ns())
            rec.start = ins._clock_mark()
            self._rec = rec
            if self._level == "step":
                ins._open_steps[-1] = rec
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._live:
            return
        self._live = False
        ins = self._ins
        if self._captured:
            self._captured = False
            cap = ins._capture
            if self._rec is not None and cap is not None:
                # a chained region's end waits for the next mark request: that is its sibling's start (see chain)
                self._rec.end = cap.mark(defer=bool(self._keys.get("chain")))
                cap.marks.append(self._rec)
                cap.last_end = {self._level: self._rec.end}  # work of another level breaks the chain
            self._rec = None
            return
        try:
            if self._rec is not None:
                rec = self._rec
                rec.end = ins._clock_mark()
                rec.host_exit_ns = time.perf_counter_ns()
                ins._records.append(rec)
                self._rec = None
        finally:
            if self._level == "step":
                ins._open_steps.pop()
            if ins._domain is not None:
                ins._domain.pop_range()
            for attr in ("rep", "step", "phase"):
                if attr in self._keys:
                    name, value = ins._stack.pop()
                    setattr(ins, "_" + name, value)


class Instrument:
    """Regions of one run. `collect()` resolves what was recorded and returns it as plain dicts."""

    def __init__(self, granularity: str = "phase", device: torch.device | str = "cpu", nvtx: bool | None = None
                 ) -> None:
        if granularity not in GRANULARITIES:
            raise KvscopeError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        self.device = torch.device(device)
        self.clock = "cuda" if self.device.type == "cuda" else "host"
        rank = _GRANULARITY_RANK[granularity]
        self._timed_levels = {lvl: rank >= need for lvl, need in _TIMED_FROM.items()}
        want_nvtx = nvtx_enabled_by_env() if nvtx is None else nvtx
        self.nvtx_requested = want_nvtx
        self._domain = _nvtx_domain() if want_nvtx else None
        self._paused = False
        self._records: list[RegionRecord] = []
        self._attr_cache: dict[tuple[str, int | None, str | None], Any] = {}
        self._event_pool: list[torch.cuda.Event] = []  # created ahead (reserve) or returned by collect
        self._phase: str | None = None
        self._step: int | None = None
        self._rep: int | None = None
        self._stack: list[tuple[str, Any]] = []
        self._base: Any = None
        self._base_host_ns = 0
        self._capture: GraphTimer | None = None
        self._pending: dict[int, tuple[GraphTimer, dict[str, Any]]] = {}  # replayed, marks not yet read
        self._open_steps: list[RegionRecord | None] = []  # timed step regions being entered (anchor graph stamps)
        # timestamps read from replays, rows not built yet (collect() builds them)
        self._stamped: list[tuple[GraphTimer, dict[str, Any], torch.Tensor]] = []
        self._resolved: list[dict[str, Any]] = []

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def nvtx_active(self) -> bool:
        """NVTX ranges are being emitted (requested, and a tool such as nsys is attached)."""
        return self._domain is not None

    @property
    def timing(self) -> bool:
        return self.granularity != "none"

    def active(self, level: str) -> bool:
        """Whether a region of this level does anything (timer or NVTX range)."""
        return not self._paused and (self._timed_levels[level] or self._domain is not None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Regions inside do nothing (warm-up)."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    def graph_timed(self) -> bool:
        """Whether a captured decode step should carry marks (timestamps or event nodes): layer or op regions are
        timed."""
        return self.clock == "cuda" and self._timed_levels["layer"]

    @staticmethod
    def graph_marks_bound(n_layers: int, n_ops: int) -> int:
        """Most marks a captured decode step can hold: two per region (embed, layers, ops, lm_head, sample)."""
        return 2 * (3 + n_layers * (1 + n_ops))

    @contextlib.contextmanager
    def capturing(self, stamps: torch.Tensor | None = None, host: torch.Tensor | None = None) -> Iterator[GraphTimer]:
        """Regions entered inside become marks of the CUDA graph being captured (templates in the returned
        GraphTimer): event-record nodes, or with `stamps` (int64 (n,) on the device) timestamp slots of it, copied
        by the graph's last node into `host` (its page-locked twin, allocated before the capture). NVTX and the
        host-side state are left alone. Exit it inside the capture: the last pending timestamp is written then."""
        if stamps is not None and (stamps.dtype != torch.int64 or stamps.dim() != 1):
            raise ValueError(f"capturing: stamps must be int64 (n,), got {stamps.dtype} {tuple(stamps.shape)}")
        if host is not None and (stamps is None or host.shape != stamps.shape or host.dtype != torch.int64):
            raise ValueError(f"capturing: host {tuple(host.shape)} must be an int64 twin of stamps")
        timer = GraphTimer(stamps, host)
        self._capture = timer
        try:
            yield timer
            if timer.pending is not None:
                timer.flush()
            if timer.host is not None:  # the graph's last node: its timestamps into host memory
                memcpy_d2h_async(timer.host, timer.stamps)
        finally:
            self._capture = None

    def take_stamp(self) -> torch.Tensor | None:
        """The pending timestamp slot (one int64 on the device) for the kernel about to run, or None: the engine's
        RMSNorm kernel writes it as it starts. Outside a capture with timestamps, always None."""
        cap = self._capture
        if cap is None or cap.pending is None:
            return None
        slot, cap.pending = cap.pending, None
        return cap.stamps[slot:slot + 1]

    def before_replay(self, timer: GraphTimer) -> None:
        """Read the events of this graph's previous replay before they are recorded again. The engine alternates
        two graphs, so that replay was two steps ago and the step in between keeps the GPU busy meanwhile."""
        entry = self._pending.pop(id(timer), None)
        if entry is not None:
            if timer.stamps is None:
                timer.marks[-1].end.synchronize()  # named sync: that replay's last event, two steps back
                self._resolve(*entry)
                return
            # named sync: that replay's end, two steps back; its last node copied the timestamps into `host`.
            # Rows are built in collect(), after the measured work
            timer.done.synchronize()
            self._stamped.append((timer, entry[1], timer.host[:timer.used].clone()))

    def replayed(self, timer: GraphTimer) -> None:
        """A graph with marks was just replayed inside the current step region."""
        if self._paused or not timer.marks:
            return
        anchor = self._open_steps[-1] if self._open_steps else None
        if timer.stamps is not None:
            if anchor is None:
                raise RuntimeError("a graph with timestamps was replayed outside a timed step region")
            if timer.done is None:
                timer.done = torch.cuda.Event()
            timer.done.record()
        self._pending[id(timer)] = (timer, {"rep": self._rep, "phase": self._phase, "step": self._step,
                                            "anchor": anchor})

    def _resolve(self, timer: GraphTimer, where: dict[str, Any]) -> None:
        """Rows of a graph replay timed by event-record nodes (read before the graph's next replay)."""
        rep, phase, step = where["rep"], where["phase"], where["step"]
        for r in timer.marks:
            self._resolved.append(_row(r, rep, phase, step, self._base.elapsed_time(r.start),
                                       r.start.elapsed_time(r.end), math.nan, GRAPH_CLOCK))

    def _resolve_stamps(self, timer: GraphTimer, where: dict[str, Any], stamps_ns: torch.Tensor) -> None:
        """Rows of a graph replay timed by timestamps: placed on the run's clock by their graph's first timestamp,
        taken as the time of the step's start event."""
        rep, phase, step = where["rep"], where["phase"], where["step"]
        ns = stamps_ns.tolist()
        first = min(ns[r.start] for r in timer.marks)
        anchor_ms = self._base.elapsed_time(where["anchor"].start)
        for r in timer.marks:
            self._resolved.append(_row(r, rep, phase, step, anchor_ms + (ns[r.start] - first) / 1e6,
                                       (ns[r.end] - ns[r.start]) / 1e6, math.nan, GRAPH_CLOCK))

    def start_clock(self) -> None:
        """Set the run's time origin: start offsets are measured from here (device and host clocks)."""
        if self.clock == "cuda":
            torch.cuda.synchronize(self.device)  # named sync: before the measured region, aligns host and device
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._base_host_ns = time.perf_counter_ns()

    def reserve(self, regions: int) -> None:
        """Create the CUDA events of `regions` timed regions now, outside the measured work. torch creates the
        driver event lazily at its first record, and creating one costs far more host time than recording one, so
        each new event is recorded once here."""
        if self.clock == "cuda":
            missing = max(0, 2 * regions - len(self._event_pool))
            fresh = [torch.cuda.Event(enable_timing=True) for _ in range(missing)]
            for ev in fresh:
                ev.record()  # creates the driver event now
            self._event_pool.extend(fresh)

    def timed_levels(self) -> frozenset[str]:
        return frozenset(lvl for lvl, on in self._timed_levels.items() if on)

    @property
    def origin_host_ns(self) -> int:
        return self._base_host_ns

    # ---- regions ----------------------------------------------------------------------------------------------
    def region(self, name: str, level: str = "phase", **keys: Any) -> _Region | _NullRegion:
        """A region of `level` (run, rep, phase, step, layer, op). Keys: rep, phase, step, layer, op, tokens,
        context_len; rep/phase/step are inherited by the regions nested inside. Use it with `with`, or as a
        decorator (`@ins.region("lm_head", "layer")`: a fresh region around every call)."""
        return self.region_with(name, level, keys)

    def region_with(self, name: str, level: str, keys: dict[str, Any]) -> _Region | _NullRegion:
        """`region()` with its keys as one prebuilt dict (the engine's hot loop builds them once per layer and op,
        so a region that is switched off costs one call and one lookup)."""
        timed = self._timed_levels[level]
        if not timed and self._domain is None:
            return _NULL
        return _Region(self, name, level, timed, keys)

    def _attributes(self, name: str, level: str, step: int | None) -> Any:
        key = (name, step, self._phase)
        attrs = self._attr_cache.get(key)
        if attrs is None:
            color = _COLORS.get(self._phase if level in ("phase", "step") else level, 0x999999)
            attrs = self._domain.get_event_attributes(message=name, color=color, category=self._phase or level,
                                                      payload=step)
            self._attr_cache[key] = attrs
        return attrs

    def _clock_mark(self) -> Any:
        if self.clock == "host":
            return time.perf_counter_ns()
        ev = self._event_pool.pop() if self._event_pool else torch.cuda.Event(enable_timing=True)
        ev.record()  # a pooled event (reserve() created its driver event); a new one is created here, slower
        return ev

    # ---- resolution -------------------------------------------------------------------------------------------
    def collect(self) -> list[dict[str, Any]]:
        """Resolve every closed region (one synchronize, after the measured work) and clear the list; regions still
        open (a run around several repetitions) are resolved by a later call.

        Returns dicts with the keys of RegionRecord (minus the raw clocks) plus `start_ms` (from `start_clock`),
        `dur_ms`, `host_enqueue_ms` (host time between entering and leaving the region) and `clock`."""
        if self.clock == "cuda" and (self._records or self._pending):
            torch.cuda.synchronize(self.device)  # named sync: resolves the events, after the measured region
        if self._base_host_ns == 0 and (self._records or self._pending):
            raise RuntimeError("Instrument.collect() before start_clock()")
        for timer, where in list(self._pending.values()):
            if timer.stamps is None:
                self._resolve(timer, where)
            else:
                self._stamped.append((timer, where, timer.stamps[:timer.used].cpu()))
        self._pending.clear()
        for timer, where, ns in self._stamped:
            self._resolve_stamps(timer, where, ns)
        self._stamped.clear()
        out, self._resolved = self._resolved, []
        for r in self._records:
            if self.clock == "cuda":
                start_ms = self._base.elapsed_time(r.start)
                dur_ms = r.start.elapsed_time(r.end)
            else:
                start_ms = (r.start - self._base_host_ns) / 1e6
                dur_ms = (r.end - r.start) / 1e6
            out.append(_row(r, r.rep, r.phase, r.step, start_ms, dur_ms, (r.host_exit_ns - r.host_enter_ns) / 1e6,
                            self.clock))
            if self.clock == "cuda":
                self._event_pool += (r.start, r.end)  # resolved: reusable
        self._records.clear()
        return out


def _row(r: RegionRecord, rep: int | None, phase: str | None, step: int | None, start_ms: float, dur_ms: float,
         host_enqueue_ms: float, clock: str) -> dict[str, Any]:
    """One resolved region as `collect()` returns it."""
    return {"name": r.name, "level": r.level, "rep": rep, "phase": phase, "step": step, "layer": r.layer, "op": r.op,
            "tokens": r.tokens, "context_len": r.context_len, "start_ms": start_ms, "dur_ms": dur_ms,
            "host_enqueue_ms": host_enqueue_ms, "clock": clock}


class GraphTimer:
    """The timed regions of one captured CUDA graph, in capture order, each with its start and end marks
    (`RegionRecord.start` / `.end`): event-record nodes, or indices into `stamps`, the graph's timestamp buffer.
    Every replay records the same events, or writes the same slots, again."""

    def __init__(self, stamps: torch.Tensor | None = None, host: torch.Tensor | None = None) -> None:
        self.marks: list[RegionRecord] = []
        self.last_end: dict[str, Any] = {}  # level -> end mark of the region of that level that closed last
        self.stamps = stamps  # int64 (n,) on the device, or None (event-record nodes)
        self.used = 0  # slots handed out
        self.pending: int | None = None  # a slot handed out whose timestamp no kernel has written yet
        self.done: Any = None  # with stamps: an event recorded after each replay (created at the first)
        self.host = host  # with stamps on a GPU: the page-locked buffer the graph copies the slots into

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
            kops.stamp(self.stamps[self.pending:self.pending + 1])
            self.pending = None


def _graph_event() -> torch.cuda.Event:
    """A timing event recorded as an event-record node of the graph under capture (`external=True`)."""
    ev = torch.cuda.Event(enable_timing=True, external=True)
    ev.record()
    return ev


def _nvtx_domain() -> Any:
    """The `kvscope` NVTX domain, or None when no tool is attached (nvtx then hands out a do-nothing domain)."""
    try:
        import nvtx
    except ImportError:
        return None
    domain = nvtx.get_domain(NVTX_DOMAIN)
    return None if type(domain).__name__ == "DummyDomain" else domain
