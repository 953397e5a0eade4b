"""Compile kvscope's CUDA sources with NVRTC (through torch) and launch them on torch's current stream.

Sources live next to this module (`cuda/*.cu`); each is compiled once per (kernel, dtype, device) on first use, with
`cuda/common.cuh` prepended and the element type chosen by a macro. Launches go through the driver API with every
argument typed explicitly (pointers as 64-bit, `int`, `long long`, `float`), so a launch inside a CUDA-graph capture
becomes a kernel node of the graph.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch

from kvscope.errors import KvscopeError

# the macro that picks elem_t, per dtype the kernels are built for (every dtype of kvscope.model.dtypes)
DTYPE_MACROS = {torch.float32: "KV_F32", torch.bfloat16: "KV_BF16", torch.float16: "KV_F16"}
KERNEL_FILES = {"kvscope_stamp": "stamp.cu", "kvscope_rms_norm": "rms_norm.cu", "kvscope_silu_mul": "silu_mul.cu",
                "kvscope_rope_kv": "rope_kv.cu"}


class Ptr(ctypes.c_void_p):
    """A device pointer argument (null for None)."""


def ptr(t: torch.Tensor | None) -> Ptr:
    return Ptr(None if t is None else t.data_ptr())


def i32(v: int) -> ctypes.c_int:
    return ctypes.c_int(v)


def i64(v: int) -> ctypes.c_longlong:
    return ctypes.c_longlong(v)


def f32(v: float) -> ctypes.c_float:
    return ctypes.c_float(v)


def _source(entry: str) -> str:
    base = resources.files("kvscope.kernels") / "cuda"
    return (base / "common.cuh").read_text() + "\n" + (base / KERNEL_FILES[entry]).read_text()


def kernel_name(entry: str, variant: str) -> str:
    """The symbol nsys shows: e.g. `kvscope_rms_norm_vec` (the dtype is picked at compile time, not named)."""
    return f"{entry}_{variant}" if variant else entry


@functools.cache
def _driver() -> Any:
    """Our own handle on the driver library (not ctypes' shared one), with the argument types of what we call."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise KvscopeError(f"hand-written kernels need the CUDA driver library (libcuda.so.1): {e}") from None
    c_uint, c_void_p = ctypes.c_uint, ctypes.c_void_p
    lib.cuLaunchKernel.argtypes = [c_void_p, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_void_p,
                                   c_void_p, c_void_p]
    lib.cuMemcpyDtoHAsync_v2.argtypes = [c_void_p, ctypes.c_uint64, ctypes.c_size_t, c_void_p]
    return lib


def nvrtc_compiler() -> Callable[..., Any]:
    """torch's NVRTC kernel compiler (`torch.cuda._compile_kernel`, a private torch API), or a one-line
    KvscopeError where this torch lacks it."""
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is None:
        raise KvscopeError(f"kvscope's CUDA kernels need torch's NVRTC compiler (torch.cuda._compile_kernel), which "
                           f"torch {torch.__version__} lacks; run with --kernels off")
    return compile_kernel


@functools.cache
def _compiled(entry: str, variant: str, dtype: torch.dtype, device_index: int) -> Any:
    compile_kernel = nvrtc_compiler()
    src = f"#define {DTYPE_MACROS[dtype]}\n" + _source(entry)
    with torch.cuda.device(device_index):
        try:
            return compile_kernel(src, kernel_name(entry, variant))
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KvscopeError(f"compiling {kernel_name(entry, variant)} for {dtype} failed: {first}") from None


@functools.cache
def _function(entry: str, variant: str, dtype: torch.dtype, device_index: int) -> int:
    """The CUfunction handle of a compiled kernel, as an int."""
    func = _compiled(entry, variant, dtype, device_index).func
    return int(func.value if isinstance(func, ctypes.c_void_p) else func)


def launch(entry: str, variant: str, dtype: torch.dtype, device: torch.device, grid: tuple[int, int, int],
           block: tuple[int, int, int], args: list[Any]) -> None:
    """Launch one kernel on the current stream of `device`; `args` are ctypes values in the kernel's order."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    func = _function(entry, variant, dtype, index)
    stream = torch.cuda.current_stream(device).cuda_stream
    holders = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))  # `args` keeps the values alive
    rc = _driver().cuLaunchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, stream, holders,
                                  None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernel({kernel_name(entry, variant)}, grid={grid}, block={block}) failed with "
                           f"CUDA error {rc}")


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
