"""KV-cache memory maths in exact integers: bytes per token, per request, capacity, Little's law, paging waste.

Every figure is derived from `ModelArgs` and the byte width of the dtypes, nothing else, so it can be checked
against what `kvscope run` measures (`KVCache.nbytes` and the allocator's growth when the cache is made).

A sliding window W (Mistral's `sliding_window`) bounds what attention reads, not what kvscope's cache holds: the
cache is contiguous and keeps every position, so `kv_bytes_per_request`, `kv_bytes_total` and the capacity figures
count all `seq` positions, as the engine allocates them. With a window the result adds `sliding_window`,
`attended_positions` (min(seq, W): the positions a decode step at `seq` reads per sequence),
`kv_bytes_read_per_step` (K and V a decode step of the batch reads at `seq`) and `kv_bytes_per_request_ring` (what
a ring cache of the window would hold per request: min(seq, W) positions; kvscope has none).

Budget (what the capacity figures fit into): the GPU's memory, minus the weights, minus a stated reserve
(`reserve_bytes`: CUDA context, cuBLAS workspaces, allocator slack; 1 GiB unless told), minus the workspace of a
decode step: one token per sequence through the widest activations of a layer plus the last-position logits,
`batch * (2*intermediate + q + 2*kv + 3*dim + vocab) * dtype bytes`, with the vocabulary's logits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvscope.errors import KvscopeError
from kvscope.model.config import RUN_DTYPE_BYTES, kv_bytes_per_token  # torch-free; also KVCache.bytes_for's formula
from kvscope.model.tp import local_args  # torch-free
from kvscope.schema import GIB_BYTES

if TYPE_CHECKING:  # for annotations only: analysis imports no torch (kvscope.model.config does)
    from kvscope.model.config import ModelArgs

# the run dtypes, their short names, and fp8 for a KV cache kvscope does not run
DTYPE_BYTES = {**RUN_DTYPE_BYTES, "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DEFAULT_RESERVE_BYTES = GIB_BYTES
FP32_BYTES = 4


def dtype_bytes(name: str) -> int:
    key = name.lower()
    if key not in DTYPE_BYTES:
        raise KvscopeError(f"unknown dtype {name!r}; choose from bf16, fp16, fp32, fp8")
    return DTYPE_BYTES[key]


def weights_bytes(args: ModelArgs, w_bytes: int) -> int:
    """Parameters counted once (tied embeddings once)."""
    return args.param_count() * w_bytes


def decode_workspace_bytes(args: ModelArgs, batch: int, act_bytes: int, vocab: int | None = None) -> int:
    """`vocab`: the logits' width when it is not `args.vocab_size` (a tensor-parallel rank gathers all of them)."""
    per_seq = (2 * args.intermediate_size + args.q_size + 2 * args.kv_size + 3 * args.dim) * act_bytes
    return batch * (per_seq + (args.vocab_size if vocab is None else vocab) * FP32_BYTES)


@dataclass(frozen=True)
class KvQuery:
    args: ModelArgs
    batch: int = 1
    seq: int = 0  # 0: the model's maximum context
    dtype: str = "bfloat16"
    kv_dtype: str | None = None  # None: same as dtype
    gpu_mem_bytes: int | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    rps: float | None = None
    latency_s: float | None = None
    page_size: int | None = None
    tp: int = 1  # tensor parallelism: the budget and capacity are per GPU, each holding 1/tp of the model


