"""The iteration-level scheduler of a served load: which sequences run in the next forward, with how many tokens,
and what leaves the KV pool when its blocks run out.

Each sequence holds `computed` positions of K/V in the pool (its block table covers them) out of its `known` tokens
(prompt + generated). Its next work is `known[computed:]`: a whole or partial prefill, or, once decoding, exactly
one token (the last generated). Work that reaches the end of `known` samples a new token. One rule covers a fresh
prompt, a chunk of one, a decode step, and a sequence preempted by recompute (computed back to 0: its prompt and
every generated token are prefilled again, and the forward over them samples its next token).

Policies (`POLICIES`), both under a token budget per iteration (`max_batch_tokens`) and a sequence cap (`max_seqs`):
- `prefill-first`: when a waiting sequence can be admitted, the iteration is prefill only, whole prompts in arrival
  order while the budget lasts (a prompt longer than the budget goes alone); otherwise every running sequence
  decodes one token. A new prompt stalls the decoding ones for the length of its prefill.
- `chunked`: every running sequence decodes one token first, then the rest of the budget goes to prefill work in
  arrival order (the partly prefilled first), cut into chunks that fit.

Admission reserves the blocks of a sequence's whole `known` length at once (no half-admitted prompt can hold
blocks another needs to finish); a decoding sequence takes a new block when its next position crosses one. When no
block is free for a decode, the latest-arrived running sequence is preempted (`recompute`: its blocks freed,
`computed` = 0, back to the front of the queue by arrival; `swap`: its blocks copied to page-locked host memory and
freed, swapped back in, before any new admission, once blocks are free). Swapped sequences come back first, then
waiting ones by arrival. A request whose prompt + output cannot fit the whole pool, or exceeds the engine's longest
sequence, is refused at arrival.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvscope.engine.served import Chunk, IterationBatch
from kvscope.errors import KvscopeError
from kvscope.measure.serve.load import RequestSpec
from kvscope.model.paged_kv_cache import SCRATCH_BLOCK, PagedKVCache, blocks_for
from kvscope.schema import POLICIES, PREEMPT_MODES

WAITING, RUNNING, SWAPPED, FINISHED, REFUSED, CUT = "waiting", "running", "swapped", "finished", "refused", "cut"
PENDING = -1  # a sampled token launched but not read back yet (`Scheduler.advance`, then `resolve`)


@dataclass(eq=False)
class Sequence:
    """One request's state in the scheduler, and the times the records need (host clock, seconds from the start)."""

    spec: RequestSpec
    prompt: list[int]
    arrival_s: float
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    state: str = WAITING
    admitted_s: float = float("nan")
    finish_s: float = float("nan")
    token_s: list[float] = field(default_factory=list)  # when each output token was read on the host
    token_iterations: list[int] = field(default_factory=list)
    preempt_recompute: int = 0
    preempt_swap: int = 0
    swapped: torch.Tensor | None = None  # (L, 2, n, bs, H_kv, D) page-locked copy while swapped out
    reason: str = ""
    # a listener of the sequence's tokens (an HTTP stream): on_token(seq, token or None, time_s, last); None and last
    # when it was refused or cut (its `state` and `reason` say which)
    on_token: Callable[[Sequence, int | None, float, bool], None] | None = None

    known: int = 0  # len(prompt) + len(output), kept as tokens are appended (the scheduler's hot loop reads it)
    table: np.ndarray | None = None  # the block table as int32 (max_blocks,), scratch-padded, kept with `blocks`
    table_n: int = 0  # entries of `table` written

    def __post_init__(self) -> None:
        self.known = len(self.prompt) + len(self.output)

    def append(self, token: int) -> None:
        self.output.append(token)
        self.known += 1

    @property
    def done(self) -> bool:
        return len(self.output) >= self.spec.output_tokens

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]


@dataclass
class Work:
    """What one sequence puts into an iteration: `n` tokens from position `start` (`kind` decode or prefill)."""

    seq: Sequence
    start: int
    n: int
    kind: str

    @property
    def samples(self) -> bool:
        return self.start + self.n == self.seq.known


