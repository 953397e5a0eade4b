"""Shared by the served-load token tests (CPU and GPU): a fixed set of requests arriving by iteration, driven
through the scheduler and the served engine without a clock, and the same requests run alone through the static
engine (contiguous cache, batch 1)."""

from __future__ import annotations

import numpy as np
import torch

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.engine.served import ServeConfig, ServedEngine, _Static
from kvscope.measure.serve.load import RequestSpec
from kvscope.measure.serve.scheduler import FINISHED, Scheduler, Sequence
from kvscope.model.paged_kv_cache import PagedKVCache

# (prompt, output, arrival iteration)
REQUESTS = [(5, 12, 0), (17, 9, 0), (33, 14, 1), (40, 6, 2), (1, 10, 3), (64, 8, 3), (23, 16, 6), (9, 12, 9)]
MAX_SEQ = 96
MAX_SEQS = 8
# (policy, preemption, blocks, token budget, block size): a roomy pool (with budgets of 24 and of 8 tokens: prompts
# cut into chunks of at most what the decodes leave), then one of 10 usable blocks of 8 positions (80) for requests
# of up to 72 positions, where decodes crossing a block find none free. (A one-token chunk that samples nothing, a
# single-token row that is not a decode, is held by tests/engine/test_served_replay.py: these arrivals make none.)
CASES = [("prefill-first", "recompute", 64, 512, 16), ("chunked", "recompute", 64, 24, 16),
         ("chunked", "recompute", 64, 8, 16),
         ("prefill-first", "recompute", 11, 512, 8), ("chunked", "recompute", 11, 24, 8),
         ("prefill-first", "swap", 11, 512, 8), ("chunked", "swap", 11, 24, 8)]
SMALL_POOL = 11


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab, size=p).tolist() for p, _, _ in REQUESTS]


def static_engine(model: torch.nn.Module, options: EngineOptions, attn: str) -> Engine:
    p = next(model.parameters())
    return Engine(model, RunConfig(1, MAX_SEQ, p.dtype, p.device, attn), options=options)


_ALONE: dict[tuple[int, tuple[int, ...], int, EngineOptions, str], list[int]] = {}


def alone(model: torch.nn.Module, prompt: list[int], n: int, options: EngineOptions, attn: str = "sdpa"
          ) -> list[int]:
    """The request alone through the static engine (kept per model, prompt and options: the cases share them)."""
    key = (id(model), tuple(prompt), n, options, attn)
    if key not in _ALONE:
        _ALONE[key] = static_engine(model, options, attn).generate([prompt], n)[0]
    return _ALONE[key]


def reference_logits(model: torch.nn.Module, tokens: list[int], options: EngineOptions, attn: str = "sdpa"
                     ) -> torch.Tensor:
    """The static engine's logits after a prefill of `tokens` (those of the next token), float32."""
    eng = static_engine(model, options, attn)
    eng.prefill(torch.tensor([tokens], device=next(model.parameters()).device), [len(tokens)])
    return eng.logits[0].float()


class EagerReplay:
    """Stands in for a decode bucket's CUDA graph where there is none (the CPU): `replay` runs the bucket's forward
    on its static inputs and writes its output buffer, as the graph would, so that the replay path's bookkeeping
    (padding rows of slot -1 and length 0, the rows sampled, tokens fed from the previous iteration) is tested
    without a GPU."""

    def __init__(self, st: _Static, fwd: object) -> None:
        self.st, self.fwd = st, fwd

    def replay(self) -> None:
        self.st.out.copy_(self.fwd())  # type: ignore[operator, union-attr]


def stand_in_graphs(eng: ServedEngine) -> None:
    """Every decode bucket of `eng` replayed by `EagerReplay` (set up as `capture_graphs` sets up the real ones)."""
    for b in eng.buckets:
        st = _Static(b, eng.max_blocks, eng.cfg.device)
        st.out = torch.zeros(b, dtype=torch.int64, device=eng.cfg.device)
        st.graph = EagerReplay(st, eng._captured_forward(st))  # type: ignore[assignment]
        eng.graphs[b] = st


