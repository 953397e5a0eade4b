"""Architecture numbers of the Llama-family decoders kvscope runs (Llama 2/3, Qwen2/Qwen2.5, Mistral): torch-free.

`ModelArgs` (checked, with derived fields filled in `__post_init__`), its named presets, and its reading of a Hugging
Face `config.json` (both the transformers-4 and -5 spellings; the checked reading of each value:
`kvscope.model.config_values`). The `nn.Module`s are in `kvscope.model.layers`; run
budgets (batch, context, dtype, device) in `kvscope.engine.plan`. This module imports no torch, so the analysis
(kv-math, roofline) can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from kvscope.errors import KvscopeError
from kvscope.model.config_values import (
    MAX_SIZE,
    bool_key,
    check_int,
    check_positive,
    int_key,
    number_key,
    show_value,
    str_list,
)

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
_ARCHITECTURE_FAMILY = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# transformers' own defaults for `tie_word_embeddings` when a config.json leaves it out, per family.
_TIE_DEFAULT = {"llama": False, "qwen2": False, "mistral": False}
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# transformers' MistralConfig.sliding_window when config.json has no such key (Mistral-7B-v0.1's window)
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
_INT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings")
# RMSNorm adds eps in float32: a smaller eps is 0 there, and an all-zero row then normalises to NaN
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is `llama3` (Llama 3.1 / 3.2) or `linear`."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Architectural numbers of one decoder. Derived fields are filled in `__post_init__`."""

    name: str
    family: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    # Mistral's sliding window: a query at position p attends keys p - sliding_window + 1 .. p (exactly
    # `sliding_window` keys, itself included: transformers' `kv_idx > q_idx - sliding_window`); None: all of them
    sliding_window: int | None = None
    # derived
    n_rep: int = field(init=False)
    q_size: int = field(init=False)
    kv_size: int = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise KvscopeError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        what = f"model {self.name!r}"
        for name in _INT_FIELDS:
            object.__setattr__(self, name, check_int(getattr(self, name), f"{what}: {name}"))
        object.__setattr__(self, "head_dim", check_int(self.head_dim, f"{what}: head_dim (0: dim // n_heads)",
                                                        minimum=0))
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias"):
            if not isinstance(getattr(self, name), bool):
                raise KvscopeError(f"{what}: {name} must be true or false, got {show_value(getattr(self, name))}")
        if self.sliding_window is not None:
            object.__setattr__(self, "sliding_window", check_int(self.sliding_window, f"{what}: sliding_window"))
        object.__setattr__(self, "norm_eps", check_positive(self.norm_eps, f"{what}: norm_eps", _FLOAT32_TINY))
        object.__setattr__(self, "rope_theta", check_positive(self.rope_theta, f"{what}: rope_theta"))
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, f"{what}: rope_scaling")
        if self.n_heads % self.n_kv_heads:
            raise KvscopeError(
                f"model {self.name!r}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise KvscopeError(f"model {self.name!r}: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise KvscopeError(f"model {self.name!r}: head_dim={self.head_dim} must be even for RoPE")
        object.__setattr__(self, "n_rep", self.n_heads // self.n_kv_heads)
        object.__setattr__(self, "q_size", self.n_heads * self.head_dim)
        object.__setattr__(self, "kv_size", self.n_kv_heads * self.head_dim)
        fused = {"q + 2 kv rows (n_heads + 2 n_kv_heads) * head_dim": self.q_size + 2 * self.kv_size,
                 "gate + up rows 2 * intermediate_size": 2 * self.intermediate_size}
        for label, rows in fused.items():
            if rows > MAX_SIZE:
                raise KvscopeError(f"{what}: {label} = {rows} exceeds {MAX_SIZE}")
        # RoPE's angles at the last position, as the engine computes them (float32): each value above is finite and
        # positive, yet a base or factor near the float32 limits can still overflow them into inf, hence NaN logits.
        angles = rope_inv_freq_f32(self) * np.float32(self.max_position_embeddings - 1)
        if not bool(np.isfinite(angles).all()):
            scaling = "" if self.rope_scaling is None else f" with {self.rope_scaling.rope_type} factor " \
                f"{self.rope_scaling.factor:g}"
            raise KvscopeError(f"{what}: rope_theta={self.rope_theta:g}{scaling} gives RoPE angles that are not finite "
                               f"in float32 over {self.max_position_embeddings} positions (they would make NaN logits)")

    # ---- counts -------------------------------------------------------------------------------------------
    def param_count(self) -> int:
        """Exact number of parameters, tied embeddings counted once."""
        d, f = self.dim, self.intermediate_size
        qkv = d * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size if self.qkv_bias else 0)
        o = self.q_size * d + (d if self.o_bias else 0)
        layer = qkv + o + 3 * d * f + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.n_layers * layer + embed + head + d

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f_ in fields(self):
            value = getattr(self, f_.name)
            out[f_.name] = value.__dict__.copy() if isinstance(value, RopeScaling) else value
        return out

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> ModelArgs:
        key = name.lower()
        if key not in PRESETS:
            raise KvscopeError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "config") -> ModelArgs:
        """Read a Hugging Face `config.json` (transformers 4 or 5 spelling) of a supported family.

        Every value is checked for its JSON type before use: an integer field takes a JSON integer (or a number with
        no fraction, such as 64.0) within [1, MAX_SIZE], never a boolean, a string or a fraction; a flag takes true or
        false; a number is finite. A key that is absent or null takes transformers' default where it has one; a
        required key that is absent or null is refused. Every message names the config.json key and its value."""
        if not isinstance(config, dict):
            raise KvscopeError(f"{name}: config.json must hold a JSON object, got {show_value(config)}")
        family = _family_of(config, name)
        if config.get("hidden_act", "silu") != "silu":
            raise KvscopeError(f"{name}: hidden_act {show_value(config.get('hidden_act'))} is not supported "
                               "(only silu)")
        if bool_key(config, "mlp_bias", name, False):
            raise KvscopeError(f"{name}: mlp_bias=true is not supported")
        if family == "qwen2" and bool_key(config, "use_sliding_window", name, False):
            raise KvscopeError(f"{name}: use_sliding_window=true is not supported (Qwen2's window covers only the "
                               "layers from max_window_layers on; kvscope runs Mistral's, on every layer)")
        theta, scaling = _rope_from_config(config, name)
        n_heads = int_key(config, "num_attention_heads", name)
        attention_bias = bool_key(config, "attention_bias", name, False)
        return cls(
            name=name,
            family=family,
            dim=int_key(config, "hidden_size", name),
            n_layers=int_key(config, "num_hidden_layers", name),
            n_heads=n_heads,
            n_kv_heads=int_key(config, "num_key_value_heads", name, n_heads),
            intermediate_size=int_key(config, "intermediate_size", name),
            vocab_size=int_key(config, "vocab_size", name),
            max_position_embeddings=int_key(config, "max_position_embeddings", name, 2048),
            norm_eps=number_key(config, "rms_norm_eps", name, 1e-6, floor=_FLOAT32_TINY),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool_key(config, "tie_word_embeddings", name, _TIE_DEFAULT[family]),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family == "llama" else False,
            head_dim=int_key(config, "head_dim", name, 0),
            sliding_window=_sliding_window(config, family, name),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers-5 spelling of this architecture (used to build reference models in tests)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling.__dict__, "rope_theta": self.rope_theta}
        cfg: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [next(k for k, v in _ARCHITECTURE_FAMILY.items() if v == self.family)],
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.family == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if self.family == "mistral":  # spelled out: transformers' MistralConfig defaults an absent key to 4096
            cfg["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            raise KvscopeError(f"model {self.name!r}: a sliding window of {self.sliding_window} has no "
                               f"transformers spelling for family {self.family!r} (only mistral)")
        return cfg


