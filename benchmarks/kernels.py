"""kvscope's CUDA kernels against their torch references and the measured copy ceiling, at the shapes of a model's
decode step (batch 1 and 64) and of a long prefill.

Before a kernel is timed at a shape, its output there is checked against its torch reference (the `*_ref` functions
of the modules of `kvscope.kernels`) within the dtype's tolerance (`kvscope.kernels.common.REF_TOLERANCE`); a kernel
that fails the check gets no time: its row says why, and the script exits with status 1 after the other rows.

Each figure is the median over `--reps` CUDA-event timings of a CUDA graph of `--launches` back-to-back calls
(graph replay keeps the launch cost of the host out of it), divided by the launch count. Bytes are the least each
operation must move (every input read once, every output written once), the same count for the kernel and for the
same work in torch operations (`torch_us`), so GB/s is effective bandwidth; `% copy` is against a device-to-device
copy measured in the same process.

Decode attention (`kvscope.kernels.decode_attention.split_kv_decode`) is timed with a cold L2 instead: one call per
CUDA-graph replay, the L2 flushed before each (`l2_flusher`), against the engine's current decode attention and
torch's SDPA on the cuDNN backend, at issue 16's shapes (batch 1 at 512 / 4k / 32k, batch 16 at 4k, batch 64 at
512; qwen2.5-3b's 16 query and 2 KV heads, d=128); the tensor-core kernel with each split rule and each merge
(separate or fused).

    python3 benchmarks/kernels.py [--model qwen2.5-3b] [--seq 4096] [--dtype bfloat16] [--json out.json]
                                  [--attn-only] [--attn-reps 50] [--attn-splits 66,132,264] [--gemv-only]

The gemv section: each product of a decode step (`kvscope.kernels.gemv.gemv*`) at 1 to 16 rows against cuBLAS
(`F.linear`, the residual ones as `addmm_`), cold L2 like the attention section, then the whole step's products
(36 layers x 4 + lm_head, each layer its own weights) back to back in one CUDA graph, cuBLAS against gemv, with and
without the norms and SiLU*up that lie between them; gemv in each launch choice of GEMV_CONFIGS.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from kvscope.io import write_json
from kvscope.kernels import common as k_common
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.kernels import gemv as k_gemv
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.attention import DecodeMeta, decode_attention
from kvscope.model.config import PRESETS, ModelArgs
from kvscope.model.dtypes import NAMES, from_name, itemsize
from kvscope.model.layers import apply_rope, rope_tables
from kvscope.profiler.timing import graph_ms, median_event_ms


@dataclass
class Case:
    """One kernel at one shape: the kernel call and the same work in torch operations (both timed), the bytes they
    must move, and `check()`, the kernel against its reference on fresh copies of the inputs (None: within tolerance,
    else what differs)."""

    op: str
    kernel: Callable[[], object]
    torch_op: Callable[[], object]
    nbytes: int
    check: Callable[[], str | None]


def mismatch(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
             tolerance: dict[torch.dtype, dict[str, float]] | None = None) -> str | None:
    """The first output whose kernel value is outside the dtype's tolerance of its reference (`tolerance`, default
    `k_common.REF_TOLERANCE`), in one line; None when every one is within it. `outputs`: name -> (kernel's,
    reference's)."""
    for name, (got, want) in outputs.items():
        try:
            torch.testing.assert_close(got, want, **(tolerance or k_common.REF_TOLERANCE)[want.dtype])
        except AssertionError as exc:
            return f"{name}: {' '.join(str(exc).split())[:300]}"
    return None


def rms_norm_case(n: int, dim: int, dt: torch.dtype, g: torch.Generator) -> Case:
    dev = g.device
    x = torch.randn(n, dim, device=dev, generator=g).to(dt)  # (N, dim)
    w = (torch.rand(dim, device=dev, generator=g) + 0.5).to(dt)  # (dim,)
    return Case("rms_norm", lambda: k_rms_norm.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (dim,), w, 1e-6),
                itemsize(dt) * (2 * n * dim + dim),
                lambda: mismatch({"out": (k_rms_norm.rms_norm(x, w, 1e-6), k_rms_norm.rms_norm_ref(x, w, 1e-6))}))


