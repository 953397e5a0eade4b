"""kvscope's hand-written CUDA kernels as checked Python calls, each next to its PyTorch reference.

Every call checks devices, dtypes, shapes and strides at the boundary and raises `ValueError` with the shapes; the
`*_ref` functions compute the same result with torch operations (rounding through the tensor dtype at the same
places), on any device. Kernel names in a trace: `kvscope_rms_norm_*`, `kvscope_silu_mul_*`, `kvscope_rope_kv_*`,
`kvscope_stamp` (`_vec` for 16-byte accesses, `_scalar` otherwise); `kvscope_gemv_m<rows>[p]` and
`kvscope_gemv_reduce` (split-K's second pass) for the decode step's products; `kvscope_decode_attention_mma_d<D>`
(bf16/fp16, tensor cores) or `kvscope_decode_attention_d<D>_g<heads>` (CUDA cores) and
`kvscope_decode_attention_merge` (the splits combined) for decode attention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvscope.kernels.launch import DTYPE_MACROS, f32, i32, i64, launch, ptr
from kvscope.model.dtypes import dtype_name
from kvscope.model.layers import apply_rope

DTYPE_NAMES = tuple(dtype_name(d) for d in DTYPE_MACROS)  # the dtypes the kernels run in
# kernel vs its `*_ref`, per dtype (torch.testing.assert_close's atol/rtol): both round through the dtype at the same
# places; what is left is the order of float sums (RMSNorm's mean) and __expf against torch's exp, at most a unit in
# the last place of the dtype. The GPU tests and benchmarks/kernels.py check against it.
REF_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 8e-3},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}
VEC_BYTES = 16
_BLOCK = 256
GRID_Y_MAX = 65535  # CUDA's limit on gridDim.y


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run here: a CUDA device and one of float32 / bfloat16 / float16."""
    return device.type == "cuda" and dtype in DTYPE_MACROS


def _vec_ok(*tensors: torch.Tensor, elems: int = 0) -> bool:
    """16-byte accesses are safe: aligned base pointers, and `elems` (a row length or stride) a whole vector."""
    t0 = tensors[0]
    per_vec = VEC_BYTES // t0.element_size()
    return elems % per_vec == 0 and all(t.data_ptr() % VEC_BYTES == 0 for t in tensors)