@dataclass
class Plan:
    """One iteration: the work (single-token rows first, in `batch` order), and what the scheduler did to get there."""

    work: list[Work]
    batch: IterationBatch
    preempted: list[Sequence] = field(default_factory=list)
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, index of its PENDING token)

    @property
    def prefill_tokens(self) -> int:
        return sum(w.n for w in self.work if w.kind == "prefill")

    @property
    def decode_seqs(self) -> int:
        return sum(1 for w in self.work if w.kind == "decode")


class Scheduler:
    """Queues, the pool's blocks, and the policy (see the module docstring)."""

    def __init__(self, cache: PagedKVCache, policy: str, max_batch_tokens: int, max_seqs: int, preempt: str,
                 max_seq: int) -> None:
        if policy not in POLICIES:
            raise KvscopeError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if preempt not in PREEMPT_MODES:
            raise KvscopeError(f"unknown preemption {preempt!r}; choose from {', '.join(PREEMPT_MODES)}")
        if max_batch_tokens < 1 or max_seqs < 1:
            raise KvscopeError(f"--max-batch-tokens and --max-seqs must be positive, got {max_batch_tokens}, "
                               f"{max_seqs}")
        self.cache, self.pool, self.bs = cache, cache.pool, cache.block_size
        self.policy, self.max_batch_tokens, self.max_seqs, self.preempt = policy, max_batch_tokens, max_seqs, preempt
        self.max_seq = max_seq
        self.max_blocks = blocks_for(max_seq, self.bs)
        self.waiting: list[Sequence] = []  # by arrival (preempted ones go back in their place)
        self.running: list[Sequence] = []  # by arrival
        self.swapped: list[Sequence] = []  # by arrival
        self.finished: list[Sequence] = []
        self.refused: list[Sequence] = []

    # ---- queues ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """A new request; False (and recorded as refused, with the reason) when it can never run."""
        total = len(seq.prompt) + seq.spec.output_tokens
        reason = ""
        if total > self.max_seq:
            reason = f"prompt + output of {total} tokens exceeds the longest sequence, {self.max_seq}"
        elif blocks_for(total, self.bs) > self.pool.capacity:
            reason = (f"prompt + output of {total} tokens needs {blocks_for(total, self.bs)} blocks, the whole pool "
                      f"holds {self.pool.capacity}")
        if reason:
            seq.state, seq.reason = REFUSED, reason
            self.refused.append(seq)
            return False
        self._by_arrival(self.waiting, seq)
        return True

    @staticmethod
    def _by_arrival(queue: list[Sequence], seq: Sequence) -> None:
        keys = [(s.arrival_s, s.spec.request_id) for s in queue]
        queue.insert(bisect.bisect(keys, (seq.arrival_s, seq.spec.request_id)), seq)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.swapped)

    @property
    def token_slots_used(self) -> int:
        return sum(s.computed for s in self.running)

    # ---- planning -------------------------------------------------------------------------------------------
    def schedule(self, now_s: float, retry: bool = True) -> Plan | None:
        """The next iteration's plan, or None when nothing can run (all queues empty)."""
        preempted: list[Sequence] = []
        swap_in = self._swap_in(now_s)
        work: list[Work] = []
        if self.policy == "prefill-first":
            work = self._admit(now_s, self.max_batch_tokens, whole=True)
            if not work:
                work = self._decodes(preempted)
        else:
            work = self._decodes(preempted)
            budget = self.max_batch_tokens - len(work)
            work += self._continue_prefills(budget)
            budget = self.max_batch_tokens - sum(w.n for w in work)
            work += self._admit(now_s, budget, whole=False)
        if not work:
            if self.idle:
                return None
            if retry:  # the preemptions above freed blocks (or swapped out): plan again once
                return self.schedule(now_s, retry=False)
            raise KvscopeError("scheduler: sequences wait but none can run (the pool is too small for one)")
        swap_out = sum(s.swapped.numel() * s.swapped.element_size() for s in preempted if s.swapped is not None)
        return Plan(work, self._batch(work), preempted, swap_out, swap_in)

    def _decodes(self, preempted: list[Sequence]) -> list[Work]:
        """One token for every running sequence that has prefilled; blocks found by preempting the latest arrivals."""
        work: list[Work] = []
        bs = self.bs
        for seq in list(self.running):
            if seq.state != RUNNING or seq.computed != seq.known - 1 or not seq.output:
                continue
            if seq.known > len(seq.blocks) * bs and not self._room(seq, seq.known, preempted):
                continue  # seq itself was preempted
            work.append(Work(seq, seq.computed, 1, "decode"))
        return work

    def _room(self, seq: Sequence, tokens: int, preempted: list[Sequence]) -> bool:
        """Blocks for `tokens` positions of a running sequence, preempting the latest-arrived running sequences
        (possibly itself) until there are. False when `seq` was preempted."""
        need = blocks_for(tokens, self.bs) - len(seq.blocks)
        while need > self.pool.free:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.blocks += self.pool.allocate(max(need, 0))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.preempt == "swap":
            seq.swapped = self.cache.swap_out(seq.blocks)
            seq.preempt_swap += 1
            seq.state = SWAPPED
            self._by_arrival(self.swapped, seq)
        else:
            seq.computed = 0
            seq.preempt_recompute += 1
            seq.state = WAITING
            self._by_arrival(self.waiting, seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.table = [], None

    def _swap_in(self, now_s: float) -> int:
        """Bring swapped sequences back, oldest first, while their blocks are free; returns the bytes copied."""
        moved = 0
        while self.swapped and len(self.running) < self.max_seqs:
            seq = self.swapped[0]
            n = seq.swapped.shape[2]
            if n > self.pool.free:
                break
            self.swapped.pop(0)
            seq.blocks, seq.table = self.pool.allocate(n), None
            self.cache.swap_in(seq.swapped, seq.blocks)
            moved += seq.swapped.numel() * seq.swapped.element_size()
            seq.swapped = None
            seq.state = RUNNING
            self._by_arrival(self.running, seq)
        return moved

    def _continue_prefills(self, budget: int) -> list[Work]:
        """Chunks of the running sequences that are part-way through their prefill, in arrival order."""
        work = []
        for seq in self.running:
            left = seq.known - seq.computed
            if budget <= 0:
                break
            if seq.output and left == 1:
                continue  # a decode, already planned (or preempted)
            n = min(left, budget)
            work.append(Work(seq, seq.computed, n, "prefill"))
            budget -= n
        return work

    def _admit(self, now_s: float, budget: int, whole: bool) -> list[Work]:
        """Waiting sequences admitted in arrival order while blocks (for their whole known length), sequence slots
        and the budget last (with `whole`, a prompt must fit the budget, except the first of an iteration)."""
        work: list[Work] = []
        if self.swapped:
            return work  # swapped sequences come back first
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            n = seq.known
            if whole and work and n > budget:
                break
            if blocks_for(n, self.bs) > self.pool.free:
                break
            self.waiting.pop(0)
            seq.blocks, seq.table = self.pool.allocate(blocks_for(n, self.bs)), None
            seq.state = RUNNING
            if seq.admitted_s != seq.admitted_s:  # NaN: first admission
                seq.admitted_s = now_s
            self._by_arrival(self.running, seq)
            take = n if whole else min(n, budget)
            work.append(Work(seq, 0, take, "prefill"))
            budget -= take
        return work

    def rebuild(self, plan: Plan) -> None:
        """Build a plan's batch again (its tokens read now: a PENDING token of the iteration before has its value)."""
        plan.batch = self._batch(plan.work)

    def _table(self, seq: Sequence) -> np.ndarray:
        """The sequence's block table as a scratch-padded int32 row: blocks only grow at the end while a sequence
        runs (a new admission or swap-in starts a fresh table), so only the new entries are written."""
        t, n = seq.table, len(seq.blocks)
        if t is None:
            t = seq.table = np.full(self.max_blocks, SCRATCH_BLOCK, dtype=np.int32)
            seq.table_n = 0
        if seq.table_n != n:
            t[seq.table_n:n] = seq.blocks[seq.table_n:]
            seq.table_n = n
        return t

    def _batch(self, work: list[Work]) -> IterationBatch:
        """The engine's batch: single-token work first (decode attention over tables), then the chunks."""
        singles = [w for w in work if w.n == 1]
        multi = [w for w in work if w.n > 1]
        work[:] = singles + multi
        bs = self.bs
        pos = [w.start for w in singles]
        tokens = [w.seq.token(w.start) for w in singles]
        slots = [w.seq.blocks[p // bs] * bs + p % bs for w, p in zip(singles, pos, strict=True)]
        tables = (np.stack([self._table(w.seq) for w in singles]) if singles
                  else np.zeros((0, self.max_blocks), dtype=np.int32))
        sample = [j for j, w in enumerate(singles) if w.samples]
        chunks: list[Chunk] = []
        row = len(singles)
        for w in multi:
            seq, p = w.seq, np.arange(w.start, w.start + w.n)
            blocks = np.asarray(seq.blocks, dtype=np.int64)
            tokens.extend(seq.token(i) for i in range(w.start, w.start + w.n))
            pos.extend(p.tolist())
            slots.extend((blocks[p // bs] * bs + p % bs).tolist())
            chunks.append(Chunk(row, w.n, w.start, seq.blocks))
            row += w.n
            if w.samples:
                sample.append(row - 1)
        return IterationBatch(np.asarray(tokens, np.int64), np.asarray(pos, np.int64), np.asarray(slots, np.int64),
                              len(singles), tables, chunks, np.asarray(sample, np.int64))

    # ---- results --------------------------------------------------------------------------------------------
    def advance(self, plan: Plan) -> list[Sequence]:
        """The iteration was launched: `computed` advances, every sequence it samples gets a PENDING token (its
        value comes with `resolve`), and those that now have all their output leave (blocks freed: the next
        iteration's writes to them are ordered after this one on the stream). Returns those."""
        done: list[Sequence] = []
        plan.sampled = []
        for w in plan.work:
            seq = w.seq
            seq.computed = w.start + w.n
            if not w.samples:
                continue
            plan.sampled.append((seq, len(seq.output)))
            seq.append(PENDING)
            if seq.done and seq.state == RUNNING:
                seq.state = FINISHED
                self.running.remove(seq)
                self.pool.release(seq.blocks)
                seq.blocks, seq.table = [], None
                self.finished.append(seq)
                done.append(seq)
        return done

    def resolve(self, plan: Plan, sampled: list[int], now_s: float, iteration: int) -> None:
        """The iteration's sampled tokens were read back at `now_s`: they replace its PENDING tokens, with their
        time and iteration; a sequence that finished in it gets its finish time; one cut meanwhile drops its token."""
        for (seq, k), token in zip(plan.sampled, sampled, strict=True):
            if seq.state == CUT:  # cut while the iteration ran: its token was never handed out
                del seq.output[k:]
                seq.known = len(seq.prompt) + len(seq.output)
                continue
            seq.output[k] = int(token)
            seq.token_s.append(now_s)
            seq.token_iterations.append(iteration)
            if seq.state == FINISHED and seq.finish_s != seq.finish_s:  # NaN: not set yet
                seq.finish_s = now_s

    def complete(self, plan: Plan, sampled: list[int], now_s: float, iteration: int) -> list[Sequence]:
        """`advance` then `resolve`: the iteration ran and its tokens were read (no iteration in between)."""
        done = self.advance(plan)
        self.resolve(plan, sampled, now_s, iteration)
        return done

    def abort(self, seq: Sequence, reason: str) -> bool:
        """End one unfinished sequence now (its client went away): blocks freed, recorded as cut. False when it had
        already finished or left."""
        queues = {RUNNING: self.running, WAITING: self.waiting, SWAPPED: self.swapped}
        queue = queues.get(seq.state)
        if queue is None or seq not in queue:
            return False
        queue.remove(seq)
        if seq.blocks:
            self.pool.release(seq.blocks)
        seq.blocks, seq.table, seq.swapped, seq.state, seq.reason = [], None, None, CUT, reason
        return True

    def cut(self) -> list[Sequence]:
        """Every sequence not finished (a stop): marked cut, blocks freed; returns them."""
        cut = [*self.running, *self.waiting, *self.swapped]
        for seq in cut:
            if seq.blocks:
                self.pool.release(seq.blocks)
            seq.blocks, seq.swapped, seq.state = [], None, CUT
        self.running, self.waiting, self.swapped = [], [], []
        return cut
