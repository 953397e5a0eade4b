from __future__ import annotations

import dataclasses

import pytest
import torch
from fakes import FakeEvent

from kvscope.errors import KvscopeError
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.nvtx import NvtxRanges, nvtx_enabled_by_env
from kvscope.profiler.scope import OUTSIDE, Scope


def test_off_returns_shared_null_and_records_nothing() -> None:
    ins = Instrument("none", "cpu", nvtx=False)
    a, b = ins.region("x", "op"), ins.region("y", "phase")
    assert a is b
    with a:
        pass
    ins.start_clock()
    assert ins.collect() == []


def test_levels_follow_granularity() -> None:
    ins = Instrument("layer", "cpu", nvtx=False)
    ins.start_clock()
    with (ins.region("decode step 3", "step", phase="decode", step=3), ins.region("L00", "layer", layer=0),
          ins.region("L00.qkv", "op", layer=0, op="qkv")):
        pass
    rows = ins.collect()
    assert [r["name"] for r in rows] == ["L00", "decode step 3"]  # exit order; op not timed at layer
    assert rows[0]["step"] == 3 and rows[0]["phase"] == "decode"  # inherited from the enclosing step


def test_region_closes_on_error_and_restores_keys() -> None:
    ins = Instrument("phase", "cpu", nvtx=False)
    ins.start_clock()
    with pytest.raises(ValueError), ins.region("prefill", "phase", phase="prefill", step=0):
        raise ValueError("boom")
    assert ins.scope is OUTSIDE and len(ins._scopes) == 0
    assert [r["name"] for r in ins.collect()] == ["prefill"]


def test_decorator_use() -> None:
    ins = Instrument("op", "cpu", nvtx=False)

    @ins.region("lm_head", "layer")
    def head(x: int) -> int:
        return x + 1

    ins.start_clock()
    assert head(1) == 2 and head(2) == 3
    rows = ins.collect()
    assert [r["name"] for r in rows] == ["lm_head", "lm_head"]
    assert all(r["dur_ms"] >= 0 and r["clock"] == "host" for r in rows)


def test_paused_regions_record_nothing() -> None:
    ins = Instrument("op", "cpu", nvtx=False)
    ins.start_clock()
    with ins.paused(), ins.region("x", "op"):
        pass
    assert ins.collect() == []


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSCOPE_NVTX", "0")
    assert not nvtx_enabled_by_env()
    assert not Instrument("phase", "cpu").nvtx_requested
    monkeypatch.setenv("KVSCOPE_NVTX", "1")
    assert nvtx_enabled_by_env()


def test_unknown_granularity() -> None:
    with pytest.raises(KvscopeError, match="unknown granularity 'kernel'"):
        Instrument("kernel", torch.device("cpu"))


class _FakeDomain:
    """Stands in for an NVTX domain with a tool attached: records what the instrument sends."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.made: list[dict] = []

    def get_event_attributes(self, message: str, color: int, category: str, payload: int | None) -> dict:
        attrs = {"message": message, "color": color, "category": category, "payload": payload}
        self.made.append(attrs)
        return attrs

    def push_range(self, attrs: dict) -> None:
        self.events.append(("push", attrs["message"]))

    def pop_range(self) -> None:
        self.events.append(("pop",))


def test_nvtx_ranges_nest_close_on_error_and_reuse_attributes() -> None:
    ins = Instrument("none", "cpu", nvtx=False)
    fake = _FakeDomain()
    ins._nvtx = NvtxRanges(fake)  # as if nsys were attached
    for step in (1, 2):
        with (pytest.raises(RuntimeError), ins.region(f"decode step {step}", "step", phase="decode", step=step),
              ins.region_with("L00", "layer", {"layer": 0})):
            raise RuntimeError("boom")
    assert fake.events == [("push", "decode step 1"), ("push", "L00"), ("pop",), ("pop",),
                           ("push", "decode step 2"), ("push", "L00"), ("pop",), ("pop",)]
    step_attrs = [a for a in fake.made if a["message"].startswith("decode step")]
    assert [(a["category"], a["payload"]) for a in step_attrs] == [("decode", 1), ("decode", 2)]
    assert len([a for a in fake.made if a["message"] == "L00"]) == 1  # registered once, then reused
    with ins.region("prefill", "phase", phase="prefill", step=0), ins.region_with("L00", "layer", {"layer": 0}):
        pass
    assert [a["category"] for a in fake.made if a["message"] == "L00"] == ["decode", "prefill"]
    assert ins.collect() == []  # granularity none: nothing timed


def test_graph_event_records_resolve_with_the_step_they_ran_in() -> None:
    from kvscope.profiler.instrument import GraphTimer, RegionRecord

    ins = Instrument("layer", "cpu", nvtx=False)
    ins.start_clock()
    ins._clock.origin_event = FakeEvent(0.0)  # the run's origin on the device clock
    timer = GraphTimer()
    timer.marks = [RegionRecord("L00", "layer", None, None, None, 0, None, None, None, 0,
                                start=FakeEvent(1.0), end=FakeEvent(1.5)),
                   RegionRecord("L01", "layer", None, None, None, 1, None, None, None, 0,
                                start=FakeEvent(1.5), end=FakeEvent(2.25))]
    with ins.region("rep 0", "rep", rep=0), ins.region("decode step 3", "step", phase="decode", step=3):
        ins.replayed(timer)
    ins.before_replay(timer)  # the graph is about to run again: its events are read now
    assert timer.marks[-1].end.synced == 1
    ins.before_replay(timer)  # nothing pending any more: no second read
    assert timer.marks[-1].end.synced == 1
    with ins.paused():
        ins.replayed(timer)  # warm-up replays leave nothing to read
    rows = [r for r in ins.collect() if r["level"] == "layer"]
    assert [(r["name"], r["layer"], r["rep"], r["phase"], r["step"], r["start_ms"], r["dur_ms"]) for r in rows] == [
        ("L00", 0, 0, "decode", 3, 1.0, 0.5), ("L01", 1, 0, "decode", 3, 1.5, 0.75)]
    assert set(rows[0]) == {"name", "level", "rep", "phase", "step", "layer", "op", "tokens", "context_len",
                            "start_ms", "dur_ms", "host_enqueue_ms", "clock"}


def test_regions_inside_graph_capture_become_marks_even_while_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine captures its decode graph during warm-up (regions paused); timed regions must still become
    event-record nodes, and the untimed ones (op regions at layer granularity) nothing."""
    import kvscope.profiler.graph as graph

    monkeypatch.setattr(graph, "_graph_event", lambda: FakeEvent(0.0))
    ins = Instrument("layer", "cpu", nvtx=False)
    with ins.paused(), ins.capturing() as timer:
        with ins.region_with("L00", "layer", {"layer": 0}), ins.region_with("L00.qkv", "op", {"layer": 0, "op": "qkv"}):
            pass
        with ins.region_with("L01", "layer", {"layer": 1}):
            pass
    assert [(m.name, m.layer) for m in timer.marks] == [("L00", 0), ("L01", 1)]
    assert all(m.start is not None and m.end is not None for m in timer.marks)
    assert ins._records == [] and len(ins._scopes) == 0


