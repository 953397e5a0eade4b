"""SiLU(gate) * up (`cuda/silu_mul.cu`; `kvscope_silu_mul_vec` for 16-byte accesses, `kvscope_silu_mul_scalar`
otherwise): the checked call over the two halves of the fused gate/up product, and its torch reference
(`silu_mul_ref`, within `common.REF_TOLERANCE`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.kernels.common import BLOCK_THREADS, GRID_Y_MAX, VEC_BYTES, need_cuda, vec_ok
from kvscope.kernels.launch import i32, i64, launch, ptr


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (N, F) with unit column stride and one shared row stride (e.g. the halves of a fused (N, 2F)
    product). Returns silu(gate) * up as a new contiguous (N, F) tensor."""
    need_cuda("silu_mul", gate.dtype, gate, up)
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride() != up.stride() or gate.stride(1) != 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} strides {gate.stride()} and up {tuple(up.shape)} "
                         f"strides {up.stride()} must be 2-D with equal shapes and strides, unit column stride")
    n, f = gate.shape
    out = torch.empty(n, f, dtype=gate.dtype, device=gate.device)
    if n == 0 or f == 0:
        return out
    stride = gate.stride(0)
    vec = vec_ok(gate, up, out, elems=f) and vec_ok(gate, elems=stride)
    per_thread = VEC_BYTES // gate.element_size() if vec else 1
    cols = -(-f // per_thread)
    launch("kvscope_silu_mul", "vec" if vec else "scalar", gate.dtype, gate.device,
           (-(-cols // BLOCK_THREADS), min(n, GRID_Y_MAX), 1), (BLOCK_THREADS, 1, 1),
           [ptr(out), ptr(gate), ptr(up), i32(f), i64(stride), i64(n)])
    return out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
