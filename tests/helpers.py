"""Shared helpers of the tests (and of benchmarks/decode_vs_hf.py): tiny configs of each family, the transformers
reference model built from a config and kvscope's model holding its weights."""

from __future__ import annotations

from typing import Any

import torch

from kvscope.model.config import ModelArgs
from kvscope.model.layers import Transformer
from kvscope.model.weights import empty_model, load_hf_tensors

# Tiny random configs, one per family and spelling. Sizes are odd on purpose (head_dim 16, GQA 4:2, 3:1).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # transformers-4 spelling: top-level rope_theta + rope_scaling with the old "type" key
    "llama3-scaled": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        "tie_word_embeddings": True,
    },
    # transformers-5 spelling: rope_parameters; Qwen2 has q/k/v bias and here tied embeddings
    "qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 48, "intermediate_size": 80,
        "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 300,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 128,
    },
    "mistral": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 8, "vocab_size": 280, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "hidden_act": "silu", "sliding_window": None, "tie_word_embeddings": False,
    },
    # Mistral v0.1's sliding window, small: every query sees its last 8 positions (itself included), so the parity
    # tests' prompts and decodes run past it
    "mistral-window": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 8, "vocab_size": 280, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "hidden_act": "silu", "sliding_window": 8, "tie_word_embeddings": False,
    },
}


def hf_model(config: dict[str, Any] | ModelArgs, seed: int = 0, *, device: str | torch.device = "cpu",
             attn: str = "eager", std: float = 0.05, norm_jitter: float = 0.1) -> torch.nn.Module:
    """The transformers reference of `config` (a config.json dict, or ModelArgs in its transformers-5 spelling),
    built on `device` in float32 under `torch.manual_seed(seed)`, every parameter random: norm weights
    1 + norm_jitter * N(0, 1) (exactly 1 with norm_jitter 0), all others N(0, std), biases too. Another dtype:
    `hf_to`; our model with the same weights: `ours_from_hf`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = config.to_hf_config() if isinstance(config, ModelArgs) else dict(config)
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and norm_jitter:
                p.copy_(1.0 + norm_jitter * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return model.eval()


def hf_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' model in `dtype`, its RoPE inverse frequencies kept in float32 as `from_pretrained` keeps them
    (a plain `.to(bfloat16)` also rounds those buffers, which moves every angle)."""
    model = model.to(dtype)
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            fresh = type(mod)(mod.config).to(mod.inv_freq.device)
            mod.inv_freq, mod.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    return model


def ours_from_hf(hf: torch.nn.Module, args: ModelArgs, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """kvscope's model of `args` on `device` in `dtype`, holding the weights of the transformers model `hf`."""
    model = empty_model(args, device, dtype)
    load_hf_tensors(model, hf.state_dict().items())
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm())


@torch.no_grad()
def hf_last_logits(model: torch.nn.Module, ids: list[int], device: str = "cpu") -> torch.Tensor:
    """Reference logits at the last position of `ids`: a full forward, no cache (V,)."""
    out = model(torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0, -1]