def test_chained_regions_share_the_boundary_event_inside_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-to-back siblings (`chain`) reuse the previous sibling's end event as their start: about one event node
    per region instead of two. A region of another level in between breaks the chain."""
    import itertools

    import kvscope.profiler.graph as graph

    clock = itertools.count()
    monkeypatch.setattr(graph, "_graph_event", lambda: FakeEvent(float(next(clock))))
    ins = Instrument("op", "cpu", nvtx=False)
    with ins.capturing() as timer:
        with ins.region("embed", "layer"):
            pass
        for i in range(2):
            with ins.region_with(f"L{i}", "layer", {"layer": i, "chain": True}):
                for op in ("norm", "qkv"):
                    with ins.region_with(f"L{i}.{op}", "op", {"layer": i, "op": op, "chain": True}):
                        pass
    m = {r.name: r for r in timer.marks}
    assert m["L0"].start is m["embed"].end and m["L1"].start is m["L0"].end
    assert m["L0.qkv"].start is m["L0.norm"].end
    assert m["L1.norm"].start is not m["L0.qkv"].end  # the layer boundary in between breaks the op chain
    assert next(clock) == 2 + 2 * (1 + 3)  # embed 2; per layer: its end, and norm start, norm end, qkv end


# ---- the split modules: scope, clock, nvtx, graph -----------------------------------------------------------------
def test_scope_is_immutable_and_pushed_and_popped() -> None:
    from kvscope.profiler.scope import ScopeStack

    stack = ScopeStack()
    assert stack.current is OUTSIDE and len(stack) == 0
    rep = OUTSIDE.entered({"rep": 2, "layer": 5})
    assert rep == Scope(rep=2)  # only rep, phase and step make a scope
    step = rep.entered({"phase": "decode", "step": 7})
    assert step == Scope(2, "decode", 7) and rep == Scope(rep=2)  # the outer scope is unchanged
    assert step.entered({"step": None}) == Scope(2, "decode", None)  # a key given as None is given
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.rep = 3  # type: ignore[misc]
    stack.push(rep)
    stack.push(step)
    assert stack.current is step and len(stack) == 2
    stack.pop()
    assert stack.current is rep
    stack.pop()
    assert stack.current is OUTSIDE
    with pytest.raises(RuntimeError, match="without a pushed scope"):
        stack.pop()


def test_nested_regions_restore_the_scope_on_exceptions() -> None:
    ins = Instrument("layer", "cpu", nvtx=False)
    ins.start_clock()
    with ins.region("rep 1", "rep", rep=1):
        assert ins.scope == Scope(rep=1)
        for step in (1, 2):
            with pytest.raises(KeyError), ins.region("decode", "phase", phase="decode"), \
                        ins.region(f"decode step {step}", "step", phase="decode", step=step):
                assert ins.scope == Scope(1, "decode", step)
                with ins.region_with("L00", "layer", {"layer": 0}):
                    assert ins.scope == Scope(1, "decode", step)  # a layer opens no scope
                    raise KeyError("boom")
            assert ins.scope == Scope(rep=1) and ins._step_anchors == []
    assert ins.scope is OUTSIDE and len(ins._scopes) == 0
    rows = ins.collect()
    assert [(r["name"], r["rep"], r["phase"], r["step"]) for r in rows if r["level"] in ("layer", "step")] == [
        ("L00", 1, "decode", 1), ("decode step 1", 1, "decode", 1),
        ("L00", 1, "decode", 2), ("decode step 2", 1, "decode", 2)]


def test_switched_off_regions_are_the_shared_null_region() -> None:
    from kvscope.profiler.instrument import _NULL

    ins = Instrument("phase", "cpu", nvtx=False)
    assert ins.region("L00", "layer") is _NULL and ins.region_with("L00.qkv", "op", {"op": "qkv"}) is _NULL
    assert ins.region("prefill", "phase", phase="prefill") is not _NULL
    with ins.region("L00", "layer", rep=4):  # a null region opens no scope
        assert ins.scope is OUTSIDE
    ins._nvtx = NvtxRanges(_FakeDomain())  # traced: a range even where nothing is timed
    assert ins.region("L00", "layer") is not _NULL


def test_a_failed_mark_leaves_nothing_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A region whose start or end mark fails raises, and leaves no scope, NVTX range or step anchor behind."""
    ins = Instrument("phase", "cpu", nvtx=False)
    fake = _FakeDomain()
    ins._nvtx = NvtxRanges(fake)
    ins.start_clock()

    def fail() -> int:
        raise OSError("no clock")

    monkeypatch.setattr(ins._clock, "mark", fail)
    with pytest.raises(OSError, match="no clock"), ins.region("decode step 1", "step", phase="decode", step=1):
        pass
    assert ins.scope is OUTSIDE and ins._step_anchors == [] and fake.events == [("push", "decode step 1"), ("pop",)]
    marks = iter([1, 2])
    monkeypatch.setattr(ins._clock, "mark", lambda: next(marks))  # the start mark works, the end mark fails
    with pytest.raises(StopIteration), ins.region("decode step 2", "step", phase="decode", step=2):
        next(marks)
    assert ins.scope is OUTSIDE and ins._step_anchors == [] and fake.events[-1] == ("pop",)
    assert ins.collect() == []