def served_engine(model: torch.nn.Module, n_blocks: int, block: int, options: EngineOptions,
                  replayed: bool) -> tuple[PagedKVCache, ServedEngine]:
    """The pool and the engine of a case; its decode buckets captured (options.graphs) or, with `replayed` and no
    graphs, replayed by `EagerReplay`."""
    args = model.args
    p = next(model.parameters())
    cache = PagedKVCache(args, n_blocks, block, p.dtype, p.device)
    eng = ServedEngine(model, cache, ServeConfig(MAX_SEQ, MAX_SEQS, p.dtype, p.device), options=options)
    eng.capture_graphs()
    if replayed and not options.graphs:
        stand_in_graphs(eng)
    return cache, eng


def drive(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int, block: int,
          options: EngineOptions, replayed: bool = False) -> list[Sequence]:
    """The requests through the scheduler and the served engine, arrivals by iteration."""
    args = model.args
    cache, eng = served_engine(model, n_blocks, block, options, replayed)
    sched = Scheduler(cache, policy, budget, MAX_SEQS, preempt, MAX_SEQ)
    seqs = [Sequence(RequestSpec(i, float(at), len(pr), out), pr, float(at))
            for i, (pr, (_, out, at)) in enumerate(zip(prompts(args.vocab_size), REQUESTS, strict=True))]
    last_arrival = max(at for _, _, at in REQUESTS)
    for it in range(1000):
        for s in seqs:
            if s.arrival_s == it and not sched.add(s):
                raise AssertionError(f"request {s.spec.request_id} refused: {s.reason}")
        plan = sched.schedule(float(it))
        if plan is None:
            if it > last_arrival:
                break
            continue
        sched.complete(plan, eng.forward(plan.batch, it).tolist(), float(it), it)
    return seqs


def first_difference(got: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)


def check_ran(seqs: list[Sequence], preempt: str, n_blocks: int) -> None:
    """Every request finished; with the small pool, the preemption the case forces happened."""
    assert all(s.state == FINISHED for s in seqs)
    if n_blocks == SMALL_POOL:
        attr = "preempt_swap" if preempt == "swap" else "preempt_recompute"
        assert sum(getattr(s, attr) for s in seqs) > 0


def divergences(model: torch.nn.Module, seqs: list[Sequence], options: EngineOptions, attn: str = "sdpa"
                ) -> list[tuple[Sequence, int, list[int], torch.Tensor]]:
    """Each request whose tokens differ from the same request alone: (request, first differing token, the tokens
    alone, the reference's logits at that token)."""
    out = []
    for s in seqs:
        ref = alone(model, s.prompt, s.spec.output_tokens, options, attn)
        k = first_difference(s.output, ref)
        if k is not None:
            out.append((s, k, ref, reference_logits(model, s.prompt + ref[:k], options, attn)))
    return out


def drive_loop(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int, block: int,
               options: EngineOptions, replayed: bool = False) -> list[Sequence]:
    """The same requests through `ServeLoop` (one iteration ahead, tokens fed on the device), arriving 2 ms apart
    per arrival iteration on its clock."""
    from kvscope.measure.serve.loop import ServeLoop

    args = model.args
    cache, eng = served_engine(model, n_blocks, block, options, replayed)
    sched = Scheduler(cache, policy, budget, MAX_SEQS, preempt, MAX_SEQ)
    by_len = {}
    specs = []
    for i, (pr, (_, out, at)) in enumerate(zip(prompts(args.vocab_size), REQUESTS, strict=True)):
        specs.append(RequestSpec(i, at * 0.002, len(pr), out))
        by_len[i] = pr
    loop = ServeLoop(eng, sched, lambda spec: by_len[spec.request_id], arrivals=specs)
    loop.run()
    return sorted(loop.sequences, key=lambda s: s.spec.request_id)
