"""One region API for both clocks: a CUDA event pair (or host clock on a CPU device) and an NVTX range of one name.

    ins = Instrument(granularity="layer", device=torch.device("cuda"))
    with ins.region("prefill", "phase", phase="prefill", tokens=b * s):
        ...
    records = ins.collect()  # resolves the events: one synchronize, after the measured work

Levels: `run`, `rep`, `phase`, `step` are timed from granularity `phase` on, `layer` from `layer`, `op` at `op`.
NVTX ranges (`kvscope.profiler.nvtx`) are emitted for every level while NVTX is on; they cost nothing unless a tool
such as Nsight Systems is attached. With granularity `none` and NVTX off, `region()` returns one shared null
context: no allocation, no call into CUDA or NVTX. Ranges close and events are recorded in `__exit__`, so they close
on errors too.

The pieces behind it: `scope` (the rep, phase and step that nested regions inherit, an immutable `Scope` pushed and
popped per region), `clock` (CUDA events from a pool made ahead, or the host clock; the run's origin; resolution),
`nvtx` (the domain, registered attributes, push/pop) and `graph` (marks inside a captured CUDA graph, read back
after its replays: `capturing()`, `take_stamp()`, `before_replay()`, `replayed()`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvscope.errors import KvscopeError
from kvscope.profiler.clock import clock_for
from kvscope.profiler.graph import GraphReadback, GraphTimer
from kvscope.profiler.nvtx import nvtx_enabled_by_env, nvtx_ranges
from kvscope.profiler.scope import RegionRecord, Scope, ScopeStack
from kvscope.schema import CUDA_CLOCK, GRANULARITIES, NAMED_LAYERS, OPS

# kvscope.measure.run and the engine take these from here
__all__ = ["GRANULARITIES", "GraphTimer", "Instrument", "RegionRecord"]

# the granularity from which a level gets a timer
_TIMED_FROM = {"run": "phase", "rep": "phase", "phase": "phase", "step": "phase", "layer": "layer", "op": "op"}


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
    """A region that is timed or traced. Entering it pushes its scope (when its keys name one), its NVTX range and
    its start mark; leaving it records the end mark, then pops the range and the scope in `finally`. Inside a graph
    capture it becomes marks of the graph instead (see graph.GraphTimer)."""

    __slots__ = ("_captured", "_ins", "_keys", "_level", "_live", "_name", "_rec", "_scoped", "_timed")

    def __init__(self, ins: Instrument, name: str, level: str, timed: bool, keys: dict[str, Any]) -> None:
        self._ins = ins
        self._name = name
        self._level = level
        self._timed = timed
        self._keys = keys
        self._rec: RegionRecord | None = None
        self._live = False
        self._captured = False
        self._scoped = False

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
            self._live = self._captured = True
            if self._timed:
                self._rec = ins._capture.open_region(self._name, self._level, self._keys)
            return self
        if ins._paused:
            return self
        self._live = True
        keys = self._keys
        if self._level == "step":
            ins._step_anchors.append(None)
        scopes = ins._scopes
        if "rep" in keys or "phase" in keys or "step" in keys:  # a region naming any Scope field opens a scope
            scopes.push(scopes.current.entered(keys))
            self._scoped = True
        nvtx = ins._nvtx
        if nvtx is not None:
            try:
                nvtx.push(self._name, self._level, scopes.current.phase, keys.get("step"))
            except BaseException:
                self._leave(ins, ranged=False)  # a failed entry leaves nothing pushed: no __exit__ follows it
                raise
        if self._timed:
            scope = scopes.current
            rec = RegionRecord(self._name, self._level, scope.rep, scope.phase, scope.step, keys.get("layer"),
                               keys.get("op"), keys.get("tokens"), keys.get("context_len"), time.perf_counter_ns())
            try:
                rec.start = ins._clock.mark()
            except BaseException:
                self._leave(ins, ranged=nvtx is not None)
                raise
            self._rec = rec
            if self._level == "step":
                ins._step_anchors[-1] = rec
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._live:
            return
        ins = self._ins
        if self._captured:
            self._live = self._captured = False
            rec, self._rec = self._rec, None
            if rec is not None and ins._capture is not None:
                ins._capture.close_region(rec, chain=bool(self._keys.get("chain")))
            return
        try:
            rec = self._rec
            if rec is not None:
                self._rec = None
                rec.end = ins._clock.mark()
                rec.host_exit_ns = time.perf_counter_ns()
                ins._records.append(rec)
        finally:
            self._leave(ins, ranged=ins._nvtx is not None)

    def _leave(self, ins: Instrument, ranged: bool) -> None:
        """Pop what entering pushed: the step anchor, the NVTX range (`ranged`), the scope."""
        self._live = False
        try:
            if self._level == "step":
                ins._step_anchors.pop()
            if ranged:
                ins._nvtx.pop()
        finally:
            if self._scoped:
                self._scoped = False
                ins._scopes.pop()


class Instrument:
    """Regions of one run. `collect()` resolves what was recorded and returns it as plain dicts."""

    def __init__(self, granularity: str = "phase", device: torch.device | str = "cpu", nvtx: bool | None = None
                 ) -> None:
        if granularity not in GRANULARITIES:
            raise KvscopeError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        self.device = torch.device(device)
        self._clock = clock_for(self.device)
        self.clock = self._clock.name  # `cuda` or `host`
        rank = GRANULARITIES.index(granularity)
        self._timed_levels = {lvl: rank >= GRANULARITIES.index(g) for lvl, g in _TIMED_FROM.items()}
        self.nvtx_requested = nvtx_enabled_by_env() if nvtx is None else nvtx
        self._nvtx = nvtx_ranges(self.nvtx_requested)  # None: no NVTX call at all
        self._paused = False
        self._scopes = ScopeStack()
        self._step_anchors: list[RegionRecord | None] = []  # timed step regions being entered (anchor graph stamps)
        self._records: list[RegionRecord] = []  # closed regions, not resolved yet
        self._capture: GraphTimer | None = None  # the graph being captured
        self._graphs = GraphReadback()

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def nvtx_active(self) -> bool:
        """NVTX ranges are being emitted (requested, and a tool such as nsys is attached)."""
        return self._nvtx is not None

    @property
    def timing(self) -> bool:
        return self.granularity != "none"

    @property
    def scope(self) -> Scope:
        """The rep, phase and step of the regions being entered now."""
        return self._scopes.current

    @property
    def origin_host_ns(self) -> int:
        return self._clock.origin_host_ns

    def timed_levels(self) -> frozenset[str]:
        return frozenset(lvl for lvl, on in self._timed_levels.items() if on)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Regions inside do nothing (warm-up)."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    # ---- the clock --------------------------------------------------------------------------------------------
    def start_clock(self) -> None:
        """Set the run's time origin: start offsets are measured from here (device and host clocks)."""
        self._clock.start()

    def reserve(self, regions: int) -> None:
        """Create the CUDA events of `regions` timed regions now, outside the measured work (see clock.CudaClock)."""
        self._clock.reserve(regions)

    # ---- CUDA graphs ------------------------------------------------------------------------------------------
    def graph_timed(self) -> bool:
        """Whether a captured decode step should carry marks (timestamps or event nodes): layer or op regions are
        timed."""
        return self.clock == CUDA_CLOCK and self._timed_levels["layer"]

    @staticmethod
    def graph_marks_bound(n_layers: int, n_ops: int = len(OPS)) -> int:
        """Most marks a captured decode step can hold: two per region (the named layer-level regions, every layer
        and its ops)."""
        return 2 * (len(NAMED_LAYERS) + n_layers * (1 + n_ops))

    @contextlib.contextmanager
    def capturing(self, stamps: torch.Tensor | None = None, host: torch.Tensor | None = None) -> Iterator[GraphTimer]:
        """Regions entered inside become marks of the CUDA graph being captured (templates in the returned
        GraphTimer): event-record nodes, or with `stamps` (int64 (n,) on the device) timestamp slots of it, copied
        by the graph's last node into `host` (its page-locked twin, allocated before the capture). NVTX and the
        host-side state are left alone. Exit it inside the capture: the last pending timestamp is written then."""
        timer = GraphTimer(stamps, host)
        self._capture = timer
        try:
            yield timer
            timer.finish_capture()
        finally:
            self._capture = None

    def take_stamp(self) -> torch.Tensor | None:
        """The pending timestamp slot (one int64 on the device) for the kernel about to run, or None: the engine's
        RMSNorm kernel writes it as it starts. Outside a capture with timestamps, always None."""
        cap = self._capture
        if cap is None:
            return None
        return cap.take_stamp()

    def before_replay(self, timer: GraphTimer) -> None:
        """Read the marks of this graph's previous replay before they are recorded again. The engine alternates
        two graphs, so that replay was two steps ago and the step in between keeps the GPU busy meanwhile."""
        self._graphs.before_replay(timer, self._clock.origin_event)

    def replayed(self, timer: GraphTimer) -> None:
        """A graph with marks was just replayed inside the current step region."""
        if self._paused or not timer.marks:
            return
        anchor = self._step_anchors[-1] if self._step_anchors else None
        self._graphs.replayed(timer, self._scopes.current, anchor)

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
        if not timed and self._nvtx is None:
            return _NULL
        return _Region(self, name, level, timed, keys)

    # ---- resolution -------------------------------------------------------------------------------------------
    def collect(self) -> list[dict[str, Any]]:
        """Resolve every closed region (one synchronize, after the measured work) and clear the list; regions still
        open (a run around several repetitions) are resolved by a later call.

        Returns dicts with the keys of RegionRecord (minus the raw clocks) plus `start_ms` (from `start_clock`),
        `dur_ms`, `host_enqueue_ms` (host time between entering and leaving the region) and `clock`."""
        waiting = bool(self._records or self._graphs.pending)
        if waiting:
            self._clock.sync()
            if not self._clock.started:
                raise RuntimeError("Instrument.collect() before start_clock()")
        out = self._graphs.rows(self._clock.origin_event)
        out += self._clock.rows(self._records)
        self._records.clear()
        return out
