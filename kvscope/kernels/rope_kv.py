"""RoPE fused with the KV-cache write (`cuda/rope_kv.cu`; `kvscope_rope_kv_vec` for 16-byte accesses,
`kvscope_rope_kv_scalar` otherwise; `kvscope_rope_kv_slots_vec` / `_scalar` into a paged cache's pools): the checked
in-place call for a prefill or a decode step, and its torch reference (`rope_kv_ref_`, within
`common.REF_TOLERANCE`)."""

from __future__ import annotations

import torch

from kvscope.kernels.common import BLOCK_THREADS, VEC_BYTES, need_cuda, vec_ok
from kvscope.kernels.launch import i32, launch, ptr
from kvscope.model.layers import apply_rope


def rope_kv_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, n_heads: int, lengths: torch.Tensor | None = None,
             slots: torch.Tensor | None = None) -> None:
    """In place: rotate the query and key heads of `qkv` (B, S, H + 2*H_kv, D, contiguous) by the RoPE tables
    `cos` / `sin_rot` (S_max, D), and write the rotated keys and the values into `k_cache` / `v_cache`
    (B, S_max, H_kv, D, contiguous) at positions 0..S-1 (`lengths` None, a prefill) or lengths[b]..lengths[b]+S-1
    (`lengths` (B,) int64 on the device, a decode step; not checked against S_max on the host, which would sync).

    With `slots` (a paged cache): qkv is (T, 1, H + 2*H_kv, D), T tokens of any sequences; `lengths` (T,) int64 is
    each token's position (its row of the tables), `slots` (T,) int64 on the device the pool row its key and value go
    to, k_cache / v_cache being pools (n_blocks, block_size, H_kv, D) contiguous, viewed as (n_blocks * block_size,
    H_kv, D); a negative slot (-1: a padding row of a CUDA-graph bucket) writes nothing, its heads in qkv are still
    rotated. Positions and slots are read on the device only (not checked against the tables and pools on the
    host, which would sync). Same rounding as without slots."""
    if slots is not None:
        _rope_kv_slots_(qkv, cos, sin_rot, k_cache, v_cache, n_heads, lengths, slots)
        return
    need_cuda("rope_kv_", qkv.dtype, qkv, cos, sin_rot, k_cache, v_cache)
    if qkv.dim() != 4 or not qkv.is_contiguous():
        raise ValueError(f"rope_kv_: qkv must be contiguous (B, S, H+2H_kv, D), got {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    b, s, all_heads, d = qkv.shape
    hkv = _kv_heads("rope_kv_", qkv, n_heads)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[2:] != (hkv, d) \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"rope_kv_: caches k {tuple(k_cache.shape)} v {tuple(v_cache.shape)} must be contiguous "
                         f"({b}, S_max, {hkv}, {d})")
    s_max = k_cache.shape[1]
    if cos.shape != sin_rot.shape or cos.dim() != 2 or cos.shape[1] != d or cos.shape[0] < s_max \
            or not (cos.is_contiguous() and sin_rot.is_contiguous()):
        raise ValueError(f"rope_kv_: tables cos {tuple(cos.shape)} sin_rot {tuple(sin_rot.shape)} must be contiguous "
                         f"(>= {s_max}, {d})")
    if lengths is None:
        if s > s_max:
            raise ValueError(f"rope_kv_: {s} tokens do not fit a cache of {s_max} positions")
    elif lengths.shape != (b,) or lengths.dtype != torch.int64 or lengths.device != qkv.device:
        raise ValueError(f"rope_kv_: lengths must be int64 ({b},) on {qkv.device}, got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device}")
    n_tokens = b * s
    if n_tokens == 0:
        return
    per_vec = VEC_BYTES // qkv.element_size()
    vec = vec_ok(qkv, cos, sin_rot, k_cache, v_cache, elems=d // 2)
    per_head = (d // 2) // (per_vec if vec else 1)
    total = n_tokens * all_heads * per_head
    launch("kvscope_rope_kv", "vec" if vec else "scalar", qkv.dtype, qkv.device, (-(-total // BLOCK_THREADS), 1, 1),
           (BLOCK_THREADS, 1, 1), [ptr(qkv), ptr(cos), ptr(sin_rot), ptr(k_cache), ptr(v_cache), ptr(lengths),
                                   i32(n_tokens), i32(s), i32(n_heads), i32(hkv), i32(d), i32(s_max)])


def _kv_heads(name: str, qkv: torch.Tensor, n_heads: int) -> int:
    """The key/value heads of a fused projection (..., H + 2*H_kv, D) with `n_heads` query heads; ValueError unless
    it splits into them and two equal groups, with an even head size."""
    all_heads, d = qkv.shape[-2:]
    hkv = (all_heads - n_heads) // 2
    if n_heads <= 0 or hkv <= 0 or n_heads + 2 * hkv != all_heads or n_heads % hkv or d % 2:
        raise ValueError(f"{name}: qkv {tuple(qkv.shape)} does not split into {n_heads} query heads and two equal "
                         "groups of key/value heads with an even head size")
    return hkv


def _check_slots(name: str, qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, n_heads: int, lengths: torch.Tensor | None, slots: torch.Tensor) -> int:
    """The paged call's shapes (`rope_kv_` with slots): qkv contiguous (T, 1, H + 2*H_kv, D), pools contiguous
    (n_blocks, block_size, H_kv, D), tables contiguous (rows >= 1, D), lengths and slots int64 (T,) on qkv's
    device; ValueError with the shapes. Returns H_kv."""
    if qkv.dim() != 4 or qkv.shape[1] != 1 or not qkv.is_contiguous():
        raise ValueError(f"{name}: with slots, qkv must be contiguous (T, 1, H+2H_kv, D), got {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    t, d = qkv.shape[0], qkv.shape[3]
    hkv = _kv_heads(name, qkv, n_heads)
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape or k_pool.shape[2:] != (hkv, d) \
            or not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError(f"{name}: pools k {tuple(k_pool.shape)} v {tuple(v_pool.shape)} must be contiguous "
                         f"(n_blocks, block_size, {hkv}, {d})")
    if cos.shape != sin_rot.shape or cos.dim() != 2 or cos.shape[0] < 1 or cos.shape[1] != d \
            or not (cos.is_contiguous() and sin_rot.is_contiguous()):
        raise ValueError(f"{name}: tables cos {tuple(cos.shape)} sin_rot {tuple(sin_rot.shape)} must be contiguous "
                         f"(>= 1, {d})")
    for what, x in (("lengths", lengths), ("slots", slots)):
        if x is None or x.shape != (t,) or x.dtype != torch.int64 or x.device != qkv.device:
            got = "None" if x is None else f"{x.dtype} {tuple(x.shape)} on {x.device}"
            raise ValueError(f"{name}: with slots, {what} must be int64 ({t},) on {qkv.device} (qkv "
                             f"{tuple(qkv.shape)}), got {got}")
    return hkv


def _rope_kv_slots_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, n_heads: int, lengths: torch.Tensor | None, slots: torch.Tensor) -> None:
    """`rope_kv_` into a paged cache's pools (the slots entries of `cuda/rope_kv.cu`), checked as `_check_slots`."""
    hkv = _check_slots("rope_kv_", qkv, cos, sin_rot, k_pool, v_pool, n_heads, lengths, slots)
    need_cuda("rope_kv_", qkv.dtype, qkv, cos, sin_rot, k_pool, v_pool)  # shapes first: checked without a GPU too
    n_tokens, _, all_heads, d = qkv.shape
    if n_tokens == 0:
        return
    per_vec = VEC_BYTES // qkv.element_size()
    vec = vec_ok(qkv, cos, sin_rot, k_pool, v_pool, elems=d // 2)
    per_head = (d // 2) // (per_vec if vec else 1)
    total = n_tokens * all_heads * per_head
    launch("kvscope_rope_kv", "slots_vec" if vec else "slots_scalar", qkv.dtype, qkv.device,
           (-(-total // BLOCK_THREADS), 1, 1), (BLOCK_THREADS, 1, 1),
           [ptr(qkv), ptr(cos), ptr(sin_rot), ptr(k_pool), ptr(v_pool), ptr(lengths), ptr(slots), i32(n_tokens),
            i32(n_heads), i32(hkv), i32(d)])


def _rope_kv_slots_ref_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_pool: torch.Tensor,
                        v_pool: torch.Tensor, n_heads: int, lengths: torch.Tensor | None, slots: torch.Tensor) -> None:
    """`rope_kv_ref_` with slots: checked as `_check_slots`, the tokens rotated at their positions, the rows of
    non-negative slots written (a boolean selection: on a GPU it waits for the device, as a reference may)."""
    hkv = _check_slots("rope_kv_ref_", qkv, cos, sin_rot, k_pool, v_pool, n_heads, lengths, slots)
    t, d = qkv.shape[0], qkv.shape[3]
    pos = lengths.view(t, 1)  # (T, 1): each token's position
    c, sr = cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2)  # (T, 1, 1, D)
    x = qkv[:, :, :n_heads + hkv]  # (T, 1, H+H_kv, D)
    x.copy_(apply_rope(x, c, sr))
    keep = slots >= 0  # (T,)
    rows = slots[keep]  # (T_kept,) pool rows
    k_pool.view(-1, hkv, d)[rows] = qkv[keep, 0, n_heads:n_heads + hkv]  # (n_blocks * block_size, H_kv, D)
    v_pool.view(-1, hkv, d)[rows] = qkv[keep, 0, n_heads + hkv:]


def rope_kv_ref_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, n_heads: int, lengths: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None) -> None:
    """The same as `rope_kv_` with torch operations (three RoPE kernels, then copies into the cache), on any device;
    with `slots`, into a paged cache's pools after the same checks as the kernel's (ValueError)."""
    if slots is not None:
        _rope_kv_slots_ref_(qkv, cos, sin_rot, k_cache, v_cache, n_heads, lengths, slots)
        return
    b, s, all_heads, _ = qkv.shape
    hkv = (all_heads - n_heads) // 2
    start = torch.zeros(b, dtype=torch.int64, device=qkv.device) if lengths is None else lengths
    pos = start.view(b, 1) + torch.arange(s, device=qkv.device).view(1, s)  # (B, S)
    c, sr = cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2)  # (B, S, 1, D)
    x = qkv[:, :, :n_heads + hkv]  # (B, S, H+H_kv, D)
    x.copy_(apply_rope(x, c, sr))
    rows = torch.arange(b, device=qkv.device).view(b, 1).expand(b, s)  # (B, S)
    k_cache[rows, pos] = qkv[:, :, n_heads:n_heads + hkv]  # (B, S, H_kv, D)
    v_cache[rows, pos] = qkv[:, :, n_heads + hkv:]
