"""The served engine on the GPU (marked `gpu`): continuous batching in bfloat16 with kvscope's kernels and the
decode-only CUDA graphs (paged split-KV attention over block tables, RoPE + K/V write through slots), against each
request run alone through the static engine (contiguous cache, graphs and kernels, `--attn kvscope`).

How "equal where bf16 allows" is judged: a request's tokens must equal the reference's up to the first difference,
and at that first difference the reference's two best logits (float32 of the bf16 logits) must lie within
BF16_NEAR_TIE of each other: two bf16 units at the logits' magnitude (the served and static paths sum the same
products in different orders: chunks against whole prompts, split-KV over other split counts). The test also
requires most requests to match exactly (MIN_EXACT_SHARE), so that a systematic error cannot hide as near-ties."""

from __future__ import annotations

import pytest
import torch
from serve_drive import CASES, check_ran, divergences, drive, drive_loop

from kvscope.engine.options import EngineOptions
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

pytestmark = pytest.mark.gpu
MIN_EXACT_SHARE = 0.5
FAST = EngineOptions(graphs=True, kernels=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = load_model(resolve_model("qwen2.5-0.5b"), torch.device("cuda"), torch.bfloat16, seed=0)
    return m


def near_tie(logits: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(2).values
    unit = 2.0 ** (torch.floor(torch.log2(top[0].abs().clamp_min(1e-3))).item() - 7)  # bf16 spacing at the top
    return float(top[0] - top[1]), 2 * unit


@pytest.mark.parametrize("driver", [drive, drive_loop], ids=["scheduler", "loop-one-ahead"])
@pytest.mark.parametrize(("policy", "preempt", "n_blocks", "budget", "block"), CASES)
def test_tokens_equal_alone_bf16(model: torch.nn.Module, policy: str, preempt: str, n_blocks: int, budget: int,
                                 block: int, driver: object) -> None:
    seqs = driver(model, policy, preempt, n_blocks, budget, block, FAST)  # type: ignore[operator]
    check_ran(seqs, preempt, n_blocks)
    differ = divergences(model, seqs, FAST, "kvscope")
    for s, k, ref, logits in differ:
        gap, tol = near_tie(logits)
        assert gap <= tol, f"request {s.spec.request_id} token {k}: {s.output[k]} vs {ref[k]}, top-2 gap {gap:.4g}"
    exact = len(seqs) - len(differ)
    assert exact >= MIN_EXACT_SHARE * len(seqs), f"only {exact} of {len(seqs)} requests equal alone"
