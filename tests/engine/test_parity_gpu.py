"""GPU parity with transformers (marked `gpu`, skipped without CUDA) on a qwen2.5-0.5b-shaped model: float32 greedy
tokens and bfloat16 logits, kernels on and off; and on a small Mistral with a sliding window that ragged prompts and
decodes run past, every attention path (`sdpa`: masked in float32, flash's window in bfloat16; `eager`; `kvscope`'s
kernel; CUDA graphs). The engine's own GPU checks (graph capture, graphs on and off, no
hidden sync, the large presets): tests/engine/test_engine.py."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, hf_to, ours_from_hf, rel_err
from torch.nn.attention import sdpa_kernel

from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import DECODE_SDPA_BACKENDS, Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.model.config import PRESETS, ModelArgs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PROMPT = [151, 9906, 11, 1879, 0, 374, 264, 1273, 315, 279, 12850, 13, 576, 6722, 315, 9625]


def _hf_of(args: ModelArgs, attn: str = "eager") -> torch.nn.Module:
    """The transformers reference on the GPU in float32, at the scale of our own random init (std 0.02, norm
    weights 1)."""
    return hf_model(args, seed=11, device=CUDA, attn=attn, std=0.02, norm_jitter=0.0)


def _ours_from(hf: torch.nn.Module, args: ModelArgs, dtype: torch.dtype, max_seq: int, kernels: bool = False
               ) -> Engine:
    return Engine(ours_from_hf(hf, args, CUDA, dtype), RunConfig(1, max_seq, dtype, CUDA, "sdpa"),
                  options=EngineOptions(kernels=kernels))


@pytest.fixture(scope="module")
def qwen05_fp32() -> torch.nn.Module:
    return _hf_of(PRESETS["qwen2.5-0.5b"])


@pytest.mark.parametrize("kernels", [False, True])
def test_fp32_greedy_tokens_equal_transformers_32_steps(qwen05_fp32: torch.nn.Module, kernels: bool) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32
    args = PRESETS["qwen2.5-0.5b"]
    steps = 32
    ours = _ours_from(qwen05_fp32, args, torch.float32, len(PROMPT) + steps, kernels).generate([PROMPT], steps)[0]
    x = torch.tensor([PROMPT], device=CUDA)  # PROMPT holds id 0: pass the mask, or generate takes 0 for padding
    ref = qwen05_fp32.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == ref[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("kernels", [False, True])
def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(qwen05_fp32: torch.nn.Module, kernels: bool) -> None:
    """Same weights as the float32 reference, rounded to bfloat16. Transformers in bfloat16 (its own prefill and
    cached decode, sdpa attention) sets the noise floor: its error against float32. Ours against float32 stays within
    1.25x of that floor, and ours against transformers bf16 below it. (Our fused RMSNorm, RoPE addcmul and residual
    matmuls round once where transformers rounds twice, so the bf16 logits are not bit-identical.)"""
    args = PRESETS["qwen2.5-0.5b"]
    hf = _hf_of(args, "sdpa")
    hf.load_state_dict(qwen05_fp32.state_dict())
    hf = hf_to(hf, torch.bfloat16)
    eng = _ours_from(hf, args, torch.bfloat16, len(PROMPT) + 9, kernels)
    eng.prefill(*pad_prompts([PROMPT], args.vocab_size, CUDA))
    errs, floor, ours_fp32 = [], [], []
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT], device=CUDA), use_cache=True)
        ids = list(PROMPT)
        for _ in range(8):
            ref = out.logits[0, -1].float()
            exact = qwen05_fp32(torch.tensor([ids], device=CUDA)).logits[0, -1]
            errs.append(rel_err(eng.logits[0].float(), ref))
            floor.append(rel_err(ref, exact))
            ours_fp32.append(rel_err(eng.logits[0].float(), exact))
            tok = int(eng.next_tokens[0])
            ids.append(tok)
            eng.decode_step()
            with sdpa_kernel(DECODE_SDPA_BACKENDS):  # the attention kernels our decode steps use
                out = hf(torch.tensor([[tok]], device=CUDA), past_key_values=out.past_key_values, use_cache=True)
    print(f"kernels {kernels}: bf16 rel err per step vs transformers bf16: {[f'{e:.1e}' for e in errs]}; vs fp32: max "
          f"{max(ours_fp32):.2e}; transformers bf16 vs fp32: max {max(floor):.2e}")
    assert max(ours_fp32) <= 1.25 * max(floor)
    assert max(errs) < max(floor)


# ---- Mistral's sliding window: every attention path against transformers' MistralForCausalLM -------------------------
WINDOW_ARGS = ModelArgs("mistral-window-gpu", "mistral", dim=512, n_layers=4, n_heads=8, n_kv_heads=2,
                        intermediate_size=1024, vocab_size=2048, max_position_embeddings=512, rope_theta=1e6,
                        sliding_window=24)  # head_dim 64: a head size kvscope's kernel is built for
WINDOW_PROMPTS = [[(37 * i + 11) % 2048 for i in range(41)], [(91 * i + 5) % 2048 for i in range(13)]]  # 41, 13
WINDOW_STEPS = 32
# (attn, kernels, graphs): the masked path eager and static, flash (bf16), kvscope's kernel eager and graphed
WINDOW_PATHS = [("sdpa", False, False), ("eager", False, False), ("sdpa", True, True), ("kvscope", True, False),
                ("kvscope", True, True)]


@pytest.fixture(scope="module")
def mistral_window_fp32() -> torch.nn.Module:
    hf = _hf_of(WINDOW_ARGS)
    assert hf.config.sliding_window == 24
    return hf


def _window_engine(hf: torch.nn.Module, dtype: torch.dtype, attn: str, kernels: bool, graphs: bool) -> Engine:
    max_seq = max(map(len, WINDOW_PROMPTS)) + WINDOW_STEPS + 1
    return Engine(ours_from_hf(hf, WINDOW_ARGS, CUDA, dtype), RunConfig(2, max_seq, dtype, CUDA, attn),
                  options=EngineOptions(kernels=kernels, graphs=graphs))


@pytest.mark.parametrize(("attn", "kernels", "graphs"), WINDOW_PATHS)
def test_window_fp32_greedy_tokens_equal_transformers(mistral_window_fp32: torch.nn.Module, attn: str,
                                                      kernels: bool, graphs: bool) -> None:
    """A ragged batch (41 and 13 prompt positions, window 24) decoded 32 steps: each row the tokens of
    transformers' own generate (its sliding-window cache) for that prompt alone."""
    ours = _window_engine(mistral_window_fp32, torch.float32, attn, kernels, graphs).generate(WINDOW_PROMPTS,
                                                                                             WINDOW_STEPS)
    for prompt, row in zip(WINDOW_PROMPTS, ours, strict=True):
        x = torch.tensor([prompt], device=CUDA)
        ref = mistral_window_fp32.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=WINDOW_STEPS,
                                           min_new_tokens=WINDOW_STEPS, do_sample=False, pad_token_id=0,
                                           eos_token_id=None)
        assert row == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize(("attn", "kernels", "graphs"), WINDOW_PATHS)
