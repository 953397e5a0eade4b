"""Greedy tokens under continuous batching equal those of each request run alone (CPU, float32, the tiny preset):
both policies, preemption by recompute and by swap forced by a small pool, chunked prefills cut by a small token
budget (tests/serve_drive.py), driven iteration by iteration through the scheduler and in real time through the
loop, one iteration ahead (the next iteration's decode tokens fed from the device). "Alone" is kvscope's static
engine over a contiguous cache (prefill, then decode steps), batch 1.

Where a token differs, the test shows why it may: the reference's two best logits at that position must be a
near-tie (within NEAR_TIE of each other); the tokens before it must all be equal."""

from __future__ import annotations

import pytest
import torch
from serve_drive import CASES, check_ran, divergences, drive, drive_loop

from kvscope.engine.options import EngineOptions
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

CPU = torch.device("cpu")
NEAR_TIE = 1e-4  # logits of float32 maths that differ only in summation order
EAGER = EngineOptions(graphs=False, kernels=False)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = load_model(resolve_model("tiny"), CPU, torch.float32, seed=0)
    return m


@pytest.mark.parametrize("replayed", [False, True], ids=["eager", "replayed"])
@pytest.mark.parametrize("driver", [drive, drive_loop], ids=["scheduler", "loop-one-ahead"])
@pytest.mark.parametrize(("policy", "preempt", "n_blocks", "budget", "block"), CASES)
def test_tokens_equal_alone(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int,
                            block: int, driver: object, replayed: bool) -> None:
    """`replayed`: decode-only iterations through the graph-replay path (static buckets, padding rows), each
    bucket's forward run eagerly in place of its CUDA graph (serve_drive.EagerReplay)."""
    seqs = driver(model, policy, preempt, n_blocks, budget, block, EAGER, replayed)  # type: ignore[operator]
    check_ran(seqs, preempt, n_blocks)
    assert all(len(s.output) == s.spec.output_tokens for s in seqs)
    for s, k, ref, logits in divergences(model, seqs, EAGER):
        top = logits.topk(2).values
        gap = float(top[0] - top[1])
        assert gap < NEAR_TIE, f"request {s.spec.request_id} token {k}: {s.output[k]} vs {ref[k]}, gap {gap:.3g}"
