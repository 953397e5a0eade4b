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