# the dtypes kvscope runs a model in and their bytes per element, torch-free: kvscope.model.dtypes pairs them with
# torch's dtypes, model.source checks config.json's `torch_dtype` against them, kv-math sizes with them
RUN_DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(args: ModelArgs, itemsize: int) -> int:
    """Bytes of K and V of one token over all layers, at `itemsize` bytes per element: the one formula behind
    `KVCache.bytes_for` (what the engine allocates) and kv-math (what it predicts)."""
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * itemsize


# ---- config.json reading specific to ModelArgs ----------------------------------------------------------------
def _check_rope_scaling(s: RopeScaling, what: str) -> None:
    """Values that would make RoPE's frequencies NaN, infinite or zero are refused (they give NaN logits)."""
    if s.rope_type not in _SUPPORTED_ROPE_TYPES or s.rope_type == "default":
        raise KvscopeError(f"{what}: unsupported rope_type {show_value(s.rope_type)} (supported: llama3, linear; "
                           "no scaling is rope_scaling=None)")
    check_positive(s.factor, f"{what}: factor")
    if s.rope_type == "llama3":
        low = check_positive(s.low_freq_factor, f"{what}: low_freq_factor")
        high = check_positive(s.high_freq_factor, f"{what}: high_freq_factor")
        if not high > low:
            raise KvscopeError(f"{what}: high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
        check_int(s.original_max_position_embeddings, f"{what}: original_max_position_embeddings")


def _sliding_window(config: dict[str, Any], family: str, name: str) -> int | None:
    """Mistral's `sliding_window` as transformers reads it: an integer, null for none (v0.2, v0.3), absent for
    MistralConfig's default 4096 (v0.1's value). Qwen2 has one only with `use_sliding_window: true` (refused by the
    caller, as its window covers only some layers); Llama has none (a stray key is ignored, as transformers does)."""
    if family != "mistral":
        return None
    if "sliding_window" not in config:
        return MISTRAL_DEFAULT_SLIDING_WINDOW
    value = config["sliding_window"]
    return None if value is None else check_int(value, f"{name}: sliding_window")


def _family_of(config: dict[str, Any], name: str = "config") -> str:
    model_type = config.get("model_type")
    archs = str_list(config, "architectures", name)
    if isinstance(model_type, str) and model_type in SUPPORTED_FAMILIES:
        return model_type
    for arch in archs:
        if arch in _ARCHITECTURE_FAMILY:
            return _ARCHITECTURE_FAMILY[arch]
    shown = ",".join(archs).encode("unicode_escape").decode("ascii") or "none"  # escaped: stays one line
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    raise KvscopeError(
        f"unsupported architecture: model_type={show_value(model_type)}, architectures={shown}; "
        f"supported model_type: {', '.join(SUPPORTED_FAMILIES)}")


def _rope_from_config(config: dict[str, Any], name: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling: transformers 5 `rope_parameters`, or transformers 4 top-level
    `rope_theta` + `rope_scaling` (with `rope_type` or the older `type`). Each must be an object (or null)."""
    params = config.get("rope_parameters")
    for key, value in (("rope_parameters", params), ("rope_scaling", config.get("rope_scaling"))):
        if value is not None and not isinstance(value, dict):
            raise KvscopeError(f"{name}: {key} must be a JSON object or null, got {show_value(value)}")
    if params:
        theta_src, theta_prefix = (params, "rope_parameters.") if params.get("rope_theta") is not None else (config, "")
        scaling_src: dict[str, Any] | None = params
        prefix = "rope_parameters."
    else:
        theta_src, theta_prefix = config, ""
        scaling_src = config.get("rope_scaling")
        prefix = "rope_scaling."
    theta = number_key(theta_src, "rope_theta", name, 10000.0, prefix=theta_prefix)
    if not scaling_src:
        return theta, None
    rope_type = scaling_src.get("rope_type")
    if rope_type is None:
        rope_type = scaling_src.get("type")
    if rope_type is None or rope_type == "default":
        return theta, None
    if not isinstance(rope_type, str) or rope_type not in _SUPPORTED_ROPE_TYPES:
        raise KvscopeError(f"{name}: rope_type {show_value(rope_type)} is not supported (supported: llama3, linear)")
    if scaling_src.get("factor") is None:
        raise KvscopeError(f"{name}: rope scaling {rope_type!r} lacks 'factor'")
    factor = number_key(scaling_src, "factor", name, prefix=prefix)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    low = number_key(scaling_src, "low_freq_factor", name, 1.0, prefix=prefix)
    high = number_key(scaling_src, "high_freq_factor", name, 4.0, prefix=prefix)
    if not high > low:
        raise KvscopeError(f"{name}: {prefix}high_freq_factor ({show_value(high)}) must be greater than "
                           f"{prefix}low_freq_factor ({show_value(low)})")
    return theta, RopeScaling("llama3", factor, low, high,
                              int_key(scaling_src, "original_max_position_embeddings", name, 8192, prefix=prefix))


# ---- RoPE frequencies, for the finiteness check (the engine's tables: kvscope.model.layers.rope_inv_freq) ----------
def rope_inv_freq_f32(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) in float32 with the scaling applied, as numpy: the same formula as
    `kvscope.model.layers.rope_inv_freq`, used here only to refuse a config whose angles overflow float32."""
    d = args.head_dim
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        inv_freq = np.float32(1.0) / (np.float32(args.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) /
                                                                      np.float32(d)))
        s = args.rope_scaling
        if s is None:
            return inv_freq
        if s.rope_type == "linear":
            return inv_freq / np.float32(s.factor)
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)


