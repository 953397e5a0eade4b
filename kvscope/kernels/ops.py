"""kvscope's hand-written CUDA kernels as checked Python calls, each next to its PyTorch reference.

Every call checks devices, dtypes, shapes and strides at the boundary and raises `ValueError` with the shapes; the
`*_ref` functions compute the same result with torch operations (rounding through the tensor dtype at the same
places), on any device. Kernel names in a trace: `kvscope_rms_norm_*`, `kvscope_silu_mul_*`, `kvscope_rope_kv_*`,
`kvscope_stamp` (`_vec` for 16-byte accesses, `_scalar` otherwise).
"""

from __future__ import annotations

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