def test_host_clock_rows_and_collect_before_start() -> None:
    from kvscope.profiler.clock import HostClock, clock_for

    ins = Instrument("phase", "cpu", nvtx=False)
    assert isinstance(ins._clock, HostClock) and ins.clock == "host" and isinstance(clock_for(torch.device("cpu")),
                                                                                    HostClock)
    with ins.region("prefill", "phase", phase="prefill"):
        pass
    with pytest.raises(RuntimeError, match=r"collect\(\) before start_clock\(\)"):
        ins.collect()
    ins.reserve(8)  # nothing to make on the host clock
    ins.start_clock()
    with ins.region("prefill", "phase", phase="prefill", step=0):
        pass
    (row,) = [r for r in ins.collect() if r["step"] == 0]
    assert row["clock"] == "host" and row["start_ms"] >= 0 and row["dur_ms"] >= 0 and row["host_enqueue_ms"] >= 0
    assert ins.origin_host_ns > 0


def test_timed_levels_and_graph_marks_bound() -> None:
    from kvscope.schema import LEVELS, NAMED_LAYERS, OPS

    assert Instrument("op", "cpu", nvtx=False).timed_levels() == frozenset(LEVELS)
    assert Instrument("layer", "cpu", nvtx=False).timed_levels() == frozenset(LEVELS) - {"op"}
    assert Instrument("phase", "cpu", nvtx=False).timed_levels() == {"run", "rep", "phase", "step"}
    assert Instrument("none", "cpu", nvtx=False).timed_levels() == frozenset()
    assert not Instrument("op", "cpu", nvtx=False).graph_timed()  # marks in a graph need the CUDA clock
    assert Instrument.graph_marks_bound(4) == Instrument.graph_marks_bound(4, len(OPS)) == 2 * (
        len(NAMED_LAYERS) + 4 * (1 + len(OPS)))


def test_graph_with_timestamps_needs_a_timed_step_and_int64_slots() -> None:
    from kvscope.profiler.graph import GraphTimer

    with pytest.raises(ValueError, match="stamps must be int64"):
        GraphTimer(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int64 twin"):
        GraphTimer(torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    ins = Instrument("layer", "cpu", nvtx=False)
    timer = GraphTimer(torch.zeros(4, dtype=torch.int64))
    timer.marks = [object()]  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="outside a timed step region"):
        ins.replayed(timer)
    assert ins._graphs.pending == {}
    assert ins.take_stamp() is None  # no capture
