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

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kvscope.engine.served import ServedEngine
from kvscope.measure.serve.load import ClosedLoop, RequestSpec
from kvscope.measure.serve.scheduler import Plan, Scheduler, Sequence
from kvscope.schema import MS_PER_S

# the longest the loop sleeps while idle before it looks at its inbox and its clock again
IDLE_WAIT_S = 0.05

ProgressFn = Callable[[int, int, int, float], None]


class ServeLoop:
    """One engine and scheduler driven in real time (see the module docstring). `make_prompt(spec)` gives the token
    ids of an in-process arrival; `duration_s`: no iteration starts after it (the rest is cut)."""

    def __init__(self, engine: ServedEngine, sched: Scheduler, make_prompt: Callable[[RequestSpec], list[int]],
                 arrivals: Iterable[RequestSpec] = (), closed: ClosedLoop | None = None,
                 duration_s: float | None = None, progress: ProgressFn | None = None) -> None:
        self.engine, self.sched, self.make_prompt = engine, sched, make_prompt
        self.closed = closed
        self.pending: deque[RequestSpec] = deque(closed.start() if closed is not None else arrivals)
        self.duration_s, self.progress = duration_s, progress
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
        `stop_reason` is what the cut requests record when `stop()` ended it."""
        self.t0 = time.perf_counter()
        prev_end = 0.0
        while True:
            t = self.now()
            self._drain(t)
            if stop is not None and stop():
                self.cut_reason = stop_reason
                break
            if self.duration_s is not None and t >= self.duration_s and not self.sched.idle:
                self.cut_reason = f"--duration {self.duration_s:g} s reached"
                break
            if self.sched.idle:
                if not self._idle_wait(external):
                    break
                prev_end = self.now()
                continue
            prev_end = self._iterate(t, prev_end)
        for seq in self.sched.cut():
            seq.reason = seq.reason or self.cut_reason or "the load ended"
            if seq.on_token is not None:
                seq.on_token(seq, None, self.now(), True)
        if not self.cut_reason and any(s.state == "cut" for s in self.sequences):
            self.cut_reason = "the load ended"

    def _iterate(self, t: float, prev_end: float) -> float:
        plan = self.sched.schedule(t)
        if plan is None:
            return prev_end
        launch = self.now()
        sampled = self.engine.forward(plan.batch, self.iteration).tolist()  # named sync: the scheduler needs them
        end = self.now()
        told = [w.seq for w in plan.work if w.samples and w.seq.on_token is not None]  # before complete moves them
        done = self.sched.complete(plan, sampled, end, self.iteration)
        self._record(plan, launch, end, prev_end)
        for seq in told:  # each new token to its listener (an HTTP stream), with whether it was the last
            seq.on_token(seq, seq.output[-1], seq.token_s[-1], seq.state == "finished")
        if self.closed is not None:
            for _ in done:
                nxt = self.closed.on_finish(end)
                if nxt is not None:
                    self.pending.append(nxt)
        if self.progress is not None:
            self.progress(len(self.sched.finished), len(self.sched.running), len(self.sched.waiting), end)
        self.iteration += 1
        return end

    def _record(self, plan: Plan, launch: float, end: float, prev_end: float) -> None:
        sched, work, iteration = self.sched, plan.work, self.iteration
        for w in work:
            self.batches.append((iteration, w.seq.spec.request_id, w.kind, w.n, w.start + w.n))
        prefill = plan.prefill_tokens
        decode = plan.decode_seqs
        self.rows.append({
            "iteration": iteration, "kind": "mixed" if prefill and decode else ("prefill" if prefill else "decode"),
            "start_s": launch, "end_s": end, "host_dur_ms": (end - launch) * MS_PER_S,
            "host_ms": (launch - prev_end) * MS_PER_S,
            "prefill_tokens": prefill, "prefill_seqs": sum(1 for w in work if w.kind == "prefill"),
            "decode_seqs": decode, "tokens": plan.batch.n_tokens,
            "context_tokens": sum(w.start + w.n for w in work if w.kind == "decode"),
            "running": len(sched.running), "waiting": len(sched.waiting), "swapped": len(sched.swapped),
            "blocks_used": sched.pool.used, "blocks_free": sched.pool.free,
            "token_slots_used": sched.token_slots_used, "block_slots_held": sched.pool.used * sched.bs,
            "swap_out_bytes": plan.swap_out_bytes, "swap_in_bytes": plan.swap_in_bytes,
            "preempted": len(plan.preempted),
            "graph_batch": self.engine.last_bucket})
