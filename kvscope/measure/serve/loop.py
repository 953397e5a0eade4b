"""The served load's real-time loop: arrivals admitted between iterations, one forward per iteration, its sampled
tokens read back (the one named sync of an iteration), the records kept (per iteration, per (iteration, request),
and the sequences themselves).

Requests come from two places, drained at the start of every iteration: the load's own list of arrivals (the
in-process load: `pending`, in arrival order, each admitted once the clock passes its arrival) and a thread-safe
inbox (`submit`, `cancel`: another thread, such as an HTTP front, hands requests in and takes tokens out through each
sequence's `on_token`). A cancelled request leaves at the next iteration boundary: its blocks are freed at once and it
is recorded as cut. `stop()` (asked between iterations) ends the loop; what is still running is recorded as cut.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvscope.engine.served import Feed, Readback, ServedEngine
from kvscope.measure.serve.load import ClosedLoop, RequestSpec
from kvscope.measure.serve.scheduler import PENDING, Plan, Scheduler, Sequence
from kvscope.schema import MS_PER_S

# the longest the loop sleeps while idle before it looks at its inbox and its clock again
IDLE_WAIT_S = 0.05

ProgressFn = Callable[[int, int, int, float], None]


class ServeLoop:
    """One engine and scheduler driven in real time (see the module docstring). `make_prompt(spec)` gives the token
    ids of an in-process arrival. The load's `--duration` ends its arrivals (the open loop's list, the closed loop's
    users); what arrived is served to the end."""

    def __init__(self, engine: ServedEngine, sched: Scheduler, make_prompt: Callable[[RequestSpec], list[int]],
                 arrivals: Iterable[RequestSpec] = (), closed: ClosedLoop | None = None,
                 progress: ProgressFn | None = None) -> None:
        self.engine, self.sched, self.make_prompt = engine, sched, make_prompt
        self.closed = closed
        self.pending: deque[RequestSpec] = deque(closed.start() if closed is not None else arrivals)
        self.progress = progress
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.sequences: list[Sequence] = []
        self.by_id: dict[int, Sequence] = {}
        self.rows: list[dict[str, Any]] = []
        self.batches: list[tuple[int, int, str, int, int]] = []
        self.cut_reason = ""
        self.t0 = time.perf_counter()
        self.iteration = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ---- from other threads ---------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Hand in a request (its `arrival_s` on this loop's clock, `now()`); admitted at the next iteration."""
        self.inbox.put(("submit", seq))
        self.wake.set()

    def cancel(self, request_id: int) -> None:
        """End a request at the next iteration boundary, its blocks freed (a client that went away)."""
        self.inbox.put(("cancel", request_id))
        self.wake.set()

    # ---- the loop -------------------------------------------------------------------------------------------
    def _add(self, seq: Sequence) -> None:
        self.sequences.append(seq)
        self.by_id[seq.spec.request_id] = seq
        if not self.sched.add(seq) and seq.on_token is not None:
            seq.on_token(seq, None, self.now(), True)  # refused: the caller hears it at once

    def _drain(self, t: float) -> None:
        while self.pending and self.pending[0].arrival_s <= t:
            spec = self.pending.popleft()
            self._add(Sequence(spec, self.make_prompt(spec), spec.arrival_s))
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._add(item)
            elif ((seq := self.by_id.get(item)) is not None and self.sched.abort(seq, "cancelled by the client")
                  and seq.on_token is not None):
                seq.on_token(seq, None, self.now(), True)

    def _idle_wait(self, external: bool) -> bool:
        """Sleep until the next arrival or submission; False when nothing more can come."""
        if self.pending:
            wait = min(self.pending[0].arrival_s - self.now(), IDLE_WAIT_S)
        elif external:
            wait = IDLE_WAIT_S
        else:
            return False
        self.wake.wait(max(0.0, wait))
        self.wake.clear()
        return True

    def run(self, stop: Callable[[], bool] | None = None, external: bool = False,
            stop_reason: str = "stopped") -> None:
        """Drive the load until it is done (`external`: until `stop()`, since requests may still be submitted);
        `stop_reason` is what the cut requests record when `stop()` ended it.

        One iteration ahead: iteration N+1 is planned and launched while N runs on the device (its decode rows take
        N's tokens from the device, `served.Feed`), then N's tokens are read (an event after N: the named sync) and
        handed out. Where N+1 needs one of N's tokens on the host (a prefill chunk over a sequence's generated
        tokens, after a preemption by recompute), N is read first."""
        self.t0 = time.perf_counter()
        flight: _InFlight | None = None
        while True:
            t = self.now()
            self._drain(t)
            if stop is not None and stop():
                self.cut_reason = stop_reason
                break
            plan = None if self.sched.idle else self.sched.schedule(t)
            if plan is None:
                if flight is not None:
                    self._finish(flight)
                    flight = None
                elif not self._idle_wait(external):
                    break
                continue
            feed = self._feed(plan, flight)
            if feed is None and flight is not None:
                self._finish(flight)  # N's tokens are needed on the host to build N+1
                flight = None
                self.sched.rebuild(plan)
            launched = self._launch(plan, t, feed)
            if flight is not None:
                self._finish(flight)
            flight = launched
        if flight is not None:
            self._finish(flight)
        for seq in self.sched.cut():
            seq.reason = seq.reason or self.cut_reason or "the load ended"
            if seq.on_token is not None:
                seq.on_token(seq, None, self.now(), True)
        if not self.cut_reason and any(s.state == "cut" for s in self.sequences):
            self.cut_reason = "the load ended"

    def _feed(self, plan: Plan, flight: _InFlight | None) -> Feed | None:
        """The rows of `plan` whose token is one `flight` sampled (still PENDING on the host), as a feed from its
        device output; None when there is no flight, or when a PENDING token sits where a feed cannot reach it."""
        if flight is None:
            return None
        batch = plan.batch
        rows = np.flatnonzero(batch.tokens == PENDING)
        if rows.size == 0:
            return Feed(rows, rows, flight.readback.device_tokens)
        if rows[-1] >= batch.n_single:
            return None
        where = {id(seq): i for i, (seq, _) in enumerate(flight.plan.sampled)}
        work = plan.work
        idx = [where.get(id(work[j].seq), -1) for j in rows.tolist()]
        if min(idx) < 0:
            return None
        return Feed(rows.astype(np.int64), np.asarray(idx, dtype=np.int64), flight.readback.device_tokens)

    def _launch(self, plan: Plan, t: float, feed: Feed | None) -> _InFlight:
        launch = self.now()
        out = self.engine.forward(plan.batch, self.iteration, feed)  # a feed of no rows feeds nothing
        readback = Readback(out)
        done = self.sched.advance(plan)
        flight = _InFlight(plan, readback, self.iteration, done, self._row(plan, launch, (launch - t) * MS_PER_S))
        self.iteration += 1
        return flight

    def _finish(self, flight: _InFlight) -> None:
        """Read an iteration's tokens, then its records, listeners, the closed loop's next requests, progress."""
        sampled = flight.readback.tokens()  # the iteration's named sync (see Readback)
        end = self.now()
        self.sched.resolve(flight.plan, sampled, end, flight.iteration)
        row = flight.row
        row["end_s"], row["host_dur_ms"] = end, (end - row["start_s"]) * MS_PER_S
        self.rows.append(row)
        for seq, k in flight.plan.sampled:  # each new token to its listener (an HTTP stream), and whether it ends
            if seq.on_token is not None and seq.state != "cut":
                seq.on_token(seq, seq.output[k], end, seq.state == "finished" and k == len(seq.output) - 1)
        if self.closed is not None:
            for _ in flight.done:
                nxt = self.closed.on_finish(end)
                if nxt is not None:
                    self.pending.append(nxt)
        if self.progress is not None:
            self.progress(len(self.sched.finished), len(self.sched.running), len(self.sched.waiting), end)

    def _row(self, plan: Plan, launch: float, host_ms: float) -> dict[str, Any]:
        """The iteration's record as it was launched (the queues and the pool after its plan and advance)."""
        sched, work, iteration = self.sched, plan.work, self.iteration
        for w in work:
            self.batches.append((iteration, w.seq.spec.request_id, w.kind, w.n, w.start + w.n))
        prefill = plan.prefill_tokens
        decode = plan.decode_seqs
        return {
            "iteration": iteration, "kind": "mixed" if prefill and decode else ("prefill" if prefill else "decode"),
            "start_s": launch, "end_s": math.nan, "host_dur_ms": math.nan, "host_ms": host_ms,
            "prefill_tokens": prefill, "prefill_seqs": sum(1 for w in work if w.kind == "prefill"),
            "decode_seqs": decode, "tokens": plan.batch.n_tokens,
            "context_tokens": sum(w.start + w.n for w in work if w.kind == "decode"),
            "running": len(sched.running), "waiting": len(sched.waiting), "swapped": len(sched.swapped),
            "blocks_used": sched.pool.used, "blocks_free": sched.pool.free,
            "token_slots_used": sched.token_slots_used, "block_slots_held": sched.pool.used * sched.bs,
            "swap_out_bytes": plan.swap_out_bytes, "swap_in_bytes": plan.swap_in_bytes,
            "preempted": len(plan.preempted),
            "graph_batch": self.engine.last_bucket}


@dataclass
class _InFlight:
    """An iteration launched and not read back yet."""

    plan: Plan
    readback: Readback
    iteration: int
    done: list[Sequence]  # the sequences it finishes
    row: dict[str, Any]
