"""The attention switch: `sdpa` (torch scaled_dot_product_attention), `eager` (matmul, softmax, matmul) and
`kvscope` (decode steps through kvscope's split-KV kernel, `kvscope.kernels.decode_attention.split_kv_decode`, which
the engine calls itself; prefills as `sdpa`).

Grouped-query attention without copying K/V: the query heads that share one KV head are laid out as extra query
rows of that head, `(B, H, S, D) -> (B, H_kv, n_rep * S, D)`, which matches the repeat-interleave grouping of the
Hugging Face checkpoints (KV head g serves query heads g*n_rep ... g*n_rep + n_rep - 1).

A sliding window W (Mistral's `sliding_window`, `ModelArgs.sliding_window`) restricts the query at position p to the
keys p - W + 1 .. p, exactly W keys with itself (transformers' `kv_idx > q_idx - sliding_window`), in prefill
(`prefill_mask`) and decode (`DecodeMeta.start`, `key_mask`, `window`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("sdpa", "eager", "kvscope")


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


def prefill_mask(s: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The (S, S) bool mask of a prompt of S positions under a sliding window: True where query i sees key j,
    i - window < j <= i. None when the window covers the prompt (`window` None or >= S): the causal mask alone."""
    if window is None or window >= s:
        return None
    if window < 1:
        raise ValueError(f"prefill_mask: window {window} must be >= 1")
    return torch.ones(s, s, dtype=torch.bool, device=device).tril().triu(1 - window)  # (S, S)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a fresh prompt. q: (B, H, S, D), k/v: (B, H_kv, S, D) -> (B, H, S, D). `mask`: the
    (S, S) bool mask of a sliding window (`prefill_mask`), which replaces the causal one; None: causal.

    Prompts are right-padded: a valid query only sees positions at or before its own, which are all valid, so the
    causal mask alone is exact for them; outputs at padded positions are never read.
    """
    _check(q, k, v, "prefill_attention")
    b, h, s, d = q.shape
    if k.shape[2] != s:
        raise ValueError(f"prefill_attention: q{tuple(q.shape)} and k{tuple(k.shape)} differ in sequence length")
    if mask is not None and (mask.shape != (s, s) or mask.dtype != torch.bool):
        raise ValueError(f"prefill_attention: mask must be bool ({s}, {s}), got {mask.dtype} {tuple(mask.shape)}")
    if impl in ("sdpa", "kvscope"):  # kvscope's kernel is for decode steps; its prefill is torch's
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if impl != "eager":
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")
    h_kv = k.shape[1]
    n_rep = h // h_kv
    qg = q.reshape(b, h_kv, n_rep * s, d)  # (B, H_kv, n_rep*S, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5  # (B, H_kv, n_rep*S, S)
    if mask is None:
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # (S, S)
    scores = scores.masked_fill(~mask.repeat(n_rep, 1), float("-inf"))  # (n_rep*S, S) rows of each KV head
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).reshape(b, h, s, d)  # (B, H, S, D)


@dataclass
class DecodeMeta:
    """What every layer's decode attention of one step shares, built once per step by the engine.

    span: key positions the masked path reads up to (host int): the whole cache when captured in a graph, else the
    longest valid prefix. start: the first position it reads (host int, 0 unless a sliding window leaves every
    sequence's earlier keys out). key_mask: (B, 1, 1, span - start) bool, True where a key is valid (at or before
    the sequence's position, and within its window), or None when all are.
    seqused: (B,) int32 valid keys per sequence, the new token included, on the flash path (else None), with
    cu_q = [0, 1, ..., B] and cu_k = [0, S, 2S, ..., B*S] (int32) describing the cache as varlen sequences;
    window: the sliding window flash applies to them (the last `window` of the seqused keys), None: all.
    kv_lengths: (B,) int64 valid keys per sequence, the new token included, on the `kvscope` path (else None).
    """

    span: int
    start: int = 0
    key_mask: torch.Tensor | None = None
    seqused: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    kv_lengths: torch.Tensor | None = None
    window: int | None = None


def flash_decode_ok(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decode attention runs as flash attention over the cache in place (varlen, lengths on the device):
    the `sdpa` switch on CUDA in fp16/bf16 with a head_dim flash supports."""
    return (impl == "sdpa" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
                     impl: str) -> torch.Tensor:
    """One new query per sequence against the cache.

    q: (B, H, D); k_cache/v_cache: (B, S_max, H_kv, D), one layer of the token-major cache. Returns (B, H, D).
    With `meta.seqused` set: flash attention (one split-KV kernel and its combine) reading each sequence's first
    seqused[b] keys (the last `meta.window` of them with a window), no mask, fixed shapes (capturable in a CUDA
    graph). Otherwise the masked path over keys `meta.start` .. `meta.span` - 1: torch SDPA or eager
    matmul-softmax-matmul, GQA as extra query rows of each KV head.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q must be (B, H, D) and k/v caches (B, S, H_kv, D), got "
                         f"q{tuple(q.shape)} k{tuple(k_cache.shape)} v{tuple(v_cache.shape)}")
    b, h, d = q.shape
    _, s_max, h_kv, _ = k_cache.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or h % h_kv:
        raise ValueError(f"decode_attention: q{tuple(q.shape)} does not fit k{tuple(k_cache.shape)} "
                         "(B, H, D) / (B, S, H_kv, D)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"decode_attention: dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if meta.seqused is not None:
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(-1) == 1):
            raise ValueError(f"decode_attention (flash): caches must be contiguous and q unit-stride on D, got "
                             f"q{q.stride()} k{k_cache.stride()} v{v_cache.stride()}")
        if meta.seqused.shape != (b,) or meta.seqused.dtype != torch.int32:
            raise ValueError(f"decode_attention (flash): seqused must be int32 ({b},), "
                             f"got {meta.seqused.dtype} {tuple(meta.seqused.shape)}")
        # a window: keys (L - window, L - 1] + the query's own, flash's bottom-right aligned local attention
        left, right = (None, None) if meta.window is None else (meta.window - 1, 0)
        out = torch.ops.aten._flash_attention_forward(
            q, k_cache.view(b * s_max, h_kv, d), v_cache.view(b * s_max, h_kv, d),  # (B*S, H_kv, D) varlen
            meta.cu_q, meta.cu_k, 1, s_max, 0.0, False, False, scale=d**-0.5, window_size_left=left,
            window_size_right=right, seqused_k=meta.seqused)[0]
        return out  # (B, H, D)
    if impl == "kvscope":
        raise ValueError("decode_attention: the kvscope switch runs kvscope.kernels.decode_attention.split_kv_decode "
                         "over meta.kv_lengths (the engine calls it), not this function")
    start, span = meta.start, meta.span
    if not 0 <= start < span <= s_max:
        raise ValueError(f"decode_attention: keys [{start}, {span}) outside [0, {s_max}] or empty")
    key_mask = meta.key_mask
    if key_mask is not None and (key_mask.shape != (b, 1, 1, span - start) or key_mask.dtype != torch.bool):
        raise ValueError(f"decode_attention: key_mask must be bool (B, 1, 1, L)=({b}, 1, 1, {span - start}), "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    qg = q.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, n_rep, D)
    k = k_cache[:, start:span].transpose(1, 2)  # (B, H_kv, L, D)
    v = v_cache[:, start:span].transpose(1, 2)  # (B, H_kv, L, D)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=key_mask)  # (B, H_kv, n_rep, D)
    elif impl == "eager":
        scores = torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5  # (B, H_kv, n_rep, L)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # (B, H_kv, n_rep, D)
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")
    return out.reshape(b, h, d)  # (B, H, D)
