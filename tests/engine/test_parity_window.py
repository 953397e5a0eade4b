"""Mistral's sliding window against transformers, float32 on the CPU: a tiny Mistral whose window (8 positions) the
prompts and decodes run well past, random weights shared between transformers' MistralForCausalLM and kvscope, a
ragged batch, `sdpa` and `eager`. A query at position p sees keys p - 7 .. p (transformers' `kv_idx > q_idx -
sliding_window`); the same weights without the window give other logits once the context passes it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY_CONFIGS, hf_last_logits, hf_model, ours_from_hf, rel_err

from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig
from kvscope.model.config import ModelArgs

DEVICE = torch.device("cpu")
FAMILY = "mistral-window"
WINDOW = TINY_CONFIGS[FAMILY]["sliding_window"]
LOGIT_RTOL = 1e-4  # test_parity.py's
PROMPTS = [[5, 17, 42, 3, 99], [11, 250, 7, 64, 4, 8, 15, 16, 23, 42, 108, 1],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 77, 31, 44, 150, 2, 19, 88, 123, 6]]  # 5, 12, 19 positions
STEPS = 20


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    model = hf_model(TINY_CONFIGS[FAMILY], seed=7)
    assert model.config.sliding_window == WINDOW == 8
    return model


def _engine(hf: torch.nn.Module, args: ModelArgs, attn: str) -> Engine:
    max_seq = max(map(len, PROMPTS)) + STEPS + 1
    return Engine(ours_from_hf(hf, args, DEVICE), RunConfig(len(PROMPTS), max_seq, torch.float32, DEVICE, attn))


def _errors_per_step(engine: Engine, hf: torch.nn.Module) -> list[list[float]]:
    """Prefill the ragged batch, decode STEPS steps; per step and sequence, the relative error of our logits against
    transformers' full forward over the same tokens (ours' greedy tokens fed to both)."""
    tokens, lengths = pad_prompts(PROMPTS, engine.args.vocab_size, DEVICE)
    engine.prefill(tokens, lengths)
    ids = [list(p) for p in PROMPTS]
    errs = []
    for step in range(STEPS + 1):
        row = []
        for b, seq in enumerate(ids):
            ref = hf_last_logits(hf, seq)
            row.append(rel_err(engine.logits[b], ref))
            seq.append(int(engine.next_tokens[b]))
        errs.append(row)
        if step < STEPS:
            engine.decode_step()
    return errs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ragged_batch_past_the_window_matches_transformers(hf: torch.nn.Module, attn: str) -> None:
    args = ModelArgs.from_hf_config(TINY_CONFIGS[FAMILY], name=FAMILY)
    assert args.sliding_window == WINDOW
    engine = _engine(hf, args, attn)
    errs = _errors_per_step(engine, hf)
    worst = max(max(row) for row in errs)
    assert worst < LOGIT_RTOL, f"{attn}: worst rel err {worst:.2e} over {len(errs)} steps"
    assert engine.cache.host_lengths == [len(p) + STEPS for p in PROMPTS]  # every sequence well past the window


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_equal_transformers_generate_past_the_window(hf: torch.nn.Module, attn: str) -> None:
    """transformers' own loop (its sliding-window cache) for each prompt alone; ours for the ragged batch."""
    args = ModelArgs.from_hf_config(TINY_CONFIGS[FAMILY], name=FAMILY)
    ours = _engine(hf, args, attn).generate(PROMPTS, STEPS)
    for prompt, row in zip(PROMPTS, ours, strict=True):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                          max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        assert row == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_window_ignored_gives_other_logits_past_it(hf: torch.nn.Module, attn: str) -> None:
    """The same weights with the window dropped (what kvscope computed before it read `sliding_window`): equal while
    a sequence's context fits the window, far off once it passes it."""
    args = dataclasses.replace(ModelArgs.from_hf_config(TINY_CONFIGS[FAMILY], name=FAMILY), sliding_window=None)
    errs = _errors_per_step(_engine(hf, args, attn), hf)
    # sequence 0: 5 prompt positions, so its first 4 logits (contexts 5 .. 8) see no more than the window
    assert max(row[0] for row in errs[:WINDOW - len(PROMPTS[0]) + 1]) < LOGIT_RTOL
    assert errs[0][2] > 100 * LOGIT_RTOL  # 19 positions at the prefill already
    assert min(row[b] for row in errs[-5:] for b in range(3)) > 100 * LOGIT_RTOL
