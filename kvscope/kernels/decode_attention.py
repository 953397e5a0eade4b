"""Decode attention (`cuda/decode_attention.cu`): `split_kv_decode`, split-KV flash-decoding of one query per
sequence over the token-major cache, `kvscope_decode_attention_mma_d<D>` (bf16/fp16, tensor cores) or
`kvscope_decode_attention_d<D>_g<heads>` (CUDA cores) in a trace, then `kvscope_decode_attention_merge` (the splits
combined, unless the merge is fused); the split and head-chunk choice on the host, and the torch reference
(`split_kv_decode_ref`). The engine calls it under `--attn kvscope`; `kvscope.model.attention.decode_attention` is
the torch path of the other attention switches. With a `block_table` the same kernels read a paged cache (per layer,
pools (n_blocks, block_size, H_kv, D) and a (B, max_blocks) int32 table; block sizes PAGED_BLOCK_SIZES), whose torch
reference is `paged_split_kv_decode_ref`."""

from __future__ import annotations

import math

import torch

from kvscope.kernels.common import GRID_Y_MAX, VEC_BYTES, need_cuda, sm_count_of, vec_ok
from kvscope.kernels.launch import DTYPE_MACROS, f32, i32, i64, launch, ptr

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
# defaults of `split_kv_decode` (what the engine gets): the split rule (False: `decode_splits`, True:
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
# the paged cache's block sizes the kernels serve: powers of two from 8, each a multiple of a warp's tile of positions
# (16 on the tensor cores, at most 16 on the CUDA cores) or, at 8, half of a tile of 16; a tile then reads its pool
# rows through one table entry (two at 8). Up to 256: what a paged cache uses (vLLM: 16 by default, up to 256)
PAGED_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
_INT32_MAX = 2**31 - 1
# kernel vs split_kv_decode_ref, per dtype: both sum in float32 (in other orders, the kernels through exp2 of
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


