"""The decode step's skinny products (`cuda/gemv.cu`): y = x @ W^T for 1 to 16 rows of x, with the RMSNorm before
them, the bias, the residual add or SiLU*up fused in (`kvscope_gemv_m<rows>[p]` in a trace, and
`kvscope_gemv_reduce`, split-K's second pass); the launch shape chosen on the host (`gemv_launch`), the checked calls,
their torch references (`*_ref`) and the tolerance between the two (`gemv_tolerance`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvscope.kernels.common import BLOCK_THREADS, VEC_BYTES, need_cuda, sm_count_of
from kvscope.kernels.launch import DTYPE_MACROS, f32, i32, i64, launch, ptr
from kvscope.kernels.rms_norm import rms_norm_ref

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
    cfg = gemv_launch(m, n_w, k, x.element_size(), sm_count_of(x.device.index if x.device.index is not None
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
        launch("kvscope_gemv", "reduce", x.dtype, x.device, (-(-(m * n_out) // BLOCK_THREADS), 1, 1),
               (BLOCK_THREADS, 1, 1), [ptr(out), ptr(partial), ptr(bias), i32(m), i32(n_w), i32(n_out),
                                       i32(cfg.splits), i64(ldo), i32(mode)])


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
    need_cuda("gemv", x.dtype, x, w, *(t for t in (bias, norm_weight) if t is not None))
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
    need_cuda("gemv_residual_", x.dtype, h, x, w, *([bias] if bias is not None else []))
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
    need_cuda("gemv_silu_mul", x.dtype, x, w13, *([norm_weight] if norm_weight is not None else []))
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