def _need_cuda(name: str, dtype: torch.dtype, *tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if dev.type != "cuda":
        raise ValueError(f"{name}: needs CUDA tensors, got {dev}")
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{name}: tensors on {dev} and {t.device}")
        if t.dtype != dtype:
            raise ValueError(f"{name}: dtype {t.dtype} where {dtype} is expected (shape {tuple(t.shape)})")
    if dtype not in DTYPE_MACROS:
        raise ValueError(f"{name}: dtype {dtype_name(dtype)} not supported ({', '.join(DTYPE_NAMES)})")


def _rows(name: str, x: torch.Tensor) -> tuple[int, int, int]:
    """(rows, row length, row stride) of x viewed as 2-D rows of its last dimension (unit stride)."""
    if x.dim() < 1 or x.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if x.dim() == 1:
        return 1, n, n
    lead = x.reshape(-1, n) if not x.is_contiguous() else x.view(-1, n)
    if lead.data_ptr() != x.data_ptr():
        raise ValueError(f"{name}: rows of shape {tuple(x.shape)} strides {x.stride()} are not evenly spaced")
    return rows, n, lead.stride(0)


# ---- RMSNorm --------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, stamp: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., dim), rows evenly spaced; weight (dim,). Returns a new contiguous (..., dim) tensor.

    `stamp`: an int64 CUDA tensor of one element; block 0 writes the global timer (ns) into it as the kernel starts.
    """
    _need_cuda("rms_norm", x.dtype, x, weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be contiguous ({x.shape[-1]},) "
                         f"for x {tuple(x.shape)}")
    if stamp is not None and (stamp.dtype != torch.int64 or stamp.numel() != 1 or stamp.device != x.device):
        raise ValueError(f"rms_norm: stamp must be one int64 on {x.device}, got {stamp.dtype} {tuple(stamp.shape)}")
    rows, dim, stride = _rows("rms_norm", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    vec = _vec_ok(x, weight, out, elems=dim) and _vec_ok(x, elems=stride)
    per_thread = VEC_BYTES // x.element_size() if vec else 1
    threads = min(1024, max(32, -(-(dim // per_thread) // 32) * 32))
    launch("kvscope_rms_norm", "vec" if vec else "scalar", x.dtype, x.device, (rows, 1, 1), (threads, 1, 1),
           [ptr(out), ptr(x), ptr(weight), i32(dim), i64(stride), f32(eps), ptr(stamp)])
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in float32; the normalised row is rounded to x's dtype before the weight multiplies it."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight


# ---- SiLU * up ---------------------------------------------------------------------------------------------------
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (N, F) with unit column stride and one shared row stride (e.g. the halves of a fused (N, 2F)
    product). Returns silu(gate) * up as a new contiguous (N, F) tensor."""
    _need_cuda("silu_mul", gate.dtype, gate, up)
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride() != up.stride() or gate.stride(1) != 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} strides {gate.stride()} and up {tuple(up.shape)} "
                         f"strides {up.stride()} must be 2-D with equal shapes and strides, unit column stride")
    n, f = gate.shape
    out = torch.empty(n, f, dtype=gate.dtype, device=gate.device)
    if n == 0 or f == 0:
        return out
    stride = gate.stride(0)
    vec = _vec_ok(gate, up, out, elems=f) and _vec_ok(gate, elems=stride)
    per_thread = VEC_BYTES // gate.element_size() if vec else 1
    cols = -(-f // per_thread)
    launch("kvscope_silu_mul", "vec" if vec else "scalar", gate.dtype, gate.device,
           (-(-cols // _BLOCK), min(n, GRID_Y_MAX), 1), (_BLOCK, 1, 1),
           [ptr(out), ptr(gate), ptr(up), i32(f), i64(stride), i64(n)])
    return out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---- RoPE + KV write ------------------------------------------------------------------------------------------
def rope_kv_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, n_heads: int, lengths: torch.Tensor | None = None) -> None:
    """In place: rotate the query and key heads of `qkv` (B, S, H + 2*H_kv, D, contiguous) by the RoPE tables
    `cos` / `sin_rot` (S_max, D), and write the rotated keys and the values into `k_cache` / `v_cache`
    (B, S_max, H_kv, D, contiguous) at positions 0..S-1 (`lengths` None, a prefill) or lengths[b]..lengths[b]+S-1
    (`lengths` (B,) int64 on the device, a decode step; not checked against S_max on the host, which would sync)."""
    _need_cuda("rope_kv_", qkv.dtype, qkv, cos, sin_rot, k_cache, v_cache)
    if qkv.dim() != 4 or not qkv.is_contiguous():
        raise ValueError(f"rope_kv_: qkv must be contiguous (B, S, H+2H_kv, D), got {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    b, s, all_heads, d = qkv.shape
    hkv = (all_heads - n_heads) // 2
    if n_heads <= 0 or hkv <= 0 or n_heads + 2 * hkv != all_heads or n_heads % hkv or d % 2:
        raise ValueError(f"rope_kv_: qkv {tuple(qkv.shape)} does not split into {n_heads} query heads and two equal "
                         "groups of key/value heads with an even head size")
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
    vec = _vec_ok(qkv, cos, sin_rot, k_cache, v_cache, elems=d // 2)
    per_head = (d // 2) // (per_vec if vec else 1)
    total = n_tokens * all_heads * per_head
    launch("kvscope_rope_kv", "vec" if vec else "scalar", qkv.dtype, qkv.device, (-(-total // _BLOCK), 1, 1),
           (_BLOCK, 1, 1), [ptr(qkv), ptr(cos), ptr(sin_rot), ptr(k_cache), ptr(v_cache), ptr(lengths),
                            i32(n_tokens), i32(s), i32(n_heads), i32(hkv), i32(d), i32(s_max)])


def rope_kv_ref_(qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, n_heads: int, lengths: torch.Tensor | None = None) -> None:
    """The same as `rope_kv_` with torch operations (three RoPE kernels, then copies into the cache)."""
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


# ---- timestamps ------------------------------------------------------------------------------------------------
def stamp(slot: torch.Tensor) -> None:
    """Write the GPU's global timer (ns) into `slot` (one int64 on a CUDA device) from a one-thread kernel."""
    if slot.device.type != "cuda" or slot.dtype != torch.int64 or slot.numel() != 1:
        raise ValueError(f"stamp: slot must be one int64 on a CUDA device, got {slot.dtype} {tuple(slot.shape)} "
                         f"on {slot.device}")
    launch("kvscope_stamp", "", torch.float32, slot.device, (1, 1, 1), (1, 1, 1), [ptr(slot)])


# ---- GEMV: the decode step's skinny products -----------------------------------------------------------------------
GEMV_MAX_ROWS = 16  # rows of x (a decode step's batch) the gemv kernels take
GEMV_TILES = (1, 2, 4, 8, 16)  # x rows per kernel variant (`kvscope_gemv_m<tile>`, rows <= tile)
GEMV_WARPS = 4  # warps per block (gemv.cu's GEMV_WARPS)
GEMV_ROWS_PER_WARP = 2  # rows of W per warp (gemv.cu's GEMV_ROWS; SiLU*up: one gate row and its up row)
# 16-byte vectors per lane per W row per trip, per (tile, pipelined) (gemv.cu's GEMV_ENTRY)
GEMV_UNROLL = {(1, False): 8, (2, False): 8, (4, False): 4, (8, False): 4, (16, False): 2,
               (1, True): 4, (2, True): 4, (4, True): 2, (8, True): 2, (16, True): 1}
# per tile: the pipelined variant (`m<tile>p`: the next trip's loads issued before this trip's arithmetic) or one trip
# at a time (`m<tile>`, the variant measured in docs/benchmarks.md; the pipelined one is not measured yet)
GEMV_PIPELINED = {1: False, 2: False, 4: False, 8: False, 16: False}
GEMV_SPLIT_BLOCKS_PER_SM = 1  # K is split while there are fewer blocks than this many per SM
GEMV_SPLIT_MAX = 16  # most K splits of one product
_GEMV_STORE, _GEMV_RESIDUAL, _GEMV_SILU_MUL = 0, 1, 2  # gemv.cu's epilogues
# unit roundoff spacing of each dtype relative to a value (the distance to its next neighbour is at most this)
_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@dataclass(frozen=True)
class GemvLaunch:
    """The launch of one gemv, chosen from its shape on the host (see `gemv_launch`)."""

    variant: str  # kernel variant: "m1" .. "m16" (x rows per tile), "p" appended when pipelined
    grid: tuple[int, int, int]  # (blocks over W rows, K splits, 1)
    block: tuple[int, int, int]
    splits: int  # K splits: > 1 adds the `kvscope_gemv_reduce` launch
    kv_per_split: int  # 16-byte vectors of a W row per split


def gemv_launch(rows: int, w_rows: int, k: int, elem_bytes: int, sm_count: int, pipelined: bool | None = None,
                split_blocks_per_sm: int | None = None) -> GemvLaunch:
    """Launch shape of y (rows, .) = x (rows, k) @ W (w_rows, k)^T: the smallest row tile that holds `rows` (its
    variant pipelined or not: GEMV_PIPELINED unless `pipelined` says); one warp per GEMV_ROWS_PER_WARP rows of W; K
    split (deterministic two-pass reduction) only when there are fewer blocks than `split_blocks_per_sm` (default
    GEMV_SPLIT_BLOCKS_PER_SM) per SM and each split still gives every lane at least one full trip of loads."""
    if not 1 <= rows <= GEMV_MAX_ROWS or w_rows < 1 or k < 1 or sm_count < 1 or VEC_BYTES % elem_bytes \
            or k % (VEC_BYTES // elem_bytes):
        raise ValueError(f"gemv_launch: rows {rows} (1..{GEMV_MAX_ROWS}), W ({w_rows}, {k}) with {elem_bytes}-byte "
                         f"elements (k a multiple of 16 bytes), {sm_count} SMs")
    kv = k // (VEC_BYTES // elem_bytes)
    tile = next(t for t in GEMV_TILES if t >= rows)
    pipe = GEMV_PIPELINED[tile] if pipelined is None else pipelined
    per_sm = GEMV_SPLIT_BLOCKS_PER_SM if split_blocks_per_sm is None else split_blocks_per_sm
    blocks = -(-w_rows // (GEMV_WARPS * GEMV_ROWS_PER_WARP))
    splits = 1
    if blocks < per_sm * sm_count:
        splits = max(1, min(GEMV_SPLIT_MAX, -(-2 * per_sm * sm_count // blocks),
                            kv // (32 * GEMV_UNROLL[tile, pipe])))
    kv_per_split = -(-kv // splits)
    splits = -(-kv // kv_per_split)  # no empty split
    return GemvLaunch(f"m{tile}{'p' if pipe else ''}", (blocks, splits, 1), (32 * GEMV_WARPS, 1, 1), splits,
                      kv_per_split)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gemv_check(name: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes, strides and alignment of x (M, K) and W (N, K) (and bias (N,)): ValueError with the shapes."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or not 1 <= x.shape[0] <= GEMV_MAX_ROWS:
        raise ValueError(f"{name}: x {tuple(x.shape)} @ W {tuple(w.shape)}^T needs x (M, K) with 1 <= M <= "
                         f"{GEMV_MAX_ROWS} and W (N, K)")
    per_vec = VEC_BYTES // x.element_size()
    k = x.shape[1]
    if k == 0 or k % per_vec:
        raise ValueError(f"{name}: K = {k} (x {tuple(x.shape)}, W {tuple(w.shape)}) must be a positive multiple of "
                         f"{per_vec} ({VEC_BYTES} bytes of {x.dtype})")
    if not w.is_contiguous() or w.data_ptr() % VEC_BYTES:
        raise ValueError(f"{name}: W {tuple(w.shape)} strides {w.stride()} must be contiguous and 16-byte aligned")
    if x.stride(1) != 1 or x.stride(0) % per_vec or x.data_ptr() % VEC_BYTES:
        raise ValueError(f"{name}: x {tuple(x.shape)} strides {x.stride()} needs unit column stride and 16-byte "
                         "aligned rows")
    if bias is not None and (bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} must be contiguous ({w.shape[0]},) for W "
                         f"{tuple(w.shape)}")


def gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemv(x, w)` takes these tensors (CUDA, a kernel dtype, shapes and alignment); no launch, no sync."""
    if x.device.type != "cuda" or x.dtype not in DTYPE_MACROS or w.device != x.device or w.dtype != x.dtype:
        return False
    try:
        _gemv_check("gemv", x, w, None)
    except ValueError:
        return False
    return True


def _gemv_norm_check(name: str, x: torch.Tensor, norm_weight: torch.Tensor | None,
                     stamp: torch.Tensor | None) -> None:
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or not norm_weight.is_contiguous()
                                    or norm_weight.data_ptr() % VEC_BYTES):
        raise ValueError(f"{name}: norm weight {tuple(norm_weight.shape)} must be contiguous, 16-byte aligned "
                         f"({x.shape[1]},) for x {tuple(x.shape)}")
    if stamp is not None and (stamp.dtype != torch.int64 or stamp.numel() != 1 or stamp.device != x.device):
        raise ValueError(f"{name}: stamp must be one int64 on {x.device}, got {stamp.dtype} {tuple(stamp.shape)}")


def _gemv_run(mode: int, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, stamp: torch.Tensor | None = None,
              pipelined: bool | None = None, split_blocks_per_sm: int | None = None) -> None:
    m, k = x.shape
    n_w = w.shape[0]
    cfg = gemv_launch(m, n_w, k, x.element_size(), _sm_count(x.device.index if x.device.index is not None
                                                             else torch.cuda.current_device()),
                      pipelined=pipelined, split_blocks_per_sm=split_blocks_per_sm)
    partial = (torch.empty(cfg.splits, m, n_w, dtype=torch.float32, device=x.device)  # (splits, M, N_w) raw sums
               if cfg.splits > 1 else None)
    ldo = out.stride(0)
    launch("kvscope_gemv", cfg.variant, x.dtype, x.device, cfg.grid, cfg.block,
           [ptr(out), ptr(x), ptr(w), ptr(bias), ptr(partial), i32(m), i32(n_w), i32(k), i64(x.stride(0)), i64(ldo),
            i32(mode), i32(cfg.kv_per_split), ptr(norm_weight), f32(eps), ptr(stamp)])
    if partial is not None:
        n_out = n_w // 2 if mode == _GEMV_SILU_MUL else n_w
        launch("kvscope_gemv", "reduce", x.dtype, x.device, (-(-(m * n_out) // _BLOCK), 1, 1), (_BLOCK, 1, 1),
               [ptr(out), ptr(partial), ptr(bias), i32(m), i32(n_w), i32(n_out), i32(cfg.splits), i64(ldo),
                i32(mode)])


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, stamp: torch.Tensor | None = None, pipelined: bool | None = None,
         split_blocks_per_sm: int | None = None) -> torch.Tensor:
    """x (M, K), 1 <= M <= 16, unit column stride, 16-byte aligned rows; W (N, K) contiguous (an nn.Linear weight);
    bias (N,) or None. Returns x @ W^T + bias as a new contiguous (M, N) tensor (float accumulation, rounded once).

    `norm_weight` (K,): the product takes RMSNorm(x) * norm_weight (eps `eps`, rounded as `rms_norm` rounds) in
    place of x, computed inside the kernel. `stamp`: as in `rms_norm`. `pipelined`, `split_blocks_per_sm`: the
    launch choice of `gemv_launch` (None: its defaults, GEMV_PIPELINED and GEMV_SPLIT_BLOCKS_PER_SM)."""
    _gemv_check("gemv", x, w, bias)
    _gemv_norm_check("gemv", x, norm_weight, stamp)
    _need_cuda("gemv", x.dtype, x, w, *(t for t in (bias, norm_weight) if t is not None))
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)  # (M, N)
    _gemv_run(_GEMV_STORE, out, x, w, bias, norm_weight, eps, stamp, pipelined, split_blocks_per_sm)
    return out


def gemv_residual_(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                   pipelined: bool | None = None, split_blocks_per_sm: int | None = None) -> torch.Tensor:
    """In place: h += x @ W^T (rounded once, as torch's addmm_), then h += bias (rounded again, as the engine's
    `linear_residual_`). h (M, N) with unit column stride, not overlapping x; x, W, bias and the launch choice as in
    `gemv`. Returns h."""
    _gemv_check("gemv_residual_", x, w, bias)
    if h.dim() != 2 or h.shape != (x.shape[0], w.shape[0]) or h.stride(1) != 1:
        raise ValueError(f"gemv_residual_: h {tuple(h.shape)} strides {h.stride()} must be ({x.shape[0]}, "
                         f"{w.shape[0]}) with unit column stride for x {tuple(x.shape)} @ W {tuple(w.shape)}^T")
    h_lo, x_lo = h.data_ptr(), x.data_ptr()
    h_hi = h_lo + ((h.shape[0] - 1) * h.stride(0) + h.shape[1]) * h.element_size()
    x_hi = x_lo + ((x.shape[0] - 1) * x.stride(0) + x.shape[1]) * x.element_size()
    if h_lo < x_hi and x_lo < h_hi:
        raise ValueError(f"gemv_residual_: h {tuple(h.shape)} overlaps x {tuple(x.shape)} in memory")
    _need_cuda("gemv_residual_", x.dtype, h, x, w, *([bias] if bias is not None else []))
    _gemv_run(_GEMV_RESIDUAL, h, x, w, bias, pipelined=pipelined, split_blocks_per_sm=split_blocks_per_sm)
    return h


def gemv_silu_mul(x: torch.Tensor, w13: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  stamp: torch.Tensor | None = None, pipelined: bool | None = None,
                  split_blocks_per_sm: int | None = None) -> torch.Tensor:
    """The fused gate/up product and SiLU*up in one kernel: W13 (2F, K) holds the gate rows, then the up rows (the
    engine's `w13`). Returns silu(x @ Wg^T) * (x @ Wu^T), a new contiguous (M, F) tensor, rounded where the torch
    path rounds (the product, SiLU, the multiply). `norm_weight`, `eps`, `stamp` and the launch choice: as in
    `gemv`."""
    _gemv_check("gemv_silu_mul", x, w13, None)
    _gemv_norm_check("gemv_silu_mul", x, norm_weight, stamp)
    if w13.shape[0] % 2:
        raise ValueError(f"gemv_silu_mul: W13 {tuple(w13.shape)} must have an even number of rows (gate, then up)")
    _need_cuda("gemv_silu_mul", x.dtype, x, w13, *([norm_weight] if norm_weight is not None else []))
    out = torch.empty(x.shape[0], w13.shape[0] // 2, dtype=x.dtype, device=x.device)  # (M, F)
    _gemv_run(_GEMV_SILU_MUL, out, x, w13, None, norm_weight, eps, stamp, pipelined, split_blocks_per_sm)
    return out


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Float32 product (and bias) of x (or `rms_norm_ref(x, norm_weight, eps)`), rounded once to x's dtype."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


def gemv_residual_ref_(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                       ) -> torch.Tensor:
    v = (h.float() + F.linear(x.float(), w.float())).to(h.dtype)
    if bias is not None:
        v = v + bias
    return h.copy_(v)


def gemv_silu_mul_ref(x: torch.Tensor, w13: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      eps: float = 0.0) -> torch.Tensor:
    gate, up = gemv_ref(x, w13, None, norm_weight, eps).chunk(2, dim=-1)  # (M, F) each
    return F.silu(gate) * up


def gemv_tolerance(x: torch.Tensor, w: torch.Tensor, silu_mul: bool = False) -> dict[str, float]:
    """torch.testing.assert_close's atol/rtol for a gemv kernel against its `*_ref` (one host sync: tests and
    benchmarks only).

    Both sum in float32, in different orders: the sums differ by about sqrt(K) * 2^-24 * s, where s = sqrt(K) *
    rms(x) * rms(W) is the size of an output of zero-mean inputs (allowed: 16 times that, as the tails of the inputs
    and SiLU*up's product of two such sums go beyond s; measured on the H200: 1.05e-5 at K = 896, s^2 = 1, float32).
    Each rounding to the dtype can then land on the neighbouring value: one unit (u = 2^-7 bf16, 2^-10 fp16, 2^-23
    fp32, relative) per rounding of the result, so rtol = 2u (the product, then a bias or residual add), 3u with
    SiLU*up (gate and up are rounded before SiLU and the multiply). A near-zero result of a cancelling sum gets no
    help from rtol: atol covers a flip of one rounding at the output's scale (s; s^2 for silu(gate) * up) plus the
    float32 order term."""
    k = x.shape[-1]
    rms = float(x.float().pow(2).mean().sqrt() * w.float().pow(2).mean().sqrt())
    scale = math.sqrt(k) * rms
    out_scale = scale * scale if silu_mul else scale
    u = _ULP[x.dtype]
    return {"atol": out_scale * (u + math.sqrt(k) * 2.0**-20), "rtol": (3 if silu_mul else 2) * u}


# ---- decode attention: split-KV flash-decoding over the token-major cache ------------------------------------------
DECODE_ATTENTION_HEAD_DIMS = (64, 128)  # head sizes the kernels are built for (decode_attention.cu's *_ENTRY)
# bf16/fp16: the tensor-core kernel (`kvscope_decode_attention_mma_d<D>`), up to 16 query heads of a KV head's group
# per block (the mma's rows); float32 (or tensor_cores=False): the CUDA-core kernel (`..._d<D>_g<GP>`), GP heads
DECODE_ATTENTION_MMA_ROWS = 16  # DM_ROWS
DECODE_ATTENTION_MMA_SHARED_BYTES_PER_DIM = 4 * 3 * 2 * 16 * 2  # DM_WARPS * DM_STAGES * (K, V) * DM_TILE * 2 bytes
DECODE_ATTENTION_GROUPS = (1, 2, 4, 8)  # CUDA-core kernel: query heads per block (GP); larger groups: chunks of 8
DECODE_ATTENTION_WARPS = 4  # warps per block (DA_WARPS, DM_WARPS)
DECODE_ATTENTION_MERGE_THREADS = 256  # DA_MERGE_WARPS * 32
DECODE_ATTENTION_MAX_SPLITS = 1024  # decode_attention.cu's DA_MAX_SPLITS (the merge's shared weights)
# the split rule: enough (sequence, KV head, split) blocks for this many blocks per SM (the d=128 kernels keep two
# resident per SM: the tensor-core one by its 96 KiB of shared memory, the CUDA-core one by its 227 registers a
# thread), and no split shorter than DECODE_ATTENTION_MIN_SPLIT_TOKENS positions of the cache (two rounds of a
# block's four warps at 16 positions a tile)
DECODE_ATTENTION_BLOCKS_PER_SM = 2
DECODE_ATTENTION_MIN_SPLIT_TOKENS = 128
# the "long" split rule (`decode_splits_long`): fewer, longer splits, so that a block's pipeline fill and drain and
# the merge's partials weigh less: no split shorter than DECODE_ATTENTION_LONG_MIN_SPLIT_TOKENS positions of S_max,
# at most DECODE_ATTENTION_LONG_WAVES waves of DECODE_ATTENTION_BLOCKS_PER_SM blocks per SM
DECODE_ATTENTION_LONG_MIN_SPLIT_TOKENS = 512
DECODE_ATTENTION_LONG_WAVES = 1
# defaults of `decode_attention` (what the engine gets): the split rule (False: `decode_splits`, True:
# `decode_splits_long`, None: `prefers_long_splits` picks by shape) and the merge (False: the separate
# `kvscope_decode_attention_merge` launch, True: fused into the main kernel, the last split block of each (sequence,
# head group) merging). Measured on the H200 in one call (docs/benchmarks.md, "Decode attention: the variants in the
# decode step"): the fused merge lost at every shape; the long rule won from 32 blocks or a 32k cache and lost at
# batch 1 with 512 and 4,096 positions
DECODE_ATTENTION_LONG_SPLITS: bool | None = None
DECODE_ATTENTION_FUSED_MERGE = False
# `prefers_long_splits`: the long rule from this many (sequence, head group) blocks, or from this many cache positions
DECODE_ATTENTION_LONG_RULE_MIN_BLOCKS = 16
DECODE_ATTENTION_LONG_RULE_MIN_POSITIONS = 16384
_LOG2E = 1.4426950408889634
# kernel vs decode_attention_ref, per dtype: both sum in float32 (in other orders, the kernels through exp2 of
# pre-scaled scores); the tensor-core kernel also rounds the softmax weights P to the dtype before the P V product
# (as flash attention does; the normaliser sums the rounded weights, so the output stays a weighted average of V),
# which moves an output by up to one unit of the dtype relative to the spread of V, and the output is rounded once
# more: two units (u = 2^-8 bf16, 2^-11 fp16) for 16-bit dtypes; float32 keeps the order and exp2's few units of
# 2^-23 relative to the largest value
DECODE_ATTENTION_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2 * 2.0**-8 * 2, "rtol": 2 * 2.0**-8},
    torch.float16: {"atol": 2 * 2.0**-11 * 2, "rtol": 2 * 2.0**-11},
}


def decode_group_chunk(group: int, tensor_cores: bool = False) -> tuple[int, int]:
    """(query heads per block, chunks per KV head) for `group` query heads per KV head: the tensor-core kernel's 16
    rows (padded), or the smallest of DECODE_ATTENTION_GROUPS that holds the group (padded heads compute zeros),
    else chunks of the largest."""
    if group < 1:
        raise ValueError(f"decode_group_chunk: {group} query heads per KV head")
    if tensor_cores:
        return DECODE_ATTENTION_MMA_ROWS, -(-group // DECODE_ATTENTION_MMA_ROWS)
    gp = next((g for g in DECODE_ATTENTION_GROUPS if g >= group), DECODE_ATTENTION_GROUPS[-1])
    return gp, -(-group // gp)


def decode_splits(blocks: int, s_max: int, sm_count: int) -> int:
    """Splits of every sequence's positions for `blocks` (sequence, KV head, head chunk) blocks over a cache of
    `s_max` positions on `sm_count` SMs, chosen on the host from shapes alone (so a CUDA graph keeps it): enough
    blocks for DECODE_ATTENTION_BLOCKS_PER_SM per SM, none shorter than DECODE_ATTENTION_MIN_SPLIT_TOKENS positions
    of S_max, at most DECODE_ATTENTION_MAX_SPLITS. Each split then covers ceil(length / splits) of the device
    length."""
    if blocks < 1 or s_max < 1 or sm_count < 1:
        raise ValueError(f"decode_splits: blocks {blocks}, s_max {s_max}, sm_count {sm_count} must be positive")
    return _split_count(blocks, s_max, sm_count, 1, DECODE_ATTENTION_MIN_SPLIT_TOKENS)


def decode_splits_long(blocks: int, s_max: int, sm_count: int,
                       min_split_tokens: int = DECODE_ATTENTION_LONG_MIN_SPLIT_TOKENS) -> int:
    """`decode_splits`' alternative with longer splits: at most DECODE_ATTENTION_LONG_WAVES waves of
    DECODE_ATTENTION_BLOCKS_PER_SM blocks per SM, none shorter than `min_split_tokens` positions of S_max, at most
    DECODE_ATTENTION_MAX_SPLITS (shapes only, as `decode_splits`)."""
    if blocks < 1 or s_max < 1 or sm_count < 1 or min_split_tokens < 1:
        raise ValueError(f"decode_splits_long: blocks {blocks}, s_max {s_max}, sm_count {sm_count}, min_split_tokens "
                         f"{min_split_tokens} must be positive")
    return _split_count(blocks, s_max, sm_count, DECODE_ATTENTION_LONG_WAVES, min_split_tokens)


def _split_count(blocks: int, s_max: int, sm_count: int, waves: int, min_split_tokens: int) -> int:
    """The split rules' count (arguments checked by the caller): enough splits for `waves` waves of
    DECODE_ATTENTION_BLOCKS_PER_SM blocks per SM, none shorter than `min_split_tokens` positions of S_max, at most
    DECODE_ATTENTION_MAX_SPLITS, at least one."""
    want = -(-sm_count * DECODE_ATTENTION_BLOCKS_PER_SM * waves // blocks)
    most = max(1, s_max // min_split_tokens)
    return max(1, min(want, most, DECODE_ATTENTION_MAX_SPLITS))


def prefers_long_splits(blocks: int, s_max: int) -> bool:
    """The split rule by shape (what the H200 measured): `decode_splits_long` when the blocks alone nearly fill the
    GPU (DECODE_ATTENTION_LONG_RULE_MIN_BLOCKS or more) or the cache is long (DECODE_ATTENTION_LONG_RULE_MIN_POSITIONS
    or more), where a block's pipeline fill and the merge weigh most; else `decode_splits`, whose many short splits
    keep a small batch's few blocks from leaving SMs idle."""
    return blocks >= DECODE_ATTENTION_LONG_RULE_MIN_BLOCKS or s_max >= DECODE_ATTENTION_LONG_RULE_MIN_POSITIONS


def decode_attention_supported(dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether `decode_attention` takes this model on a CUDA device (dtype, head size, grouping)."""
    return (dtype in DTYPE_MACROS and head_dim in DECODE_ATTENTION_HEAD_DIMS and n_kv_heads > 0
            and n_heads % n_kv_heads == 0)


def _decode_workspace(b: int, h: int, splits: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's normalised output (B, H, splits, D) and log2-sum-exp2 (B, H, splits), float32, uninitialised
    (every element is written before the merge reads it)."""
    return (torch.empty(b, h, splits, d, dtype=torch.float32, device=device),
            torch.empty(b, h, splits, dtype=torch.float32, device=device))


# the fused merge's arrival counters, int32 and zeroed once, by (device index, count); the kernel leaves them zero
_DECODE_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _decode_counters(n: int, device: torch.device, index: int) -> torch.Tensor:
    """`n` zeroed int32 counters for the fused merge, kept per (device, n) and reused by every later call on that
    device. Inside a CUDA-graph capture with none kept yet, a fresh zeroed buffer (a memset node of the graph,
    which zeroes it at every replay) that is not kept: the first use outside a capture must find memory that is
    already zero."""
    key = (index, n)
    kept = _DECODE_COUNTERS.get(key)
    if kept is not None:
        return kept
    fresh = torch.zeros(n, dtype=torch.int32, device=device)  # (B * head groups,)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _DECODE_COUNTERS[key] = fresh
    return fresh


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, splits: int | None = None, out: torch.Tensor | None = None,
                     tensor_cores: bool | None = None, fused_merge: bool | None = None,
                     long_splits: bool | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence against the cache: q (B, H, D) (unit stride on D, 16-byte aligned rows), k_cache /
    v_cache (B, S_max, H_kv, D) contiguous, lengths (B,) int64 on the device: sequence b attends to positions
    0 .. lengths[b] - 1 (the engine passes its positions + 1: the new token's K/V included; clamped to [0, S_max] on
    the device, length 0 gives zeros; not checked on the host, which would sync). Query head h uses KV head
    h // (H / H_kv). Softmax scale `scale` (default D**-0.5), float32 accumulation. Returns (B, H, D) contiguous in
    q's dtype (`out`, when given, is written and returned).

    `splits`: positions split over that many blocks per (sequence, KV head), default `decode_splits` (a function
    of the shapes only: a CUDA graph of the call stays valid for any lengths); with more than one split a second
    small kernel, `kvscope_decode_attention_merge`, combines them. `tensor_cores`: the mma kernel (bf16/fp16 only;
    default for them) or the CUDA-core one (default for float32). `long_splits` (default
    DECODE_ATTENTION_LONG_SPLITS; None: `prefers_long_splits` by shape): True, the default split count from
    `decode_splits_long`; False, from `decode_splits`.

    `fused_merge` (default DECODE_ATTENTION_FUSED_MERGE): no merge launch; the last of each (sequence, head group)'s
    split blocks to finish merges, counted in `counters`: int32, contiguous, at least B * H_kv * head chunks
    elements on q's device, zero at the call; the kernel leaves them zero, so one buffer serves every later call
    and CUDA-graph replay (not checked on the host, which would sync). Default: a buffer kept per device and size,
    zeroed once; two calls running at the same time on different streams need their own `counters`."""
    name = "decode_attention"
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: q must be (B, H, D) and the caches (B, S_max, H_kv, D), got q {tuple(q.shape)} "
                         f"k {tuple(k_cache.shape)} v {tuple(v_cache.shape)}")
    b, h, d = q.shape
    _, s_max, hkv, _ = k_cache.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or hkv < 1 or h % hkv or s_max < 1:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} "
                         "(B, H, D) / (B, S_max >= 1, H_kv, D) with H a multiple of H_kv")
    if d not in DECODE_ATTENTION_HEAD_DIMS:
        raise ValueError(f"{name}: head size {d} (q {tuple(q.shape)}) not built; one of {DECODE_ATTENTION_HEAD_DIMS}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{name}: caches k {tuple(k_cache.shape)} strides {k_cache.stride()} and v strides "
                         f"{v_cache.stride()} must be contiguous")
    per_vec = VEC_BYTES // q.element_size()
    if q.stride(2) != 1 or q.stride(0) % per_vec or q.stride(1) % per_vec or not _vec_ok(q, k_cache, v_cache):
        raise ValueError(f"{name}: q {tuple(q.shape)} strides {q.stride()} needs a unit stride on D, row strides "
                         f"that are multiples of {per_vec} elements and 16-byte aligned q and caches")
    if lengths.shape != (b,) or lengths.dtype != torch.int64 or lengths.device != q.device:
        raise ValueError(f"{name}: lengths must be int64 ({b},) on {q.device}, got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device}")
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{name}: softmax scale {scale} is not finite")
    if splits is not None and not 1 <= splits <= DECODE_ATTENTION_MAX_SPLITS:
        raise ValueError(f"{name}: splits {splits} outside [1, {DECODE_ATTENTION_MAX_SPLITS}]")
    if out is not None and (out.shape != (b, h, d) or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"{name}: out must be contiguous {q.dtype} ({b}, {h}, {d}) on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    if tensor_cores is None:
        tensor_cores = q.dtype != torch.float32
    elif tensor_cores and q.dtype == torch.float32:
        raise ValueError(f"{name}: the tensor-core kernel takes bfloat16/float16, got q {q.dtype} {tuple(q.shape)}")
    gp, chunks = decode_group_chunk(h // hkv, tensor_cores)
    n_groups = b * hkv * chunks  # (sequence, head group) pairs: the fused merge's counters
    if counters is not None and (counters.dtype != torch.int32 or counters.device != q.device
                                 or not counters.is_contiguous() or counters.numel() < n_groups):
        raise ValueError(f"{name}: counters must be contiguous int32 with at least {n_groups} elements on "
                         f"{q.device} ({b} sequences x {hkv * chunks} head groups), got {counters.dtype} "
                         f"{tuple(counters.shape)} on {counters.device}")
    _need_cuda(name, q.dtype, q, k_cache, v_cache)  # shapes first: they are checked without a GPU too
    if hkv * chunks > GRID_Y_MAX or b > GRID_Y_MAX:
        raise ValueError(f"{name}: {b} sequences x {hkv * chunks} head groups exceed the grid ({GRID_Y_MAX} each)")
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if fused_merge is None:
        fused_merge = DECODE_ATTENTION_FUSED_MERGE
    if splits is None:
        long_rule = DECODE_ATTENTION_LONG_SPLITS if long_splits is None else long_splits
        if long_rule is None:
            long_rule = prefers_long_splits(n_groups, s_max)
        splits = (decode_splits_long if long_rule else decode_splits)(n_groups, s_max, _sm_count(index))
    if out is None:
        out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    part_o, part_lse = _decode_workspace(b, h, splits, d, q.device) if splits > 1 else (None, None)
    fused = fused_merge and splits > 1
    if fused and counters is None:
        counters = _decode_counters(n_groups, q.device, index)
    variant, shared = f"d{d}_g{gp}", 0
    if tensor_cores:
        variant, shared = f"mma_d{d}", DECODE_ATTENTION_MMA_SHARED_BYTES_PER_DIM * d
    launch("kvscope_decode_attention", variant, q.dtype, q.device, (splits, hkv * chunks, b),
           (32 * DECODE_ATTENTION_WARPS, 1, 1),
           [ptr(out), ptr(part_o), ptr(part_lse), ptr(counters if fused else None), ptr(q), ptr(k_cache),
            ptr(v_cache), ptr(lengths), i64(q.stride(0)), i64(q.stride(1)), i32(h), i32(hkv), i32(s_max),
            i32(splits), f32(scale * _LOG2E)], shared_bytes=shared)
    if splits > 1 and not fused:
        launch("kvscope_decode_attention", "merge", q.dtype, q.device, (b * h, 1, 1),
               (DECODE_ATTENTION_MERGE_THREADS, 1, 1), [ptr(out), ptr(part_o), ptr(part_lse), i32(splits), i32(d)])
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """`decode_attention` with torch operations: scores, softmax and the weighted sum in float32 over positions
    0 .. lengths[b] - 1 (clamped to [0, S_max]; zeros for length 0), rounded to q's dtype once. (B, H, D)."""
    b, h, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qf = q.float().reshape(b, hkv, h // hkv, d)  # (B, H_kv, G, D)
    kf = k_cache.float().permute(0, 2, 3, 1)  # (B, H_kv, D, S_max)
    vf = v_cache.float().transpose(1, 2)  # (B, H_kv, S_max, D)
    scores = torch.matmul(qf, kf) * scale  # (B, H_kv, G, S_max)
    n = lengths.clamp(0, s_max).view(b, 1, 1, 1)
    valid = torch.arange(s_max, device=q.device).view(1, 1, 1, s_max) < n  # (B, 1, 1, S_max)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    probs = torch.where(n > 0, probs, torch.zeros_like(probs))  # no position: zeros, not NaN
    return torch.matmul(probs, vf).reshape(b, h, d).to(q.dtype)  # (B, H, D)
