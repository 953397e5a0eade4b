"""kvscope's CUDA kernels against their torch references (marked `gpu`, skipped without CUDA): shapes that take
the 16-byte and the scalar paths, three dtypes with per-dtype tolerances (the engine with kernels on and off:
tests/engine/test_engine.py)."""

from __future__ import annotations

import pytest
import torch

from kvscope.kernels import common as k_common
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.kernels import stamp as k_stamp
from kvscope.model.config import PRESETS
from kvscope.model.dtypes import DTYPES as SUPPORTED_DTYPES
from kvscope.model.layers import rope_tables

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [d.torch_dtype for d in SUPPORTED_DTYPES]


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, **k_common.REF_TOLERANCE[got.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim", "strided"), [(1, 2048, False), (7, 896, False), (4096, 2048, False),
                                                      (5, 2050, False), (3, 64, True), (2, 4096, True)])
def test_rms_norm_matches_reference(dtype: torch.dtype, rows: int, dim: int, strided: bool) -> None:
    g = torch.Generator(device=CUDA).manual_seed(rows * dim)
    base = torch.randn(rows, dim + (8 if strided else 0), device=CUDA, generator=g).to(dtype)
    x = base[:, :dim]  # (rows, dim), row stride dim + 8 when strided
    w = (torch.rand(dim, device=CUDA, generator=g) + 0.5).to(dtype)
    _close(k_rms_norm.rms_norm(x, w, 1e-6), k_rms_norm.rms_norm_ref(x, w, 1e-6))


def test_rms_norm_three_dims_and_stamp() -> None:
    x = torch.randn(2, 3, 256, device=CUDA, dtype=torch.bfloat16)
    w = torch.ones(256, device=CUDA, dtype=torch.bfloat16)
    slot = torch.zeros(1, dtype=torch.int64, device=CUDA)
    before = torch.zeros(1, dtype=torch.int64, device=CUDA)
    k_stamp.stamp(before)
    out = k_rms_norm.rms_norm(x, w, 1e-5, stamp=slot)
    after = torch.zeros(1, dtype=torch.int64, device=CUDA)
    k_stamp.stamp(after)
    _close(out, k_rms_norm.rms_norm_ref(x, w, 1e-5))
    t0, t1, t2 = int(before), int(slot), int(after)
    assert 0 < t0 <= t1 <= t2 and t2 - t0 < 10_000_000  # global timer in ns, in launch order, within 10 ms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "f", "fused"), [(1, 11008, True), (64, 11008, True), (4096, 11008, False),
                                                  (3, 37, True), (5, 40, False), (70001, 16, True)])
def test_silu_mul_matches_reference(dtype: torch.dtype, rows: int, f: int, fused: bool) -> None:
    g = torch.Generator(device=CUDA).manual_seed(rows + f)
    if fused:  # the two halves of one (rows, 2F) product: strided rows
        gate, up = (torch.randn(rows, 2 * f, device=CUDA, generator=g) * 3).to(dtype).split(f, dim=-1)
    else:
        gate = (torch.randn(rows, f, device=CUDA, generator=g) * 3).to(dtype)
        up = torch.randn(rows, f, device=CUDA, generator=g).to(dtype)
    _close(k_silu_mul.silu_mul(gate, up), k_silu_mul.silu_mul_ref(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "s", "heads", "kv_heads", "d", "decode"),
                         [(1, 4096, 16, 2, 128, False), (3, 17, 14, 2, 64, False), (2, 5, 4, 2, 6, False),
                          (1, 1, 16, 2, 128, True), (8, 1, 32, 8, 128, True), (3, 1, 4, 2, 6, True)])
def test_rope_kv_matches_reference(dtype: torch.dtype, b: int, s: int, heads: int, kv_heads: int, d: int,
                                   decode: bool) -> None:
    args = PRESETS["qwen2.5-3b"]
    s_max = max(64, s + 8)
    cos, sin_rot = rope_tables(args, s_max, CUDA, torch.float32)  # (S_max, 128)
    cos, sin_rot = cos[:, :d].contiguous().to(dtype), sin_rot[:, :d].contiguous().to(dtype)
    if d != args.head_dim:  # a head size of its own: tables of the right width with the rotate-half sign pattern
        half = torch.linspace(0.1, 1.0, d // 2, device=CUDA)
        ang = torch.arange(s_max, device=CUDA).view(-1, 1).float() * half
        cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
        sin_rot = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    g = torch.Generator(device=CUDA).manual_seed(b * s * d)
    qkv = torch.randn(b, s, heads + 2 * kv_heads, d, device=CUDA, generator=g).to(dtype)
    lengths = torch.randint(0, s_max - s, (b,), device=CUDA, generator=g) if decode else None
    caches = [torch.zeros(b, s_max, kv_heads, d, device=CUDA, dtype=dtype) for _ in range(4)]
    ref_qkv = qkv.clone()
    k_rope_kv.rope_kv_(qkv, cos, sin_rot, caches[0], caches[1], heads, lengths)
    k_rope_kv.rope_kv_ref_(ref_qkv, cos, sin_rot, caches[2], caches[3], heads, lengths)
    _close(qkv, ref_qkv)
    _close(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])  # values are copied, not computed
    assert torch.equal(qkv[:, :, heads + kv_heads:], ref_qkv[:, :, heads + kv_heads:])
