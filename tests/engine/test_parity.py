"""kvscope's loop against transformers, float32 on the CPU, for a tiny random model of each family."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, hf_last_logits, hf_model, ours_from_hf, rel_err

from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig
from kvscope.model.config import ModelArgs

DEVICE = torch.device("cpu")
STEPS = 16
LOGIT_RTOL = 1e-4


def _ours(family: str, hf: torch.nn.Module, batch: int, max_seq: int, attn: str) -> Engine:
    model = ours_from_hf(hf, ModelArgs.from_hf_config(TINY_CONFIGS[family], name=family), DEVICE)
    return Engine(model, RunConfig(batch, max_seq, torch.float32, DEVICE, attn))


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, hf_model(TINY_CONFIGS[request.param], seed=7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_and_decode_logits_match_transformers(family, attn: str) -> None:
    name, hf = family
    prompt = [5, 17, 42, 3, 99, 11, 250, 7, 64]
    engine = _ours(name, hf, 1, len(prompt) + STEPS + 1, attn)
    tokens, lengths = pad_prompts([prompt], engine.args.vocab_size, DEVICE)
    ids = list(prompt)
    engine.prefill(tokens, lengths)
    for step in range(STEPS + 1):
        ref = hf_last_logits(hf, ids)
        ours = engine.logits[0]
        assert rel_err(ours, ref) < LOGIT_RTOL, f"{name}/{attn}: step {step} rel err {rel_err(ours, ref):.2e}"
        ours_tok = int(engine.next_tokens[0])
        assert ours_tok == int(ref.argmax()), f"{name}/{attn}: greedy token differs at step {step}"
        ids.append(ours_tok)
        if step < STEPS:
            engine.decode_step()
    assert engine.cache.host_lengths == [len(prompt) + STEPS]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ragged_batch_equals_each_prompt_alone(family, attn: str) -> None:
    name, hf = family
    prompts = [[1, 2, 3, 4, 5, 6, 7], [200, 13], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 77]]
    new = 12
    batch = _ours(name, hf, 3, 11 + new, attn).generate(prompts, new)
    alone = [_ours(name, hf, 1, len(p) + new, attn).generate([p], new)[0] for p in prompts]
    assert batch == alone
    assert all(len(row) == new for row in batch)


def test_greedy_tokens_match_transformers_generate(family) -> None:
    """Same tokens as transformers' own greedy generate (its cache, its loop)."""
    name, hf = family
    prompt = [4, 8, 15, 16, 23, 42]
    ours = _ours(name, hf, 1, len(prompt) + STEPS, "sdpa").generate([prompt], STEPS)[0]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                      pad_token_id=0, eos_token_id=None)
    assert ours == out[0, len(prompt):].tolist()
