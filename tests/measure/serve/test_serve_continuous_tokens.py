"""Greedy tokens under continuous batching equal those of each request run alone (CPU, float32, the tiny preset):
both policies, preemption by recompute and by swap forced by a small pool, chunked prefills cut by a small token
budget. "Alone" is kvscope's static engine over a contiguous cache (prefill, then decode steps), batch 1.

Where a token differs, the test shows why it may: the reference's two best logits at that position must be a
near-tie (within NEAR_TIE of each other); the tokens before it must all be equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.engine.served import ServeConfig, ServedEngine
from kvscope.measure.serve.load import RequestSpec
from kvscope.measure.serve.scheduler import FINISHED, Scheduler, Sequence
from kvscope.model.paged_kv_cache import PagedKVCache
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

CPU = torch.device("cpu")
NEAR_TIE = 1e-4  # logits of float32 maths that differ only in summation order
# (prompt, output, arrival iteration)
REQUESTS = [(5, 12, 0), (17, 9, 0), (33, 14, 1), (40, 6, 2), (1, 10, 3), (64, 8, 3), (23, 16, 6), (9, 12, 9)]
MAX_SEQ = 96


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = load_model(resolve_model("tiny"), CPU, torch.float32, seed=0)
    return m


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab, size=p).tolist() for p, _, _ in REQUESTS]


def alone(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    eng = Engine(model, RunConfig(1, MAX_SEQ, torch.float32, CPU, "sdpa"),
                 options=EngineOptions(graphs=False, kernels=False))
    return eng.generate([prompt], n)[0]


def reference_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The static engine's logits after a prefill of `tokens` (the next token's)."""
    eng = Engine(model, RunConfig(1, MAX_SEQ, torch.float32, CPU, "sdpa"),
                 options=EngineOptions(graphs=False, kernels=False))
    eng.prefill(torch.tensor([tokens]), [len(tokens)])
    return eng.logits[0]


def drive(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int, block: int = 16
          ) -> tuple[list[Sequence], int]:
    """The requests through the scheduler and the served engine, arrivals by iteration; returns the sequences and
    how many iterations ran."""
    args = model.args
    cache = PagedKVCache(args, n_blocks, block, torch.float32, CPU)
    eng = ServedEngine(model, cache, ServeConfig(MAX_SEQ, 8, torch.float32, CPU),
                       options=EngineOptions(graphs=False, kernels=False))
    sched = Scheduler(cache, policy, budget, 8, preempt, MAX_SEQ)
    prompts = _prompts(args.vocab_size)
    seqs = [Sequence(RequestSpec(i, float(at), len(p), out), p, float(at))
            for i, (p, (_, out, at)) in enumerate(zip(prompts, REQUESTS, strict=True))]
    it = 0
    while it < 1000:
        for s in seqs:
            if s.arrival_s == it:
                assert sched.add(s)
        plan = sched.schedule(float(it))
        if plan is None:
            if it > max(at for _, _, at in REQUESTS):
                break
            it += 1
            continue
        sampled = eng.forward(plan.batch, it).tolist()
        sched.complete(plan, sampled, float(it), it)
        it += 1
    return seqs, it


# (policy, preemption, blocks, token budget, block size): a roomy pool, then one of 10 usable blocks of 8 positions
# (80) for requests of up to 72 positions, where decodes crossing a block find none free
CASES = [("prefill-first", "recompute", 64, 512, 16), ("chunked", "recompute", 64, 24, 16),
         ("prefill-first", "recompute", 11, 512, 8), ("chunked", "recompute", 11, 24, 8),
         ("prefill-first", "swap", 11, 512, 8), ("chunked", "swap", 11, 24, 8)]


@pytest.mark.parametrize(("policy", "preempt", "n_blocks", "budget", "block"), CASES)
def test_tokens_equal_alone(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int,
                            block: int) -> None:
    seqs, _ = drive(model, policy, preempt, n_blocks, budget, block)
    assert all(s.state == FINISHED for s in seqs)
    if n_blocks == 11:
        attr = "preempt_swap" if preempt == "swap" else "preempt_recompute"
        assert sum(getattr(s, attr) for s in seqs) > 0
    for s in seqs:
        ref = alone(model, s.prompt, s.spec.output_tokens)
        assert len(s.output) == s.spec.output_tokens
        if s.output == ref:
            continue
        k = next(i for i, (a, b) in enumerate(zip(s.output, ref, strict=True)) if a != b)
        top = reference_logits(model, s.prompt + ref[:k]).topk(2).values
        gap = float(top[0] - top[1])
        assert gap < NEAR_TIE, f"request {s.spec.request_id} token {k}: {s.output[k]} vs {ref[k]}, gap {gap:.3g}"
