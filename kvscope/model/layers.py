"""The decoder's `nn.Module`s and RoPE in torch: RMSNorm, grouped-query attention projections, SwiGLU.

The projections are fused at load time: `wqkv` holds q, k and v stacked along the output dimension, `w13` holds the
gate and up projections, so a decoder layer runs four matrix products instead of seven. Architecture numbers:
`kvscope.model.config`; weights: `kvscope.model.weights`; the loop that drives the modules: `kvscope.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvscope.model.config import ModelArgs


# ---- RoPE -------------------------------------------------------------------------------------------------------
def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with Llama 3.1 or linear scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


# ---- RoPE tables and rotation ----------------------------------------------------------------------------------
def rope_tables(args: ModelArgs, max_seq: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables `cos` and `sin_rot`, each (max_seq, head_dim), computed in float32 and stored in `dtype`.

    `sin_rot` carries the sign of rotate-half: its first half is -sin, its second +sin, so that
    rotate_half(x) * sin == swap_halves(x) * sin_rot (see `apply_rope`).
    """
    inv_freq = rope_inv_freq(args).to(device)
    pos = torch.arange(max_seq, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (S, D/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)  # (S, D)
    sin_rot = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (S, D)
    return cos.to(dtype), sin_rot.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in three kernels: x * cos + swap_halves(x) * sin_rot (one multiply, one copy, one addcmul).

    x: (..., D); cos and sin_rot broadcast against x. A head whose cos is 1 and sin_rot 0 passes through unchanged
    (bit for bit), which lets a decode step run RoPE over q, k and v heads in one go.
    """
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)  # (..., D): [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_rot)


def linear_residual_(h: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """h += linear(x), in place, as one matrix multiply with beta=1 (no separate add kernel).

    h: (N, out), x: (N, in), both 2-D views; returns h.
    """
    if h.dim() != 2 or x.dim() != 2 or h.shape[0] != x.shape[0] or h.shape[1] != linear.out_features \
            or x.shape[1] != linear.in_features:
        raise ValueError(f"linear_residual_: h{tuple(h.shape)} += x{tuple(x.shape)} @ "
                         f"W({linear.out_features}, {linear.in_features})^T does not fit")
    h.addmm_(x, linear.weight.t())
    if linear.bias is not None:
        h.add_(linear.bias)
    return h


# rows (tokens) from which the MLP runs gate and up as two products (see FeedForward.hidden_act)
SPLIT_GATE_UP_MIN_ROWS = 256


# ---- modules ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm as torch's fused kernel (one launch on CUDA): statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Projections of grouped-query attention; the attention itself is done by the engine's attention switch."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, args.q_size + 2 * args.kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(args.q_size, args.dim, bias=args.o_bias)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, dim) -> (B, S, H + 2*H_kv, D): query heads, then key heads, then value heads."""
        a = self.args
        b, s, _ = x.shape
        return self.wqkv(x).view(b, s, a.n_heads + 2 * a.n_kv_heads, a.head_dim)  # (B, S, H+2H_kv, D)


class FeedForward(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matrix `w13`; the engine runs
    `w2(hidden_act(x))` with the residual folded into the down product (`linear_residual_`)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def hidden_act(self, x: torch.Tensor,
                   silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, dim) -> silu(gate) * up, (N, F). `silu_mul(gate, up)`: a fused kernel for the product (one pass over
        gate and up, strided or not); None: torch's SiLU and multiply.

        Few rows (decode): one fused gate/up product, then two elementwise kernels on its strided halves. Many rows
        (prefill): two products into contiguous outputs, because torch's elementwise kernels only vectorise
        contiguous tensors; on the strided halves they fall back to a slower kernel (the 4,096-token prefill went from
        64.2% to 67.3% of the calibrated matmul rate with this and the RoPE change, docs/benchmarks.md)."""
        if x.shape[0] >= SPLIT_GATE_UP_MIN_ROWS:
            w = self.w13.weight  # (2F, dim): gate rows, then up rows
            gate = F.linear(x, w[:self.hidden])  # (N, F), contiguous
            up = F.linear(x, w[self.hidden:])  # (N, F), contiguous
            return silu_mul(gate, up) if silu_mul is not None else F.silu(gate, inplace=True).mul_(up)
        gate, up = self.w13(x).split(self.hidden, dim=-1)  # (N, F) each, strided views
        return silu_mul(gate, up) if silu_mul is not None else F.silu(gate) * up


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)


class Embedding(nn.Embedding):
    """`nn.Embedding` without its random draw at construction: kvscope builds the modules on the meta device and
    fills every weight itself (`kvscope.model.weights`). A normal draw on a meta tensor would import torch's Python
    meta kernels (torch._dynamo among some 800 modules); imported inside a tensor-parallel rank, they hold the
    process group alive past `destroy_process_group`, and its gloo threads then abort the exiting interpreter."""

    def reset_parameters(self) -> None:
        pass


class Transformer(nn.Module):
    """Embedding, decoder blocks, final norm and lm_head. The engine walks `layers` itself."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
