"""What kvscope's kernel modules share (one module per CUDA source: `cuda/<stem>.cu` is called through
`<stem>.py`): the dtypes the kernels run in, the tolerance of the elementwise kernels against their references, the
launch constants, and the checks at every kernel's boundary (`need_cuda`: devices and dtypes; `row_layout`: the rows
of a tensor; `vec_ok`: whether 16-byte accesses are safe), each raising `ValueError` with the shapes."""

from __future__ import annotations

import functools

import torch

from kvscope.kernels.launch import DTYPE_MACROS
from kvscope.model.dtypes import dtype_name

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
BLOCK_THREADS = 256  # threads per block of the one-dimensional launches (elementwise kernels, split-K reduction)
GRID_Y_MAX = 65535  # CUDA's limit on gridDim.y


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run here: a CUDA device and one of float32 / bfloat16 / float16."""
    return device.type == "cuda" and dtype in DTYPE_MACROS


def vec_ok(*tensors: torch.Tensor, elems: int = 0) -> bool:
    """16-byte accesses are safe: aligned base pointers, and `elems` (a row length or stride) a whole vector."""
    t0 = tensors[0]
    per_vec = VEC_BYTES // t0.element_size()
    return elems % per_vec == 0 and all(t.data_ptr() % VEC_BYTES == 0 for t in tensors)


def need_cuda(name: str, dtype: torch.dtype, *tensors: torch.Tensor) -> None:
    """Every tensor on one CUDA device and in `dtype`, a dtype the kernels are built for; else ValueError."""
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


def row_layout(name: str, x: torch.Tensor) -> tuple[int, int, int]:
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


@functools.cache
def sm_count_of(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device `device_index` (the launch choices' input), asked once."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
