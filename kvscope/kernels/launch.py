"""Launch kvscope's CUDA kernels on torch's current stream, over torch tensors' memory, through CuPy.

Sources live next to this module (`cuda/*.cu`, with `cuda/common.cuh` included first); the element type is chosen by
a macro per dtype (`DTYPE_MACROS`). `kvscope.kernels.loader` finds each kernel: the fatbin of the CMake build when it
matches, else NVRTC through CuPy (cached per architecture). A launch passes the tensors' device pointers (no copies)
with every argument typed explicitly (`ptr`, `i32`, `i64`, `f32`), and CuPy calls `cuLaunchKernel` on torch's
current stream, so a launch inside a CUDA-graph capture becomes a kernel node of the graph.

A new kernel: put `extern "C" __global__ void kvscope_<name>[_<variant>](...)` in `cuda/<name>.cu` (found by name;
`KERNEL_FILES` maps an entry whose file is named otherwise) and call `launch("kvscope_<name>", "<variant>", ...)`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
import torch

from kvscope.errors import KvscopeError
from kvscope.kernels import loader

# the macro that picks elem_t, per dtype the kernels are built for (every dtype of kvscope.model.dtypes)
DTYPE_MACROS = {torch.float32: "KV_F32", torch.bfloat16: "KV_BF16", torch.float16: "KV_F16"}
KERNEL_FILES = {"kvscope_stamp": "stamp.cu", "kvscope_rms_norm": "rms_norm.cu", "kvscope_silu_mul": "silu_mul.cu",
                "kvscope_rope_kv": "rope_kv.cu"}
_ENTRY_PREFIX = "kvscope_"
# ctypes values (the launcher's former argument types) as the numpy scalars CuPy passes by value
_CTYPES_TO_NUMPY: dict[type, Any] = {ctypes.c_int: np.int32, ctypes.c_uint: np.uint32, ctypes.c_longlong: np.int64,
                                     ctypes.c_ulonglong: np.uint64, ctypes.c_float: np.float32}


def ptr(t: torch.Tensor | None) -> int:
    """A device pointer argument: the tensor's address (no copy), or 0 (nullptr) for None."""
    return 0 if t is None else t.data_ptr()


def i32(v: int) -> np.int32:
    return np.int32(v)


def i64(v: int) -> np.int64:
    return np.int64(v)


def f32(v: float) -> np.float32:
    return np.float32(v)


def kernel_name(entry: str, variant: str) -> str:
    """The symbol nsys shows: e.g. `kvscope_rms_norm_vec` (the dtype is picked at compile time, not named)."""
    return f"{entry}_{variant}" if variant else entry


@functools.cache
def kernel_file(entry: str) -> str:
    """The source of kernel `entry`: `KERNEL_FILES[entry]`, else `cuda/<entry without kvscope_>.cu`."""
    name = KERNEL_FILES.get(entry) or f"{entry.removeprefix(_ENTRY_PREFIX)}.cu"
    if not (loader.CUDA_DIR / name).is_file():
        raise KvscopeError(f"no source for kernel {entry}: {loader.CUDA_DIR / name} is missing")
    return name


def kernels_unavailable() -> str | None:
    """Why kvscope's kernels cannot run in this Python (CuPy missing or broken: one line), or None."""
    return loader.cupy_missing()


def _arg(a: Any) -> Any:
    """One kernel argument as CuPy takes it: numpy scalars and ints (64-bit: pointers) as they are, ctypes values
    converted; a bare float or bool is refused (its width would be a guess)."""
    if isinstance(a, np.generic) or (isinstance(a, int) and not isinstance(a, bool)):
        return a
    if isinstance(a, ctypes.c_void_p):
        return a.value or 0
    to_numpy = _CTYPES_TO_NUMPY.get(type(a))
    if to_numpy is not None:
        return to_numpy(a.value)
    raise TypeError(f"kernel argument {a!r} of type {type(a).__name__}: pass ptr(), i32(), i64() or f32() values")


def launch(entry: str, variant: str, dtype: torch.dtype, device: torch.device, grid: tuple[int, int, int],
           block: tuple[int, int, int], args: list[Any], shared_bytes: int = 0) -> None:
    """Launch kernel `kernel_name(entry, variant)` built for `dtype` on the current stream of `device`, with `args`
    in the kernel's order (`ptr`, `i32`, `i64`, `f32` values) and `shared_bytes` of dynamic shared memory."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    k = loader.kernel(kernel_file(entry), kernel_name(entry, variant), DTYPE_MACROS[dtype], index)
    if shared_bytes > k.shared_limit_bytes:
        loader.raise_shared_limit(k, shared_bytes, index)
    stream = loader.external_stream(torch.cuda.current_stream(device).cuda_stream)
    k.func(tuple(grid), tuple(block), tuple(_arg(a) for a in args), shared_mem=shared_bytes, stream=stream)


@functools.cache
def _driver() -> Any:
    """Our own handle on the driver library (not ctypes' shared one), with the argument types of what we call."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise KvscopeError(f"copies through the CUDA driver need its library (libcuda.so.1): {e}") from None
    lib.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def memcpy_d2h_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` (contiguous, on a CUDA device) into `dst` (contiguous, page-locked host memory, same byte count)
    on the current stream, through the driver: inside a CUDA-graph capture it becomes a memcpy node of the graph."""
    nbytes = src.numel() * src.element_size()
    if not (src.is_cuda and src.is_contiguous() and not dst.is_cuda and dst.is_pinned() and dst.is_contiguous()
            and dst.numel() * dst.element_size() == nbytes):
        raise ValueError(f"memcpy_d2h_async: src {tuple(src.shape)} on {src.device} -> dst {tuple(dst.shape)} "
                         f"(pinned: {dst.is_pinned() if not dst.is_cuda else False}) must be contiguous, CUDA to "
                         "pinned host, same size")
    stream = torch.cuda.current_stream(src.device).cuda_stream
    rc = _driver().cuMemcpyDtoHAsync_v2(dst.data_ptr(), src.data_ptr(), nbytes, stream)
    if rc != 0:
        raise RuntimeError(f"cuMemcpyDtoHAsync of {nbytes} bytes failed with CUDA error {rc}")