def split_kv_decode_supported(dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether `split_kv_decode` takes this model on a CUDA device (dtype, head size, grouping)."""
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


def paged_block_size_ok(block_size: int) -> bool:
    """Whether the kernels serve a paged cache of `block_size` positions a block (PAGED_BLOCK_SIZES)."""
    return block_size in PAGED_BLOCK_SIZES


def _check_table(name: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                 lengths: torch.Tensor) -> int:
    """A paged cache's shapes: q (B, H, D), pools (n_blocks >= 1, block_size, H_kv, D) with a served block size,
    block_table contiguous int32 (B, max_blocks >= 1) on q's device, lengths int64 (B,) there; ValueError with the
    shapes. Returns S_max = max_blocks * block_size."""
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{name}: q must be (B, H, D) and the pools (n_blocks, block_size, H_kv, D), got q "
                         f"{tuple(q.shape)} k {tuple(k_pool.shape)} v {tuple(v_pool.shape)}")
    b, h, d = q.shape
    n_blocks, block_size, hkv, _ = k_pool.shape
    if k_pool.shape[3] != d or hkv < 1 or h % hkv or n_blocks < 1:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} (B, H, D) / "
                         "(n_blocks >= 1, block_size, H_kv, D) with H a multiple of H_kv")
    if not paged_block_size_ok(block_size):
        raise ValueError(f"{name}: block size {block_size} (pools {tuple(k_pool.shape)}) is not served; one of "
                         f"{PAGED_BLOCK_SIZES}")
    if (block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b
            or block_table.shape[1] < 1 or not block_table.is_contiguous() or block_table.device != q.device):
        raise ValueError(f"{name}: block_table must be contiguous int32 ({b}, max_blocks >= 1) on {q.device}, got "
                         f"{block_table.dtype} {tuple(block_table.shape)} strides {block_table.stride()} on "
                         f"{block_table.device}")
    s_max = block_table.shape[1] * block_size
    if s_max > _INT32_MAX:
        raise ValueError(f"{name}: block_table {tuple(block_table.shape)} x block size {block_size} = {s_max} "
                         f"positions exceed {_INT32_MAX}")
    _check_lengths(name, q, lengths)
    return s_max


def _check_lengths(name: str, q: torch.Tensor, lengths: torch.Tensor) -> None:
    b = q.shape[0]
    if lengths.shape != (b,) or lengths.dtype != torch.int64 or lengths.device != q.device:
        raise ValueError(f"{name}: lengths must be int64 ({b},) on {q.device}, got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device}")


def _check_tensors(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   lengths: torch.Tensor, block_table: torch.Tensor | None = None) -> int:
    """Shapes, strides and alignment of `split_kv_decode`'s q, caches (or pools and `block_table`) and lengths:
    ValueError with the shapes. Returns S_max (the caches', or max_blocks * block_size)."""
    if block_table is not None:
        s_max = _check_table(name, q, k_cache, v_cache, block_table, lengths)
    elif q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: q must be (B, H, D) and the caches (B, S_max, H_kv, D), got q {tuple(q.shape)} "
                         f"k {tuple(k_cache.shape)} v {tuple(v_cache.shape)}")
    else:
        s_max, hkv = k_cache.shape[1], k_cache.shape[2]
        if (k_cache.shape[0] != q.shape[0] or k_cache.shape[3] != q.shape[2] or hkv < 1 or q.shape[1] % hkv
                or s_max < 1):
            raise ValueError(f"{name}: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} "
                             "(B, H, D) / (B, S_max >= 1, H_kv, D) with H a multiple of H_kv")
    d = q.shape[2]
    if d not in DECODE_ATTENTION_HEAD_DIMS:
        raise ValueError(f"{name}: head size {d} (q {tuple(q.shape)}) not built; one of {DECODE_ATTENTION_HEAD_DIMS}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{name}: caches k {tuple(k_cache.shape)} strides {k_cache.stride()} and v strides "
                         f"{v_cache.stride()} must be contiguous")
    per_vec = VEC_BYTES // q.element_size()
    if q.stride(2) != 1 or q.stride(0) % per_vec or q.stride(1) % per_vec or not vec_ok(q, k_cache, v_cache):
        raise ValueError(f"{name}: q {tuple(q.shape)} strides {q.stride()} needs a unit stride on D, row strides "
                         f"that are multiples of {per_vec} elements and 16-byte aligned q and caches")
    _check_lengths(name, q, lengths)
    return s_max


def window_arg(name: str, window: int | None) -> int:
    """The kernel's `window` argument: `window` checked (None, or an int in [1, 2^31 - 1]), 0 for none."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 2**31 - 1:
        raise ValueError(f"{name}: window must be None or an int in [1, {2**31 - 1}], got {window!r}")
    return window


def _default_splits(n_groups: int, s_max: int, device_index: int, long_splits: bool | None) -> int:
    """The split count when the caller names none: `decode_splits_long` or `decode_splits` as `long_splits` says
    (None: DECODE_ATTENTION_LONG_SPLITS, and where that is None too, `prefers_long_splits` by shape); `s_max`: the
    most positions a sequence attends (the cache's, or a shorter sliding window)."""
    long_rule = DECODE_ATTENTION_LONG_SPLITS if long_splits is None else long_splits
    if long_rule is None:
        long_rule = prefers_long_splits(n_groups, s_max)
    return (decode_splits_long if long_rule else decode_splits)(n_groups, s_max, sm_count_of(device_index))


def _check_options(name: str, q: torch.Tensor, hkv: int, splits: int | None, out: torch.Tensor | None,
                   tensor_cores: bool | None, counters: torch.Tensor | None) -> tuple[bool, int, int, int]:
    """`split_kv_decode`'s options checked against q (B, H, D) over `hkv` KV heads: ValueError with the shapes.
    Returns (tensor cores, query heads per block, head chunks per KV head, (sequence, head group) pairs)."""
    b, h, d = q.shape
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
    return tensor_cores, gp, chunks, n_groups


def split_kv_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                    scale: float | None = None, splits: int | None = None, out: torch.Tensor | None = None,
                    tensor_cores: bool | None = None, fused_merge: bool | None = None,
                    long_splits: bool | None = None, counters: torch.Tensor | None = None,
                    window: int | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence against the cache: q (B, H, D) (unit stride on D, 16-byte aligned rows), k_cache /
    v_cache (B, S_max, H_kv, D) contiguous, lengths (B,) int64 on the device: sequence b attends to positions
    0 .. lengths[b] - 1 (the engine passes its positions + 1: the new token's K/V included; clamped to [0, S_max] on
    the device, length 0 gives zeros; not checked on the host, which would sync); with a sliding `window` (a host
    int, fixed per engine, so a CUDA graph of the call stays valid) only its last `window` of them,
    max(0, L - window) .. L - 1 (Mistral's window, as transformers applies it). Query head h uses KV head
    h // (H / H_kv). Softmax scale `scale` (default D**-0.5), float32 accumulation. Returns (B, H, D) contiguous in
    q's dtype (`out`, when given, is written and returned).

    `block_table` (B, max_blocks) int32, contiguous on q's device: a paged cache. k_cache / v_cache are then one
    layer's pools (n_blocks, block_size, H_kv, D) contiguous, block_size one of PAGED_BLOCK_SIZES, and position t of
    sequence b is pool row block_table[b, t // block_size] * block_size + t % block_size; S_max = max_blocks *
    block_size (the clamp, the split choice). The table is read on the device only (a CUDA graph of the call stays
    valid for any table and lengths), and only its entries of positions attended: those must name blocks of the
    pools (not checked on the host, which would sync); entries past a sequence's length may hold anything.

    `splits`: positions split over that many blocks per (sequence, KV head), default `decode_splits` (a function
    of the shapes only: a CUDA graph of the call stays valid for any lengths; the splits share the positions
    attended, and the default count sees at most `window` of them); with more than one split a second small
    kernel, `kvscope_decode_attention_merge`, combines them. `tensor_cores`: the mma kernel (bf16/fp16 only;
    default for them) or the CUDA-core one (default for float32). `long_splits` (default
    DECODE_ATTENTION_LONG_SPLITS; None: `prefers_long_splits` by shape): True, the default split count from
    `decode_splits_long`; False, from `decode_splits`.

    `fused_merge` (default DECODE_ATTENTION_FUSED_MERGE): no merge launch; the last of each (sequence, head group)'s
    split blocks to finish merges, counted in `counters`: int32, contiguous, at least B * H_kv * head chunks
    elements on q's device, zero at the call; the kernel leaves them zero, so one buffer serves every later call
    and CUDA-graph replay (not checked on the host, which would sync). Default: a buffer kept per device and size,
    zeroed once; two calls running at the same time on different streams need their own `counters`."""
    name = "split_kv_decode"
    s_max = _check_tensors(name, q, k_cache, v_cache, lengths, block_table)
    window = window_arg(name, window)
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{name}: softmax scale {scale} is not finite")
    tensor_cores, gp, chunks, n_groups = _check_options(name, q, hkv, splits, out, tensor_cores, counters)
    need_cuda(name, q.dtype, q, k_cache, v_cache)  # shapes first: they are checked without a GPU too
    if hkv * chunks > GRID_Y_MAX or b > GRID_Y_MAX:
        raise ValueError(f"{name}: {b} sequences x {hkv * chunks} head groups exceed the grid ({GRID_Y_MAX} each)")
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if fused_merge is None:
        fused_merge = DECODE_ATTENTION_FUSED_MERGE
    if splits is None:
        splits = _default_splits(n_groups, min(s_max, window) if window else s_max, index, long_splits)
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
    max_blocks, block_size = (0, 0) if block_table is None else (block_table.shape[1], k_cache.shape[1])
    launch("kvscope_decode_attention", variant, q.dtype, q.device, (splits, hkv * chunks, b),
           (32 * DECODE_ATTENTION_WARPS, 1, 1),
           [ptr(out), ptr(part_o), ptr(part_lse), ptr(counters if fused else None), ptr(q), ptr(k_cache),
            ptr(v_cache), ptr(lengths), ptr(block_table), i32(max_blocks), i32(block_size), i64(q.stride(0)),
            i64(q.stride(1)), i32(h), i32(hkv), i32(s_max), i32(splits), i32(window), f32(scale * _LOG2E)],
           shared_bytes=shared)
    if splits > 1 and not fused:
        launch("kvscope_decode_attention", "merge", q.dtype, q.device, (b * h, 1, 1),
               (DECODE_ATTENTION_MERGE_THREADS, 1, 1), [ptr(out), ptr(part_o), ptr(part_lse), i32(splits), i32(d)])
    return out


def split_kv_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                        scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """`split_kv_decode` with torch operations: scores, softmax and the weighted sum in float32 over positions
    0 .. lengths[b] - 1 (clamped to [0, S_max]; zeros for length 0), from max(0, lengths[b] - window) on with a
    sliding `window`, rounded to q's dtype once. (B, H, D)."""
    window = window_arg("split_kv_decode_ref", window)
    b, h, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qf = q.float().reshape(b, hkv, h // hkv, d)  # (B, H_kv, G, D)
    kf = k_cache.float().permute(0, 2, 3, 1)  # (B, H_kv, D, S_max)
    vf = v_cache.float().transpose(1, 2)  # (B, H_kv, S_max, D)
    scores = torch.matmul(qf, kf) * scale  # (B, H_kv, G, S_max)
    n = lengths.clamp(0, s_max).view(b, 1, 1, 1)
    keys = torch.arange(s_max, device=q.device).view(1, 1, 1, s_max)
    valid = keys < n  # (B, 1, 1, S_max)
    if window:
        valid &= keys >= n - window  # the last `window` positions
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    probs = torch.where(n > 0, probs, torch.zeros_like(probs))  # no position: zeros, not NaN
    return torch.matmul(probs, vf).reshape(b, h, d).to(q.dtype)  # (B, H, D)


def paged_split_kv_decode_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_table: torch.Tensor, lengths: torch.Tensor, scale: float | None = None,
                              window: int | None = None) -> torch.Tensor:
    """`split_kv_decode` over a paged cache with torch operations, on any device (the CPU too): each sequence's
    blocks gathered through `block_table` (B, max_blocks) int32 from the pools (n_blocks, block_size, H_kv, D)
    into (B, max_blocks * block_size, H_kv, D), then `split_kv_decode_ref`. The shapes are checked as the kernel's
    (ValueError; a served block size, the table's dtype and device); entries of positions not attended (past the
    length, before the window) may hold anything: they are clamped into the pools and their rows zeroed, so that
    neither an unused entry nor a stale row reaches the result. (B, H, D)."""
    name = "paged_split_kv_decode_ref"
    s_max = _check_table(name, q, k_pool, v_pool, block_table, lengths)
    w = window_arg(name, window)
    b = q.shape[0]
    n_blocks, _, hkv, d = k_pool.shape
    blocks = block_table.long().clamp(0, n_blocks - 1)  # (B, max_blocks)
    n = lengths.clamp(0, s_max).view(b, 1)
    pos = torch.arange(s_max, device=q.device).view(1, s_max)
    attended = pos < n  # (B, S_max)
    if w:
        attended &= pos >= n - w
    keep = attended.view(b, s_max, 1, 1)
    k = k_pool[blocks].reshape(b, s_max, hkv, d)  # (B, max_blocks, block_size, H_kv, D) -> (B, S_max, H_kv, D)
    v = v_pool[blocks].reshape(b, s_max, hkv, d)  # (B, S_max, H_kv, D)
    k = torch.where(keep, k, k.new_zeros(()))
    v = torch.where(keep, v, v.new_zeros(()))
    return split_kv_decode_ref(q, k, v, lengths, scale, window)
