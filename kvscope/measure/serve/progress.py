"""The served load's progress line on stderr: requests finished (of how many), running, waiting, time (of the
duration), and a bar over whichever stop comes first.

Drawn only when enabled and stderr is a terminal (or `force`); disabled, it builds nothing and `update` returns at
once, so a run loop may call it every iteration. Enabled, it redraws on the caller's thread, at most once every
`refresh_s` (no thread of its own, so no redraw competes with the run loop for the interpreter between calls).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, TextColumn
from rich.progress import Progress as _Bar


class Progress:
    """A served load's progress: `update(finished, running, waiting, now_s)` as the load goes, `close()` at its end
    (also as a context manager). `total_requests` and `duration_s` are the load's stops (None: not one); `file`
    replaces stderr (tests), `force` draws even when it is not a terminal."""

    def __init__(self, total_requests: int | None, duration_s: float | None, enabled: bool, *, force: bool = False,
                 file: TextIO | None = None, refresh_s: float = 0.25) -> None:
        self.total_requests = total_requests
        self.duration_s = duration_s
        self.refresh_s = refresh_s
        self._bar: _Bar | None = None
        self._last = -float("inf")
        if not enabled:
            return
        console = Console(file=file if file is not None else sys.stderr, force_terminal=True if force else None)
        if not (force or console.is_terminal):
            return
        self._bar = _Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                         console=console, transient=True, auto_refresh=False)
        known = total_requests is not None or duration_s is not None
        self._task = self._bar.add_task("serve", total=1.0 if known else None)
        self._bar.start()

    @property
    def active(self) -> bool:
        """Whether anything is drawn (enabled, on a terminal or forced, not closed)."""
        return self._bar is not None

    def fraction(self, finished: int, now_s: float) -> float | None:
        """How far the load is: the larger of finished / total_requests and now_s / duration_s (None: no stop)."""
        parts = [finished / self.total_requests if self.total_requests else None,
                 now_s / self.duration_s if self.duration_s else None]
        known = [p for p in parts if p is not None]
        return min(max(known), 1.0) if known else None

    def describe(self, finished: int, running: int, waiting: int, now_s: float) -> str:
        """The progress line's text: `serve: finished 12/100, running 8, waiting 3, 12.3 s/60 s`."""
        done = f"{finished}/{self.total_requests}" if self.total_requests is not None else f"{finished}"
        clock = f"{now_s:.1f} s/{self.duration_s:g} s" if self.duration_s is not None else f"{now_s:.1f} s"
        return f"serve: finished {done}, running {running}, waiting {waiting}, {clock}"

    def update(self, finished: int, running: int, waiting: int, now_s: float) -> None:
        """The load's state at `now_s` (seconds since its start); redrawn at most every `refresh_s`."""
        if self._bar is None:
            return
        now = time.monotonic()
        if now - self._last < self.refresh_s:
            return
        self._last = now
        self._bar.update(self._task, description=self.describe(finished, running, waiting, now_s),
                         completed=self.fraction(finished, now_s) or 0.0)
        self._bar.refresh()

    def close(self) -> None:
        """Stop drawing and clear the line (again: nothing)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
