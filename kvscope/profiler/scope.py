"""What a region knows about where it runs, and what it leaves behind until `Instrument.collect()`.

- `Scope`: the repetition, phase and step a region runs in. A region that names any of them (`rep=`, `phase=`,
  `step=`) pushes a new scope for the regions nested inside; leaving it pops the scope back. Scopes are immutable,
  so a record or a graph replay can keep the one it ran in.
- `RegionRecord`: one region with its clock marks (CUDA events, host-clock ns or graph marks), before resolution.
- `row()`: one resolved region as `collect()` returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Scope:
    """The repetition, phase and step that regions inherit from the regions around them."""

    rep: int | None = None
    phase: str | None = None
    step: int | None = None

    def entered(self, keys: dict[str, Any]) -> Scope:
        """The scope inside a region with `keys`: the region's own rep, phase and step where it names them."""
        return Scope(keys.get("rep", self.rep), keys.get("phase", self.phase), keys.get("step", self.step))


OUTSIDE = Scope()  # the scope outside every region


class ScopeStack:
    """The current scope and the ones it replaced, innermost last."""

    __slots__ = ("_outer", "current")

    def __init__(self) -> None:
        self.current = OUTSIDE
        self._outer: list[Scope] = []

    def push(self, scope: Scope) -> None:
        self._outer.append(self.current)
        self.current = scope

    def pop(self) -> None:
        if not self._outer:
            raise RuntimeError("ScopeStack.pop() without a pushed scope")
        self.current = self._outer.pop()

    def __len__(self) -> int:
        """Scopes pushed and not popped yet."""
        return len(self._outer)


@dataclass(slots=True)
class RegionRecord:
    """One timed region, before its marks are resolved."""

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
    start: Any = None  # torch.cuda.Event, perf_counter_ns on the host clock, or a graph mark (see graph.GraphTimer)
    end: Any = None


def row(r: RegionRecord, rep: int | None, phase: str | None, step: int | None, start_ms: float, dur_ms: float,
        host_enqueue_ms: float, clock: str) -> dict[str, Any]:
    """One resolved region as `collect()` returns it; rep, phase and step are those of the scope it ran in."""
    return {"name": r.name, "level": r.level, "rep": rep, "phase": phase, "step": step, "layer": r.layer, "op": r.op,
            "tokens": r.tokens, "context_len": r.context_len, "start_ms": start_ms, "dur_ms": dur_ms,
            "host_enqueue_ms": host_enqueue_ms, "clock": clock}