def silu_mul_case(n: int, ff: int, fused: bool, dt: torch.dtype, g: torch.Generator) -> Case:
    """fused: gate and up are the strided halves of one (N, 2F) product (decode); else two contiguous (N, F)."""
    w13 = (torch.randn(n, 2 * ff, device=g.device, generator=g) * 3).to(dt)  # (N, 2F)
    gate, up = w13.split(ff, dim=-1) if fused else (w13[:, :ff].contiguous(), w13[:, ff:].contiguous())  # (N, F)
    return Case("silu_mul", lambda: k_silu_mul.silu_mul(gate, up), lambda: F.silu(gate) * up, itemsize(dt) * 3 * n * ff,
                lambda: mismatch({"out": (k_silu_mul.silu_mul(gate, up), k_silu_mul.silu_mul_ref(gate, up))}))


def rope_kv_case(a: ModelArgs, b: int, s: int, s_max: int, tables: tuple[torch.Tensor, torch.Tensor],
                 g: torch.Generator) -> Case:
    """A prefill (positions 0..S-1) or, with S = 1, a decode step at position 7 of every sequence."""
    h, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    cos, sin_rot = tables  # (S_max, D) each
    dev, dt = cos.device, cos.dtype
    qkv = torch.randn(b, s, h + 2 * hkv, d, device=dev, generator=g).to(dt)  # (B, S, H+2H_kv, D)
    kc, vc = (torch.zeros(b, s_max, hkv, d, device=dev, dtype=dt) for _ in range(2))  # (B, S_max, H_kv, D)
    lengths = torch.full((b,), 7, dtype=torch.int64, device=dev) if s == 1 else None  # (B,)
    pos = (lengths.view(b, 1) if lengths is not None else 0) + torch.arange(s, device=dev).view(1, s)  # (B, S)
    c, sr = cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2)  # (B, S, 1, D)
    kv = torch.stack((kc, vc))  # (2, B, S_max, H_kv, D)
    widx = pos.view(1, b, s, 1, 1).expand(2, b, s, hkv, d)  # (2, B, S, H_kv, D)

    def torch_op() -> None:
        r = apply_rope(qkv[:, :, :h + hkv], c, sr)  # (B, S, H+H_kv, D)
        qkv[:, :, :h + hkv].copy_(r)
        kv.scatter_(2, widx, qkv[:, :, h:].unflatten(2, (2, hkv)).permute(2, 0, 1, 3, 4))  # (2, B, S, H_kv, D)

    def check() -> str | None:
        ours, ref = qkv.clone(), qkv.clone()
        caches = [torch.zeros_like(kc) for _ in range(4)]
        k_rope_kv.rope_kv_(ours, cos, sin_rot, caches[0], caches[1], h, lengths)
        k_rope_kv.rope_kv_ref_(ref, cos, sin_rot, caches[2], caches[3], h, lengths)
        return mismatch({"qkv": (ours, ref), "k_cache": (caches[0], caches[2]), "v_cache": (caches[1], caches[3])})

    nbytes = itemsize(dt) * b * s * ((h + 2 * hkv) * d + (h + hkv) * d + 2 * hkv * d + 2 * d)
    return Case("rope_kv", lambda: k_rope_kv.rope_kv_(qkv, cos, sin_rot, kc, vc, h, lengths), torch_op, nbytes, check)


def measure(label: str, cases: list[Case], time_us: Callable[[Callable[[], object]], float], copy_gb_s: float
            ) -> list[dict[str, Any]]:
    """One row per case: checked first; timed (kernel and torch) only when the check passed."""
    rows = []
    for case in cases:
        bad = case.check()
        row: dict[str, Any] = {"shape": label, "op": case.op, "bytes": case.nbytes, "check": bad or "passed"}
        if bad is not None:
            print(f"{label:>14} {case.op:9} FAILED its reference check, no time reported: {bad}")
            rows.append(row)
            continue
        us_k, us_t = time_us(case.kernel), time_us(case.torch_op)
        gbs = case.nbytes / (us_k / 1e6) / 1e9
        row.update({"kernel_us": us_k, "torch_us": us_t, "kernel_gb_s": gbs, "pct_copy": 100 * gbs / copy_gb_s,
                    "speedup": us_t / us_k})
        rows.append(row)
        print(f"{label:>14} {case.op:9} {case.nbytes / 1e6:9.2f} MB  kernel {us_k:8.2f} us {gbs:7.0f} GB/s "
              f"({row['pct_copy']:5.1f}% of copy)  torch {us_t:8.2f} us  {row['speedup']:5.2f}x")
    return rows


def copy_bandwidth_gb_s(dev: torch.device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (as `kvscope calibrate` measures)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_event_ms(lambda: dst.copy_(src), reps=20) / 1e3) / 1e9