def kv_math(q: KvQuery) -> dict[str, Any]:
    a = q.args
    seq = q.seq or a.max_position_embeddings
    if q.batch <= 0:
        raise KvscopeError(f"--batch-size must be positive, got {q.batch}")
    if seq <= 0:
        raise KvscopeError(f"--seq must be positive, got {seq}")
    if seq > a.max_position_embeddings:
        raise KvscopeError(f"--seq {seq} exceeds {a.name}'s maximum context of {a.max_position_embeddings}")
    w = dtype_bytes(q.dtype)
    kvb = dtype_bytes(q.kv_dtype or q.dtype)
    per_token = kv_bytes_per_token(a, kvb)
    out: dict[str, Any] = {
        "model": a.name, "dtype": q.dtype, "kv_dtype": q.kv_dtype or q.dtype, "batch": q.batch, "seq": seq,
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_request": per_token * seq,
        "kv_bytes_total": per_token * seq * q.batch,
        **_window(a, seq, q.batch, per_token),
        "weights_bytes": weights_bytes(a, w),
        "logits_bytes_full": q.batch * seq * a.vocab_size * w,
        "logits_bytes_last": q.batch * a.vocab_size * w,
        "workspace_bytes": decode_workspace_bytes(a, q.batch, w),
        "reserve_bytes": q.reserve_bytes,
    }
    # per GPU: one rank's part of the model (kvscope.model.tp: heads, KV heads, MLP width, vocabulary / tp)
    gpu = local_args(a, q.tp) if q.tp != 1 else a
    if q.tp != 1:
        out.update({"tp": q.tp, "kv_bytes_per_token_per_gpu": kv_bytes_per_token(gpu, kvb),
                    "kv_bytes_total_per_gpu": kv_bytes_per_token(gpu, kvb) * seq * q.batch,
                    "weights_bytes_per_gpu": weights_bytes(gpu, w),
                    "workspace_bytes_per_gpu": decode_workspace_bytes(gpu, q.batch, w, a.vocab_size)})
    if q.gpu_mem_bytes is not None:
        if q.gpu_mem_bytes <= 0:
            raise KvscopeError(f"GPU memory budget must be positive, got {q.gpu_mem_bytes} bytes")
        out["gpu_mem_bytes"] = q.gpu_mem_bytes
        out.update(_capacity(gpu, q, seq, kv_bytes_per_token(gpu, kvb), w, a.vocab_size))
    if (q.rps is None) != (q.latency_s is None):
        raise KvscopeError("--rps and --latency-s go together")
    if q.rps is not None:
        if q.rps <= 0 or q.latency_s <= 0:
            raise KvscopeError(f"--rps and --latency-s must be positive, got {q.rps} and {q.latency_s}")
        concurrency = math.ceil(q.rps * q.latency_s - 1e-9)
        out["concurrency"] = concurrency
        out["concurrency_kv_bytes"] = concurrency * per_token * seq
    if q.page_size is not None:
        if q.page_size <= 0:
            raise KvscopeError(f"--page-size must be positive, got {q.page_size}")
        out.update(_paging(q.page_size, seq, q.batch, per_token))
    return out


def _window(a: ModelArgs, seq: int, batch: int, per_token: int) -> dict[str, int]:
    """The sliding window's bound (see the module docstring); nothing for a model without one."""
    if a.sliding_window is None:
        return {}
    seen = min(seq, a.sliding_window)
    return {"sliding_window": a.sliding_window, "attended_positions": seen,
            "kv_bytes_read_per_step": per_token * seen * batch, "kv_bytes_per_request_ring": per_token * seen}


def _capacity(a: ModelArgs, q: KvQuery, seq: int, per_token: int, w: int, vocab: int) -> dict[str, int]:
    """Largest batch at `seq` and longest context at `batch` that fit the budget of one GPU holding the model `a`
    (all of it, or one tensor-parallel rank's part) and the `vocab` logits (0 when nothing fits)."""
    fixed = q.gpu_mem_bytes - weights_bytes(a, w) - q.reserve_bytes
    per_seq_ws = decode_workspace_bytes(a, 1, w, vocab)
    # batch b fits when fixed - b * (per_token * seq + per_seq_ws) >= 0
    max_batch = max(0, fixed // (per_token * seq + per_seq_ws)) if fixed > 0 else 0
    avail_for_kv = fixed - decode_workspace_bytes(a, q.batch, w, vocab)
    max_seq = max(0, avail_for_kv // (per_token * q.batch)) if avail_for_kv > 0 else 0
    return {"budget_bytes": max(0, fixed), "max_batch": int(max_batch),
            "max_seq": int(min(max_seq, a.max_position_embeddings))}


def _paging(page: int, seq: int, batch: int, per_token: int) -> dict[str, int | float]:
    """Last-page fragmentation: a request of `seq` tokens occupies ceil(seq/page) pages."""
    pages = -(-seq // page)
    waste_tokens = pages * page - seq
    return {
        "page_size": page,
        "pages_per_request": pages,
        "page_waste_bytes": batch * waste_tokens * per_token,  # at exactly `seq` tokens
        "page_waste_bytes_expected": batch * (page - 1) * per_token / 2,  # lengths uniform over a page
        "page_waste_bytes_worst": batch * (page - 1) * per_token,
    }