_LLAMA31_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_SCALING = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def _qwen25(name: str, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, intermediate_size: int,
            vocab_size: int = 151936, tied: bool = True) -> ModelArgs:
    """Qwen2.5 family: q/k/v bias, rope_theta 1e6, eps 1e-6, 32k context."""
    return ModelArgs(name, "qwen2", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     intermediate_size=intermediate_size, vocab_size=vocab_size, max_position_embeddings=32768,
                     norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=tied, qkv_bias=True)


def _llama3(name: str, dim: int, n_layers: int, n_heads: int, intermediate_size: int, scaling: RopeScaling,
            tied: bool, head_dim: int = 0) -> ModelArgs:
    """Llama 3.1 / 3.2 family: 8 KV heads, 128k vocabulary and context, rope_theta 5e5 with llama3 scaling."""
    return ModelArgs(name, "llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8,
                     intermediate_size=intermediate_size, vocab_size=128256, max_position_embeddings=131072,
                     norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=scaling, tie_word_embeddings=tied,
                     head_dim=head_dim)


# Architectural numbers of the published checkpoints (their config.json); weights are random when built from these.
PRESETS: dict[str, ModelArgs] = {
    p.name: p
    for p in (
        ModelArgs("tiny", "llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160,
                  vocab_size=512, max_position_embeddings=2048, norm_eps=1e-5, rope_theta=10000.0),
        _qwen25("qwen2.5-0.5b", 896, 24, 14, 2, 4864),
        _qwen25("qwen2.5-1.5b", 1536, 28, 12, 2, 8960),
        _qwen25("qwen2.5-3b", 2048, 36, 16, 2, 11008),
        _qwen25("qwen2.5-7b", 3584, 28, 28, 4, 18944, vocab_size=152064, tied=False),
        _llama3("llama-3.2-1b", 2048, 16, 32, 8192, _LLAMA32_SCALING, tied=True, head_dim=64),
        _llama3("llama-3.2-3b", 3072, 28, 24, 8192, _LLAMA32_SCALING, tied=True, head_dim=128),
        _llama3("llama-3.1-8b", 4096, 32, 32, 14336, _LLAMA31_SCALING, tied=False),
        # Mistral-7B-v0.3: 32768-token vocabulary, rope_theta 1e6, no sliding window.
        ModelArgs("mistral-7b", "mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                  vocab_size=32768, max_position_embeddings=32768, norm_eps=1e-5, rope_theta=1_000_000.0),
    )
}
