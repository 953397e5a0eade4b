from __future__ import annotations

import pytest
import torch

from kvscope.errors import KvscopeError
from kvscope.profiler.instrument import Instrument, nvtx_enabled_by_env


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
    assert ins._phase is None and ins._step is None and ins._stack == []
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
    ins._domain = fake  # as if nsys were attached
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


class _FakeEvent:
    """Stands in for a CUDA timing event: a time in ms, `elapsed_time` and `synchronize`."""

    def __init__(self, t_ms: float) -> None:
        self.t_ms = t_ms
        self.synced = 0

    def elapsed_time(self, other: _FakeEvent) -> float:
        return other.t_ms - self.t_ms

    def synchronize(self) -> None:
        self.synced += 1


def test_graph_event_records_resolve_with_the_step_they_ran_in() -> None:
    from kvscope.profiler.instrument import GraphTimer, RegionRecord

    ins = Instrument("layer", "cpu", nvtx=False)
    ins.start_clock()
    ins._base = _FakeEvent(0.0)  # the run's origin on the device clock
    timer = GraphTimer()
    timer.marks = [RegionRecord("L00", "layer", None, None, None, 0, None, None, None, 0,
                                start=_FakeEvent(1.0), end=_FakeEvent(1.5)),
                   RegionRecord("L01", "layer", None, None, None, 1, None, None, None, 0,
                                start=_FakeEvent(1.5), end=_FakeEvent(2.25))]
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
    import kvscope.profiler.instrument as instrument

    monkeypatch.setattr(instrument, "_graph_event", lambda: _FakeEvent(0.0))
    ins = Instrument("layer", "cpu", nvtx=False)
    with ins.paused(), ins.capturing() as timer:
        with ins.region_with("L00", "layer", {"layer": 0}), ins.region_with("L00.qkv", "op", {"layer": 0, "op": "qkv"}):
            pass
        with ins.region_with("L01", "layer", {"layer": 1}):
            pass
    assert [(m.name, m.layer) for m in timer.marks] == [("L00", 0), ("L01", 1)]
    assert all(m.start is not None and m.end is not None for m in timer.marks)
    assert ins._records == [] and ins._stack == []


def test_chained_regions_share_the_boundary_event_inside_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-to-back siblings (`chain`) reuse the previous sibling's end event as their start: about one event node
    per region instead of two. A region of another level in between breaks the chain."""
    import itertools

    import kvscope.profiler.instrument as instrument

    clock = itertools.count()
    monkeypatch.setattr(instrument, "_graph_event", lambda: _FakeEvent(float(next(clock))))
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