def shape_cases(a: ModelArgs, b: int, s: int, s_max: int, tables: tuple[torch.Tensor, torch.Tensor]) -> list[Case]:
    dt = tables[0].dtype
    g = torch.Generator(device=tables[0].device).manual_seed(b * s)
    return [rms_norm_case(b * s, a.dim, dt, g), silu_mul_case(b * s, a.intermediate_size, s == 1, dt, g),
            rope_kv_case(a, b, s, s_max, tables, g)]


# ---- decode attention: kvscope.kernels.decode_attention.split_kv_decode against the engine's flash path, cold L2 ---
ATTN_SHAPES = ((1, 512), (1, 4096), (1, 32_768), (16, 4096), (64, 512))  # (batch, context) of issue 16
ATTN_HEADS = (16, 2, 128)  # qwen2.5-3b: query heads, KV heads, head_dim
ATTN_FLUSH_MIN_BYTES = 256 * 2**20


def l2_flusher(dev: torch.device) -> Callable[[], None]:
    """Evicts the L2 between repetitions: writes a buffer of four times the L2 (at least 256 MiB), then reads another
    as large, so that the timed call finds none of its data in the L2 and no dirty line of the flush left to write
    back."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
    n = max(4 * l2, ATTN_FLUSH_MIN_BYTES)
    wbuf = torch.empty(n, dtype=torch.uint8, device=dev)
    rbuf = torch.ones(n // 4, dtype=torch.float32, device=dev)
    sink = torch.empty((), dtype=torch.float32, device=dev)

    def flush() -> None:
        wbuf.fill_(1)
        torch.sum(rbuf, dim=0, out=sink)
    return flush


def cold_us(fn: Callable[[], object], flush: Callable[[], None], reps: int) -> float:
    """Median device time (CUDA events) of one call of `fn`, captured in a CUDA graph and replayed after an L2
    flush; three untimed replays first. One named sync after the last repetition."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles and warms outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(3):
        flush()
        graph.replay()
    for start, end in events:
        flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()  # named sync: every repetition is done before the events are read
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def cudnn_sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int
                  ) -> tuple[Callable[[], torch.Tensor], str]:
    """torch's SDPA restricted to the cuDNN backend over a (B, H_kv, ctx, D) copy of the cache's valid positions,
    query (B, H, 1, D): with `enable_gqa` where this torch takes it there, else over K/V expanded to H heads. Returns
    the call ((B, H, D) out) and the layout used ("gqa" / "expanded"); RuntimeError when cuDNN takes neither."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, d = q.shape
    hkv = k.shape[2]
    q4 = q.view(b, h, 1, d)  # (B, H, 1, D)
    kc, vc = (t[:, :ctx].transpose(1, 2).contiguous() for t in (k, v))  # (B, H_kv, ctx, D)

    def gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True).view(b, h, d)
    try:
        gqa()
        return gqa, "gqa"
    except RuntimeError:
        ke, ve = (t.repeat_interleave(h // hkv, dim=1) for t in (kc, vc))  # (B, H, ctx, D)

        def expanded() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q4, ke, ve).view(b, h, d)
        expanded()
        return expanded, "expanded"


def decode_attention_rows(dev: torch.device, dt: torch.dtype, copy_gb_s: float, reps: int,
                          extra_splits: list[int]) -> list[dict[str, Any]]:
    """Per (batch, context): the tensor-core kernel in four variants, each split rule (`decode_splits`,
    `decode_splits_long`) with the separate merge kernel and with the merge fused (and at `extra_splits`, separate
    merge), the CUDA-core kernel at its own split count, the engine's current decode attention (flash attention over
    the cache in place, `seqused_k`) and torch's SDPA on the cuDNN backend over a (B, H_kv, ctx, D) copy
    (`cudnn_sdpa_op`), each checked against `split_kv_decode_ref` first. Bytes: K and V of the valid positions, q,
    the output and the lengths, each once."""
    h, hkv, d = ATTN_HEADS
    flush = l2_flusher(dev)
    rows: list[dict[str, Any]] = []
    for b, ctx in ATTN_SHAPES:
        s_max = ctx + 64  # the engine's cache holds the prompt and the tokens still to come
        g = torch.Generator(device=dev).manual_seed(b * ctx)
        q = torch.randn(b, h, d, device=dev, generator=g).to(dt)  # (B, H, D)
        k, v = (torch.randn(b, s_max, hkv, d, device=dev, generator=g).to(dt) for _ in range(2))  # (B, S, H_kv, D)
        lengths = torch.full((b,), ctx, dtype=torch.int64, device=dev)  # (B,)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)  # (B+1,)
        meta = DecodeMeta(span=s_max, seqused=lengths.int(), cu_q=cu_q, cu_k=cu_q * s_max)
        out = torch.empty(b, h, d, dtype=dt, device=dev)  # (B, H, D)
        label = f"attn bs{b} ctx{ctx}"
        nbytes = itemsize(dt) * (2 * b * ctx * hkv * d + 2 * b * h * d) + 8 * b
        ref = k_decode_attention.split_kv_decode_ref(q, k, v, lengths)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        autos = {tc: k_decode_attention.decode_splits(
                     b * hkv * k_decode_attention.decode_group_chunk(h // hkv, tc)[1], s_max, sms)
                 for tc in (True, False)}
        mma_groups = b * hkv * k_decode_attention.decode_group_chunk(h // hkv, True)[1]
        longs = k_decode_attention.decode_splits_long(mma_groups, s_max, sms)
        longs_2x = k_decode_attention.decode_splits_long(
            mma_groups, s_max, sms, 2 * k_decode_attention.DECODE_ATTENTION_LONG_MIN_SPLIT_TOKENS)
        us_c, layout_c = float("nan"), "unavailable"
        try:
            cudnn_op, layout_c = cudnn_sdpa_op(q, k, v, ctx)
            bad_c = mismatch({"cudnn": (cudnn_op(), ref)}, k_decode_attention.DECODE_ATTENTION_TOLERANCE)
            us_c = cold_us(cudnn_op, flush, reps) if bad_c is None else float("nan")
            print(f"{label:>18} cudnn sdpa ({layout_c}) {us_c:7.2f} us  {bad_c or 'check passed'}")
        except RuntimeError as e:  # this torch / dtype has no cuDNN SDPA: no figure, said so
            print(f"{label:>18} cudnn sdpa unavailable: {str(e).splitlines()[0]}")

        torch_op = partial(decode_attention, q, k, v, meta, "sdpa")  # the engine's flash path, (B, H, D)
        bad_t = mismatch({"torch": (torch_op(), ref)}, k_decode_attention.DECODE_ATTENTION_TOLERANCE)
        us_t = cold_us(torch_op, flush, reps) if bad_t is None else float("nan")
        gbs_t = nbytes / (us_t / 1e6) / 1e9
        # the tensor-core kernel: each split rule (and the long one at twice its shortest split) with the separate
        # and the fused merge, then `extra_splits`
        # (separate merge); the CUDA-core kernel at its own split count. (splits, tensor cores, fused, rule)
        runs = ([(autos[True], True, False, "waves"), (autos[True], True, True, "waves"),
                 (longs, True, False, "long"), (longs, True, True, "long"),
                 (longs_2x, True, False, "long2x"), (longs_2x, True, True, "long2x")]
                + [(n, True, False, "forced") for n in extra_splits if n not in (autos[True], longs)]
                + [(autos[False], False, False, "waves")])
        for splits, tc, fused, rule in runs:
            auto = rule != "forced"
            kernel_op = partial(k_decode_attention.split_kv_decode, q, k, v, lengths, splits=splits, out=out,
                                tensor_cores=tc, fused_merge=fused)
            out.fill_(float("nan"))
            kernel_op()
            bad = mismatch({"out": (out.clone(), ref)}, k_decode_attention.DECODE_ATTENTION_TOLERANCE)
            kind = ("mma" if tc else "cuda-core") + (f" {rule}" if rule.startswith("long") else "") + (
                " fused" if fused else "")
            row: dict[str, Any] = {"shape": label, "op": f"decode_attention {kind}", "splits": splits, "auto": auto,
                                   "split_rule": rule, "merge": "fused" if fused else "kernel", "bytes": nbytes,
                                   "check": bad or bad_t or "passed"}
            if bad is not None or bad_t is not None:
                print(f"{label:>18} {kind:9} splits {splits:4} FAILED its reference check, no time reported: "
                      f"{bad or bad_t}")
                rows.append(row)
                continue
            us_k = cold_us(kernel_op, flush, reps)
            gbs = nbytes / (us_k / 1e6) / 1e9
            row.update({"kernel_us": us_k, "torch_us": us_t, "kernel_gb_s": gbs, "pct_copy": 100 * gbs / copy_gb_s,
                        "torch_gb_s": gbs_t, "torch_pct_copy": 100 * gbs_t / copy_gb_s, "speedup": us_t / us_k,
                        "cudnn_us": us_c, "cudnn_layout": layout_c, "vs_cudnn": us_c / us_k})
            rows.append(row)
            print(f"{label:>18} {kind:20} splits {splits:4}{'*' if auto else ' '} {nbytes / 1e6:7.2f} MB  kernel "
                  f"{us_k:7.2f} us {gbs:6.0f} GB/s ({row['pct_copy']:5.1f}% of copy)  torch {us_t:7.2f} us {gbs_t:6.0f}"
                  f" GB/s ({row['torch_pct_copy']:5.1f}%)  {row['speedup']:5.2f}x  cudnn {us_c:7.2f} us "
                  f"{row['vs_cudnn']:5.2f}x")
    return rows


# ---- decode-step products: kvscope.kernels.gemv.gemv* against cuBLAS ---------------------------------------------
GEMV_BENCH_ROWS = (1, 2, 4, 16)
GEMV_STEP_ROWS = (1, 2, 4)
GEMV_NORM_EPS = 1e-6
# (name, pipelined, K split below this many blocks per SM): the launch choices measured side by side
GEMV_CONFIGS = (("burst", False, 1), ("pipelined", True, 1), ("pipe+split", True, 2))


@dataclass
class StepWeights:
    """Random weights of a decode step's products and norms (each W ~ N(0, 1/K): outputs of order one)."""

    wqkv: list[torch.Tensor]
    bqkv: list[torch.Tensor]
    wo: list[torch.Tensor]
    w13: list[torch.Tensor]
    w2: list[torch.Tensor]
    norm: torch.Tensor  # (dim,), shared by every norm (the values do not change the work)
    lm_head: torch.Tensor

    def nbytes(self) -> int:
        """Weight bytes one step reads (the products' floor; activations are a few KB)."""
        ts = [*self.wqkv, *self.bqkv, *self.wo, *self.w13, *self.w2, self.lm_head]
        return sum(t.numel() * t.element_size() for t in ts)


