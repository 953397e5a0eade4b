"""Stand-ins shared by tests of several packages."""

from __future__ import annotations


class FakeEvent:
    """Stands in for a CUDA timing event: a time in ms, `elapsed_time` and `synchronize`."""

    def __init__(self, t_ms: float) -> None:
        self.t_ms = t_ms
        self.synced = 0

    def elapsed_time(self, other: FakeEvent) -> float:
        return other.t_ms - self.t_ms

    def synchronize(self) -> None:
        self.synced += 1
