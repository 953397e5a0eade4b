"""ModelArgs: presets carry the published numbers; config.json in both spellings; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIGS

from kvscope.errors import KvscopeError
from kvscope.model.config import PRESETS, ModelArgs, RopeScaling
from kvscope.model.source import resolve_model
from kvscope.model.weights import empty_model

# Parameter counts of the published checkpoints (tied embeddings counted once).
PUBLISHED_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts(name: str) -> None:
    args = ModelArgs.from_preset(name)
    assert args.param_count() == PUBLISHED_PARAMS[name]
    model = empty_model(args, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_matches_transformers_model_of_its_config(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    args = ModelArgs.from_preset(name)
    cfg = args.to_hf_config()
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == args.param_count()
    assert ModelArgs.from_hf_config(args.to_hf_config(), name=name) == args


def test_qwen25_3b_numbers() -> None:
    a = PRESETS["qwen2.5-3b"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.n_rep) == (2048, 36, 16, 2, 128, 8)
    assert a.qkv_bias and a.tie_word_embeddings and not a.o_bias


def test_llama31_rope_scaling_and_head_dim() -> None:
    a = PRESETS["llama-3.1-8b"]
    assert a.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192) and a.head_dim == 128
    assert PRESETS["llama-3.2-1b"].head_dim == 64 and PRESETS["llama-3.2-1b"].rope_scaling.factor == 32.0


def test_both_rope_spellings_give_the_same_args() -> None:
    v4 = dict(TINY_CONFIGS["llama3-scaled"])
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert ModelArgs.from_hf_config(v4, name="x") == ModelArgs.from_hf_config(v5, name="x")
    assert ModelArgs.from_hf_config(v4, name="x").rope_theta == 500000.0


def test_tie_default_is_read_not_assumed() -> None:
    cfg = dict(TINY_CONFIGS["qwen2"])
    assert ModelArgs.from_hf_config(cfg).tie_word_embeddings is True
    del cfg["tie_word_embeddings"]
    assert ModelArgs.from_hf_config(cfg).tie_word_embeddings is False  # transformers' Qwen2Config default


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_bad_configs(change: dict, message: str) -> None:
    cfg = {**TINY_CONFIGS["llama"], **change}
    with pytest.raises(KvscopeError, match=message):
        ModelArgs.from_hf_config(cfg)


def test_missing_key_is_named() -> None:
    cfg = {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "hidden_size"}
    with pytest.raises(KvscopeError, match="lacks required key 'hidden_size'"):
        ModelArgs.from_hf_config(cfg)


def test_resolve_model_sources(tmp_path: Path) -> None:
    assert resolve_model("Qwen2.5-3B").kind == "preset"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIGS["mistral"]))
    src = resolve_model(str(cfg))
    assert src.kind == "config" and src.random_weights and src.args.family == "mistral"
    with pytest.raises(KvscopeError, match=r"has no \*\.safetensors weights"):
        resolve_model(str(tmp_path))
    with pytest.raises(KvscopeError, match="not found"):
        resolve_model(str(tmp_path / "absent"))
    with pytest.raises(KvscopeError, match="unknown preset 'llama-9'"):
        resolve_model("llama-9")


def test_gate_up_split_for_many_rows_equals_the_fused_product() -> None:
    """Prefill-sized inputs run gate and up as two products (contiguous outputs); same values as the fused one."""
    from kvscope.model.layers import SPLIT_GATE_UP_MIN_ROWS, FeedForward, apply_rope

    args = PRESETS["tiny"]
    ff = FeedForward(args)
    torch.nn.init.normal_(ff.w13.weight, std=0.05)
    x = torch.randn(SPLIT_GATE_UP_MIN_ROWS + 3, args.dim)  # (N, dim)
    gate, up = ff.w13(x).split(args.intermediate_size, dim=-1)
    torch.testing.assert_close(ff.hidden_act(x), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert ff.hidden_act(x[:4]).shape == (4, args.intermediate_size)
    # RoPE with cos 1 and sin 0 leaves a head bit for bit unchanged (the decode step's V heads)
    v = torch.randn(2, 1, 3, args.head_dim)
    assert torch.equal(apply_rope(v, torch.ones_like(v), torch.zeros_like(v)), v)


def test_dtype_names_and_device_default() -> None:
    from kvscope.engine.plan import parse_dtype

    assert parse_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert parse_dtype(None, torch.device("cpu")) is torch.float32 and parse_dtype(None) is torch.float32
    assert parse_dtype("bf16", torch.device("cpu")) is torch.bfloat16 and parse_dtype("Half") is torch.float16
    with pytest.raises(KvscopeError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


# ---- Mistral's sliding window, as transformers reads config.json -----------------------------------------------------
MISTRAL = {k: v for k, v in TINY_CONFIGS["mistral"].items() if k != "sliding_window"}


@pytest.mark.parametrize(("config", "window"), [
    ({**MISTRAL, "sliding_window": 4096}, 4096),  # Mistral-7B-v0.1
    (MISTRAL, 4096),  # absent: MistralConfig's default
    ({**MISTRAL, "sliding_window": None}, None),  # v0.2 / v0.3
    ({**MISTRAL, "sliding_window": 8.0}, 8),  # a number with no fraction is an integer
    (TINY_CONFIGS["qwen2"], None),  # sliding_window 128 with use_sliding_window false: unused
    ({**TINY_CONFIGS["llama"], "sliding_window": 16}, None),  # Llama has none; transformers ignores the key
])
def test_sliding_window_read_as_transformers_reads_it(config: dict, window: int | None) -> None:
    from transformers import AutoConfig

    args = ModelArgs.from_hf_config(config)
    assert args.sliding_window == window and type(args.sliding_window) is type(window)
    # transformers' reading, where it has one (LlamaConfig keeps a stray key its model never reads; 8.0 it refuses)
    if config["model_type"] != "llama" and not isinstance(config.get("sliding_window"), float):
        cfg = {k: v for k, v in config.items() if k != "architectures"}
        assert AutoConfig.for_model(cfg.pop("model_type"), **cfg).sliding_window == window
    # and back: the transformers-5 spelling kvscope builds references from says the same
    hf = args.to_hf_config()
    assert hf.get("sliding_window") == window and ModelArgs.from_hf_config(hf).sliding_window == window


def test_presets_keep_their_published_windows() -> None:
    assert PRESETS["mistral-7b"].sliding_window is None  # v0.3
    assert all(p.sliding_window is None for p in PRESETS.values())
    assert PRESETS["mistral-7b"].to_hf_config()["sliding_window"] is None  # not transformers' default 4096


@pytest.mark.parametrize(("value", "message"), [
    (0, r"hostile: sliding_window must be an integer in \[1, 2147483647\], got 0"),
    (-4096, r"hostile: sliding_window must be an integer in \[1, 2147483647\], got -4096"),
    ("4096", r"hostile: sliding_window must be an integer, got '4096'"),
    (True, r"hostile: sliding_window must be an integer, got true"),
    (4096.5, r"hostile: sliding_window must be an integer, got 4096.5"),
    (2**31, r"hostile: sliding_window must be an integer in \[1, 2147483647\], got 2147483648"),
])
def test_bad_sliding_window_is_one_line_naming_key_and_value(value: object, message: str) -> None:
    with pytest.raises(KvscopeError, match=message) as info:
        ModelArgs.from_hf_config({**MISTRAL, "sliding_window": value}, name="hostile")
    assert "\n" not in str(info.value)
    with pytest.raises(KvscopeError, match=r"model 'direct': sliding_window must be an integer"):
        ModelArgs("direct", "mistral", dim=64, n_layers=1, n_heads=4, n_kv_heads=4, intermediate_size=64,
                  vocab_size=64, max_position_embeddings=64, sliding_window=value if value != 0 else -1)


def test_qwen2_sliding_window_in_use_is_refused_in_one_line() -> None:
    with pytest.raises(KvscopeError, match=r"^hostile: use_sliding_window=true is not supported \(Qwen2's window "
                                           r"covers only the layers from max_window_layers on; kvscope runs "
                                           r"Mistral's, on every layer\)$"):
        ModelArgs.from_hf_config({**TINY_CONFIGS["qwen2"], "use_sliding_window": True}, name="hostile")