def step_weights(a: ModelArgs, dev: torch.device, dt: torch.dtype) -> StepWeights:
    def w(n: int, k: int) -> torch.Tensor:
        return torch.empty(n, k, dtype=dt, device=dev).normal_(0, k ** -0.5)

    qkv_n = a.q_size + 2 * a.kv_size
    layers = range(a.n_layers)
    return StepWeights([w(qkv_n, a.dim) for _ in layers], [torch.randn(qkv_n, device=dev).to(dt) for _ in layers],
                       [w(a.dim, a.q_size) for _ in layers], [w(2 * a.intermediate_size, a.dim) for _ in layers],
                       [w(a.dim, a.intermediate_size) for _ in layers], (torch.rand(a.dim, device=dev) + 0.5).to(dt),
                       w(a.vocab_size, a.dim))


def gemv_product_rows(a: ModelArgs, sw: StepWeights, m: int, copy_gb_s: float, reps: int,
                      flush: Callable[[], None]) -> list[dict[str, Any]]:
    """Layer 0's products and the lm_head at m rows, cold L2: gemv against cuBLAS, each checked first; `+norm`: the
    kernel's RMSNorm prologue against kvscope's RMSNorm kernel then cuBLAS (the engine's path before gemv)."""
    dev, dt = sw.norm.device, sw.norm.dtype
    g = torch.Generator(device=dev).manual_seed(m)
    x = torch.randn(m, a.dim, device=dev, generator=g).to(dt)  # (M, dim), a normalised input
    h = (torch.randn(m, a.dim, device=dev, generator=g) * 20).to(dt)  # (M, dim), the residual stream
    y = torch.randn(m, a.q_size, device=dev, generator=g).to(dt)  # (M, H*D), the attention's output
    act = torch.randn(m, a.intermediate_size, device=dev, generator=g).to(dt)  # (M, F)
    nw, eps = sw.norm, GEMV_NORM_EPS
    wqkv, bqkv, wo, w13, w2, lm = sw.wqkv[0], sw.bqkv[0], sw.wo[0], sw.w13[0], sw.w2[0], sw.lm_head
    xn = k_rms_norm.rms_norm_ref(h, nw, eps)
    hd = h.clone()  # the residual products update this one in place, rep after rep

    def nb(*ts: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    # op: (kernel, cuBLAS path, check (got, want, x for the scale, W, silu), bytes)
    cases: dict[str, tuple[Callable[..., object], Callable[[], object], Callable[..., tuple], int]] = {
        "qkv": (partial(k_gemv.gemv, x, wqkv, bqkv), partial(F.linear, x, wqkv, bqkv),
                lambda **o: (k_gemv.gemv(x, wqkv, bqkv, **o), k_gemv.gemv_ref(x, wqkv, bqkv), x, wqkv, False),
                nb(wqkv, bqkv, x) + m * wqkv.shape[0] * dt.itemsize),
        "qkv+norm": (partial(k_gemv.gemv, h, wqkv, bqkv, nw, eps),
                     lambda: F.linear(k_rms_norm.rms_norm(h, nw, eps), wqkv, bqkv),
                     lambda **o: (k_gemv.gemv(h, wqkv, bqkv, nw, eps, **o), k_gemv.gemv_ref(h, wqkv, bqkv, nw, eps), xn,
                                  wqkv, False), nb(wqkv, bqkv, h, nw) + m * wqkv.shape[0] * dt.itemsize),
        "o_proj": (partial(k_gemv.gemv_residual_, hd, y, wo), lambda: hd.addmm_(y, wo.t()),
                   lambda **o: (k_gemv.gemv_residual_(h.clone(), y, wo, **o),
                                k_gemv.gemv_residual_ref_(h.clone(), y, wo), y, wo, False), nb(wo, y) + 2 * nb(h)),
        "w13": (partial(k_gemv.gemv_silu_mul, x, w13), partial(F.linear, x, w13),
                lambda **o: (k_gemv.gemv_silu_mul(x, w13, **o), k_gemv.gemv_silu_mul_ref(x, w13), x, w13, True),
                nb(w13, x) + m * a.intermediate_size * dt.itemsize),
        "w13+norm": (partial(k_gemv.gemv_silu_mul, h, w13, nw, eps),
                     lambda: k_silu_mul.silu_mul(
                         *F.linear(k_rms_norm.rms_norm(h, nw, eps), w13).split(a.intermediate_size, -1)),
                     lambda **o: (k_gemv.gemv_silu_mul(h, w13, nw, eps, **o), k_gemv.gemv_silu_mul_ref(h, w13, nw, eps),
                                  xn, w13, True), nb(w13, h, nw) + m * a.intermediate_size * dt.itemsize),
        "w2": (partial(k_gemv.gemv_residual_, hd, act, w2), lambda: hd.addmm_(act, w2.t()),
               lambda **o: (k_gemv.gemv_residual_(h.clone(), act, w2, **o),
                            k_gemv.gemv_residual_ref_(h.clone(), act, w2), act, w2, False), nb(w2, act) + 2 * nb(h)),
        "lm_head": (partial(k_gemv.gemv, x, lm), partial(F.linear, x, lm),
                    lambda **o: (k_gemv.gemv(x, lm, **o), k_gemv.gemv_ref(x, lm), x, lm, False),
                    nb(lm, x) + m * lm.shape[0] * dt.itemsize),
        "lm_head+norm": (partial(k_gemv.gemv, h, lm, None, nw, eps),
                         lambda: F.linear(k_rms_norm.rms_norm(h, nw, eps), lm),
                         lambda **o: (k_gemv.gemv(h, lm, None, nw, eps, **o), k_gemv.gemv_ref(h, lm, None, nw, eps), xn,
                                      lm, False),
                         nb(lm, h, nw) + m * lm.shape[0] * dt.itemsize),
    }
    rows = []
    for op, (kernel, cublas, check, nbytes) in cases.items():
        us_t = cold_us(cublas, flush, reps)
        gbs_t = nbytes / (us_t / 1e6) / 1e9
        for config, pipelined, per_sm in GEMV_CONFIGS:
            opts = {"pipelined": pipelined, "split_blocks_per_sm": per_sm}  # the launch choice, passed to each call
            got, want, xs, w, silu = check(**opts)
            try:
                torch.testing.assert_close(got, want, **k_gemv.gemv_tolerance(xs, w, silu))
                bad = None
            except AssertionError as exc:
                bad = " ".join(str(exc).split())[:300]
            row: dict[str, Any] = {"shape": f"gemv bs{m}", "op": op, "config": config, "bytes": nbytes,
                                   "check": bad or "passed"}
            rows.append(row)
            if bad is not None:
                print(f"{'gemv bs' + str(m):>14} {op:13} {config:10} FAILED its reference check, no time: {bad}")
                continue
            us_k = cold_us(partial(kernel, **opts), flush, reps)
            gbs = nbytes / (us_k / 1e6) / 1e9
            row.update({"kernel_us": us_k, "torch_us": us_t, "kernel_gb_s": gbs, "pct_copy": 100 * gbs / copy_gb_s,
                        "torch_gb_s": gbs_t, "torch_pct_copy": 100 * gbs_t / copy_gb_s, "speedup": us_t / us_k})
            print(f"{'gemv bs' + str(m):>14} {op:13} {config:10} {nbytes / 1e6:7.2f} MB  gemv {us_k:7.2f} us "
                  f"{gbs:5.0f} GB/s ({row['pct_copy']:5.1f}%)  cuBLAS{'+norm' if 'norm' in op else ''} "
                  f"{us_t:7.2f} us {gbs_t:5.0f} GB/s ({row['torch_pct_copy']:5.1f}%)  {row['speedup']:5.2f}x")
    return rows


def gemv_step_rows(a: ModelArgs, sw: StepWeights, m: int, copy_gb_s: float, reps: int, flush: Callable[[], None],
                   norm_max_rows: int) -> list[dict[str, Any]]:
    """A decode step's products back to back in one CUDA graph (every layer its own weights: no L2 reuse), at m rows:
    `products`: the 4 products per layer and the lm_head alone, cuBLAS (F.linear / addmm_) against gemv (bias,
    residual and SiLU*up in its epilogues); `between`: with the norms and SiLU*up of the engine's kernels-on step
    (RMSNorm kernel, cuBLAS, silu_mul kernel) against the engine's gemv path (norm fused up to `norm_max_rows`)."""
    dev, dt = sw.norm.device, sw.norm.dtype
    h = torch.randn(m, a.dim, device=dev).to(dt)  # (M, dim)
    x = torch.randn(m, a.dim, device=dev).to(dt)  # (M, dim)
    y = torch.randn(m, a.q_size, device=dev).to(dt)  # (M, H*D)
    act = torch.randn(m, a.intermediate_size, device=dev).to(dt)  # (M, F)
    nw, eps, f = sw.norm, GEMV_NORM_EPS, a.intermediate_size

    def cublas_products() -> None:
        for i in range(a.n_layers):
            F.linear(x, sw.wqkv[i], sw.bqkv[i])
            h.addmm_(y, sw.wo[i].t())
            F.linear(x, sw.w13[i])
            h.addmm_(act, sw.w2[i].t())
        F.linear(x, sw.lm_head)

    def gemv_products(**o: Any) -> None:
        for i in range(a.n_layers):
            k_gemv.gemv(x, sw.wqkv[i], sw.bqkv[i], **o)
            k_gemv.gemv_residual_(h, y, sw.wo[i], **o)
            k_gemv.gemv_silu_mul(x, sw.w13[i], **o)
            k_gemv.gemv_residual_(h, act, sw.w2[i], **o)
        k_gemv.gemv(x, sw.lm_head, **o)

    def cublas_between() -> None:
        for i in range(a.n_layers):
            F.linear(k_rms_norm.rms_norm(h, nw, eps), sw.wqkv[i], sw.bqkv[i])
            h.addmm_(y, sw.wo[i].t())  # linear_residual_ without a bias
            gate, up = F.linear(k_rms_norm.rms_norm(h, nw, eps), sw.w13[i]).split(f, dim=-1)
            h.addmm_(k_silu_mul.silu_mul(gate, up), sw.w2[i].t())
        F.linear(k_rms_norm.rms_norm(h, nw, eps), sw.lm_head)

    def gemv_between(**o: Any) -> None:
        fused = m <= norm_max_rows
        for i in range(a.n_layers):
            if fused:
                k_gemv.gemv(h, sw.wqkv[i], sw.bqkv[i], nw, eps, **o)
            else:
                k_gemv.gemv(k_rms_norm.rms_norm(h, nw, eps), sw.wqkv[i], sw.bqkv[i], **o)
            k_gemv.gemv_residual_(h, y, sw.wo[i], **o)
            a13 = k_gemv.gemv_silu_mul(h, sw.w13[i], nw, eps, **o) if fused else k_gemv.gemv_silu_mul(
                k_rms_norm.rms_norm(h, nw, eps), sw.w13[i], **o)
            k_gemv.gemv_residual_(h, a13, sw.w2[i], **o)
        if fused:
            k_gemv.gemv(h, sw.lm_head, None, nw, eps, **o)
        else:
            k_gemv.gemv(k_rms_norm.rms_norm(h, nw, eps), sw.lm_head, **o)

    nbytes = sw.nbytes()
    rows = []
    for what, cublas, ours in (("products", cublas_products, gemv_products), ("between", cublas_between, gemv_between)):
        h.normal_()
        us_t = cold_us(cublas, flush, reps)
        gbs_t = nbytes / (us_t / 1e6) / 1e9
        for config, pipelined, per_sm in GEMV_CONFIGS:
            h.normal_()
            us_k = cold_us(partial(ours, pipelined=pipelined, split_blocks_per_sm=per_sm), flush, reps)
            gbs = nbytes / (us_k / 1e6) / 1e9
            row = {"shape": f"step bs{m}", "op": f"step {what}", "config": config, "bytes": nbytes,
                   "check": "passed", "kernel_us": us_k, "torch_us": us_t, "kernel_gb_s": gbs,
                   "pct_copy": 100 * gbs / copy_gb_s, "torch_gb_s": gbs_t, "torch_pct_copy": 100 * gbs_t / copy_gb_s,
                   "speedup": us_t / us_k}
            rows.append(row)
            print(f"{'step bs' + str(m):>14} {what:9} {config:10} {nbytes / 1e9:5.2f} GB  gemv {us_k / 1e3:6.3f} ms "
                  f"{gbs:5.0f} GB/s ({row['pct_copy']:5.1f}%)  cuBLAS {us_t / 1e3:6.3f} ms {gbs_t:5.0f} GB/s "
                  f"({row['torch_pct_copy']:5.1f}%)  {row['speedup']:5.2f}x")
    return rows


def gemv_rows(a: ModelArgs, dev: torch.device, dt: torch.dtype, copy_gb_s: float, reps: int) -> list[dict[str, Any]]:
    from kvscope.engine.layer_ops import GEMV_NORM_MAX_ROWS

    sw = step_weights(a, dev, dt)
    flush = l2_flusher(dev)
    rows: list[dict[str, Any]] = []
    for m in GEMV_BENCH_ROWS:
        rows += gemv_product_rows(a, sw, m, copy_gb_s, reps, flush)
    for m in GEMV_STEP_ROWS:
        rows += gemv_step_rows(a, sw, m, copy_gb_s, max(5, reps // 5), flush, GEMV_NORM_MAX_ROWS)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096, help="prefill tokens")
    p.add_argument("--dtype", default="bfloat16", choices=NAMES)
    p.add_argument("--launches", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--attn-only", action="store_true", help="only the decode-attention section")
    p.add_argument("--attn-reps", type=int, default=50, help="cold-L2 repetitions per decode-attention figure")
    p.add_argument("--attn-splits", default="", help="comma-separated split counts to time besides the kernel's own")
    p.add_argument("--gemv-only", action="store_true", help="only the gemv section (decode-step products)")
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), from_name(ns.dtype)
    a = PRESETS[ns.model]
    copy_gb_s = copy_bandwidth_gb_s(dev)
    name = torch.cuda.get_device_name(dev)
    print(f"{name}: {ns.model} shapes, {dt.name}; device-to-device copy {copy_gb_s:.0f} GB/s")
    s_max = ns.seq + 64
    tables = rope_tables(a, s_max, dev, dt.torch_dtype)  # (S_max, D) each

    def time_us(fn: Callable[[], object]) -> float:
        """Median device time of one call in µs, from a CUDA graph of `--launches` calls."""
        return graph_ms(fn, calls=ns.launches, reps=ns.reps, warmup=3) * 1e3

    rows = []
    for label, b, s in () if ns.attn_only or ns.gemv_only else (("decode bs1", 1, 1), ("decode bs64", 64, 1),
                                                (f"prefill {ns.seq}", 1, ns.seq)):
        rows += measure(label, shape_cases(a, b, s, s_max, tables), time_us, copy_gb_s)
    if not ns.gemv_only:
        rows += decode_attention_rows(dev, dt.torch_dtype, copy_gb_s, ns.attn_reps,
                                      [int(n) for n in ns.attn_splits.split(",") if n.strip()])
    if not ns.attn_only:
        rows += gemv_rows(a, dev, dt.torch_dtype, copy_gb_s, ns.attn_reps)
    if ns.json:
        write_json({"device": name, "date": datetime.now(UTC).date().isoformat(), "torch": torch.__version__,
                    "model": ns.model, "dtype": dt.name, "copy_gb_s": copy_gb_s, "launches": ns.launches,
                    "rows": rows}, ns.json)
    failed = [f"{r['shape']} {r['op']}" for r in rows if r["check"] != "passed"]
    if failed:
        raise SystemExit(f"reference check failed, no time reported: {', '.join(failed)}")


if __name__ == "__main__":
    main()
