"""The attention switch: `sdpa` (torch scaled_dot_product_attention) and `eager` (matmul, softmax, matmul).

Grouped-query attention without copying K/V: the query heads that share one KV head are laid out as extra query
rows of that head, `(B, H, S, D) -> (B, H_kv, n_rep * S, D)`, which matches the repeat-interleave grouping of the
Hugging Face checkpoints (KV head g serves query heads g*n_rep ... g*n_rep + n_rep - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("sdpa", "eager")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k{tuple(k.shape)} and v{tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{where}: q{tuple(q.shape)} does not fit k{tuple(k.shape)} (B, H, S, D) / (B, H_kv, S, D)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{where}: k and v need a unit stride on head_dim, got {k.stride()} / {v.stride()}")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """Causal attention of a fresh prompt. q: (B, H, S, D), k/v: (B, H_kv, S, D) -> (B, H, S, D).

    Prompts are right-padded: a valid query only sees positions at or before its own, which are all valid, so the
    causal mask alone is exact for them; outputs at padded positions are never read.
    """
    _check(q, k, v, "prefill_attention")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"prefill_attention: q{tuple(q.shape)} and k{tuple(k.shape)} differ in sequence length")
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if impl != "eager":
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    n_rep = h // h_kv
    qg = q.reshape(b, h_kv, n_rep * s, d)  # (B, H_kv, n_rep*S, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5  # (B, H_kv, n_rep*S, S)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril().repeat(n_rep, 1)  # (n_rep*S, S)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).reshape(b, h, s, d)  # (B, H, S, D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor | None,
                     impl: str) -> torch.Tensor:
    """One new query per sequence against the cache.

    q: (B, H, 1, D); k_cache/v_cache: (B, H_kv, L, D); key_mask: (B, 1, 1, L) bool, True where a position holds
    valid K/V, or None when all L positions of every sequence are valid. Returns (B, H, 1, D).
    """
    _check(q, k_cache, v_cache, "decode_attention")
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"decode_attention: q must hold one position, got q{tuple(q.shape)}")
    s_max = k_cache.shape[2]
    if key_mask is not None and (key_mask.shape != (b, 1, 1, s_max) or key_mask.dtype != torch.bool):
        raise ValueError(f"decode_attention: key_mask must be bool (B, 1, 1, L)=({b}, 1, 1, {s_max}), "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    h_kv = k_cache.shape[1]
    qg = q.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, n_rep, D)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=key_mask)  # (B, H_kv, n_rep, D)
    elif impl == "eager":
        scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * d**-0.5  # (B, H_kv, n_rep, S_max)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v_cache)  # (B, H_kv, n_rep, D)
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")
    return out.reshape(b, h, 1, d)  # (B, H, 1, D)