def test_window_bf16_logits_as_close_to_fp32_as_transformers_bf16(mistral_window_fp32: torch.nn.Module, attn: str,
                                                                  kernels: bool, graphs: bool) -> None:
    """Same weights rounded to bfloat16, the ragged batch past the window: per step and sequence, ours against the
    float32 reference stays within 1.25x of transformers bf16's own error against it (its full forward over the
    same tokens, sdpa), the noise floor; ours' greedy tokens are fed to all three."""
    hf = _hf_of(WINDOW_ARGS, "sdpa")
    hf.load_state_dict(mistral_window_fp32.state_dict())
    hf = hf_to(hf, torch.bfloat16)
    eng = _window_engine(hf, torch.bfloat16, attn, kernels, graphs)
    eng.prefill(*pad_prompts(WINDOW_PROMPTS, WINDOW_ARGS.vocab_size, CUDA))
    ids = [list(p) for p in WINDOW_PROMPTS]
    ours_fp32, floor = [], []
    with torch.no_grad():
        for step in range(WINDOW_STEPS + 1):
            for b, seq in enumerate(ids):
                x = torch.tensor([seq], device=CUDA)
                exact = mistral_window_fp32(x).logits[0, -1]
                floor.append(rel_err(hf(x).logits[0, -1].float(), exact))
                ours_fp32.append(rel_err(eng.logits[b].float(), exact))
                seq.append(int(eng.next_tokens[b]))
            if step < WINDOW_STEPS:
                eng.decode_step()
    print(f"{attn} kernels {kernels} graphs {graphs}: bf16 rel err vs fp32 max {max(ours_fp32):.2e}; transformers "
          f"bf16 vs fp32: max {max(floor):.2e}")
    assert max(ours_fp32) <= 1.25 * max(floor)
