"""RMSNorm (`cuda/rms_norm.cu`; `kvscope_rms_norm_vec` for 16-byte accesses, `kvscope_rms_norm_scalar` otherwise):
the checked call, whose first block can also write the GPU's timer into an in-graph timestamp, and its torch
reference (`rms_norm_ref`, within `common.REF_TOLERANCE`)."""

from __future__ import annotations

import torch

from kvscope.kernels.common import VEC_BYTES, need_cuda, row_layout, vec_ok
from kvscope.kernels.launch import f32, i32, i64, launch, ptr


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, stamp: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., dim), rows evenly spaced; weight (dim,). Returns a new contiguous (..., dim) tensor.

    `stamp`: an int64 CUDA tensor of one element; block 0 writes the global timer (ns) into it as the kernel starts.
    """
    need_cuda("rms_norm", x.dtype, x, weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be contiguous ({x.shape[-1]},) "
                         f"for x {tuple(x.shape)}")
    if stamp is not None and (stamp.dtype != torch.int64 or stamp.numel() != 1 or stamp.device != x.device):
        raise ValueError(f"rms_norm: stamp must be one int64 on {x.device}, got {stamp.dtype} {tuple(stamp.shape)}")
    rows, dim, stride = row_layout("rms_norm", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    vec = vec_ok(x, weight, out, elems=dim) and vec_ok(x, elems=stride)
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
