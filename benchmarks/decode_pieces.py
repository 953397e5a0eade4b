"""The pieces of a decode step, each replayed 36 times from one CUDA graph (a layer's worth per model), so the
per-call time includes the gaps between kernels inside a graph: decode attention variants, RMSNorm, residual adds,
RoPE and the K/V write, at `qwen2.5-3b` shapes (16 query heads, 2 KV heads, head_dim 128, dim 2048), bf16.
Kernels per call are counted with the torch profiler. This is how the fast decode step's torch-level choices were
made; `--kernels on` (the default on CUDA) replaces the RMSNorm, RoPE + K/V write and SiLU*up pieces with kvscope's
own kernels (`benchmarks/kernels.py` measures those).

    python3 benchmarks/decode_pieces.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from kvscope.profiler.timing import graph_ms

DEV = torch.device("cuda")
DT = torch.bfloat16
H, H_KV, D, DIM = 16, 2, 128, 2048
INNER = 36  # calls per graph replay


def graph_us(fn: Callable[[], object], reps: int = 30) -> float:
    """Median µs per call of `fn`, INNER calls captured in one CUDA graph."""
    return graph_ms(fn, calls=INNER, reps=reps) * 1e3


def kernels(fn: Callable[[], object]) -> int:
    fn()
    torch.cuda.synchronize()  # named sync: nothing else in the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()  # named sync: the profiled call is complete
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def show(label: str, fn: Callable[[], object]) -> None:
    try:
        print(f"{label:58s} {graph_us(fn):8.1f} µs  {kernels(fn):3d} kernels", flush=True)
    except RuntimeError as e:  # a backend that refuses these shapes: say so and go on
        print(f"{label:58s} failed: {str(e).splitlines()[0][:80]}", flush=True)


def attention(b: int, s: int) -> None:
    valid = s - 40
    k = torch.randn(b, s, H_KV, D, device=DEV, dtype=DT)  # (B, S, H_kv, D) token-major cache
    v = torch.randn_like(k)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, S, D)
    q = torch.randn(b, H, D, device=DEV, dtype=DT)  # (B, H, D)
    qg = q.view(b, H_KV, H // H_KV, D)  # (B, H_kv, n_rep, D)
    lengths = torch.full((b,), valid, device=DEV, dtype=torch.int32)
    keep = (torch.arange(s, device=DEV).view(1, s) < lengths.view(b, 1)).view(b, 1, 1, s)  # (B, 1, 1, S)
    additive = torch.zeros(b, 1, 1, s, device=DEV, dtype=DT).masked_fill(~keep, float("-inf"))
    cu_q = torch.arange(b + 1, device=DEV, dtype=torch.int32)
    cu_k = cu_q * s
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def sdpa_bool() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qg, kt, vt, attn_mask=keep)

    def sdpa_additive() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(qg, kt, vt, attn_mask=additive)

    def flash_varlen() -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(
            q, k.view(b * s, H_KV, D), v.view(b * s, H_KV, D), cu_q, cu_k, 1, s, 0.0, False, False,
            seqused_k=lengths)[0]

    def matmul_softmax() -> torch.Tensor:
        scores = torch.matmul(qg, kt.transpose(-1, -2)).mul_(D**-0.5).add_(additive)
        return torch.matmul(torch.softmax(scores, -1), vt)

    for label, fn in (("SDPA, grouped q, bool mask over the whole cache", sdpa_bool),
                      ("SDPA memory-efficient, additive mask", sdpa_additive),
                      ("flash varlen, seqused_k on the device (kvscope)", flash_varlen),
                      ("matmul, softmax, matmul, additive mask", matmul_softmax)):
        show(f"attention B={b} S={s}: {label}", fn)


def norm(b: int) -> None:
    x = torch.randn(b, DIM, device=DEV, dtype=DT)
    w = torch.randn(DIM, device=DEV, dtype=DT)

    def manual() -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DT)

    show(f"RMSNorm B={b}: F.rms_norm with weight (kvscope, --kernels off)", lambda: F.rms_norm(x, (DIM,), w, 1e-6))
    show(f"RMSNorm B={b}: float32 by hand", manual)


def residual(b: int, k_in: int, n_out: int) -> None:
    x = torch.randn(b, k_in, device=DEV, dtype=DT)
    wt = torch.randn(n_out, k_in, device=DEV, dtype=DT) * 0.01
    h = torch.randn(b, n_out, device=DEV, dtype=DT)
    show(f"residual B={b} {k_in}->{n_out}: h + linear(x)", lambda: h + F.linear(x, wt))
    show(f"residual B={b} {k_in}->{n_out}: h.addmm_(x, W^T) (kvscope)", lambda: h.addmm_(x, wt.t()))


def rope_and_write(b: int) -> None:
    qkv = torch.randn(b, 1, H + 2 * H_KV, D, device=DEV, dtype=DT)  # (B, 1, H+2H_kv, D)
    cos, sin = torch.randn_like(qkv), torch.randn_like(qkv)

    def rope_flip() -> torch.Tensor:
        swapped = qkv.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
        return torch.addcmul(qkv * cos, swapped, sin)

    def rope_cat() -> torch.Tensor:
        x1, x2 = qkv[..., :D // 2], qkv[..., D // 2:]
        return qkv * cos + torch.cat((-x2, x1), -1) * sin

    show(f"RoPE B={b}, 20 heads: flip + addcmul (kvscope, --kernels off)", rope_flip)
    show(f"RoPE B={b}, 20 heads: rotate-half with cat", rope_cat)
    cache = torch.zeros(2, b, 576, H_KV, D, device=DEV, dtype=DT)  # (2, B, S, H_kv, D)
    new = torch.randn(b, 1, 2, H_KV, D, device=DEV, dtype=DT).permute(2, 0, 1, 3, 4)  # (2, B, 1, H_kv, D)
    idx = torch.full((b,), 300, device=DEV).view(1, b, 1, 1, 1).expand(2, b, 1, H_KV, D)
    show(f"K/V write B={b}: one scatter (kvscope, --kernels off)", lambda: cache.scatter_(2, idx, new))


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call, {INNER} calls per graph")
    for b, s in ((1, 576), (1, 4160), (8, 576), (64, 576), (64, 4160)):
        attention(b, s)
    for b in (1, 64):
        norm(b)
        for k_in, n_out in ((2048, 2048), (11008, 2048)):
            residual(b, k_in, n_out)
        rope_and_write(b)


if __name__ == "__main__":
    main()
