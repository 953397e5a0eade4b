"""Where kvscope's CUDA kernels come from at run time, through CuPy (an optional dependency: the `cuda12` / `cuda13`
extras).

For a kernel source `cuda/<stem>.cu`, an element-type macro (`KV_F32` / `KV_BF16` / `KV_F16`) and a device, the
loader takes, in this order:

1. the fatbin of the CMake build (`<stem>.<f32|bf16|f16>.fatbin` in `$KVSCOPE_KERNELS_DIR`, else in the checkout's
   `build/kernels/`), loaded with `cupy.RawModule(path=...)`, when it matches: its `<stem>.sha256` holds the digests
   of today's headers and source, and `kernels.json` lists the device's architecture (or an older one of the same
   major, or the device is newer than the PTX it carries, which the driver compiles);
2. otherwise (or when the driver refuses the fatbin), the same source compiled by NVRTC through CuPy
   (`cupy.RawModule(code=..., options=...)`) for the device's architecture. CuPy caches the binary on disk, keyed by
   source, options, architecture and NVRTC version: `$CUPY_CACHE_DIR`, by default `~/.cupy/kernel_cache`.

Modules are kept per (source, macro, architecture) and kernels per (source, symbol, macro, device). Launches go
through CuPy's `Function`, which calls the driver's `cuLaunchKernel` on the stream it is given: kvscope passes
torch's current stream (`ExternalStream`), so a launch inside a CUDA-graph capture becomes a kernel node.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from kvscope.errors import KvscopeError

KERNELS_DIR_ENV = "KVSCOPE_KERNELS_DIR"
CUDA_DIR = Path(__file__).resolve().with_name("cuda")
DEFAULT_BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "kernels"  # the checkout's CMake build
MANIFEST_NAME = "kernels.json"
DTYPE_TAGS = {"KV_F32": "f32", "KV_BF16": "bf16", "KV_F16": "f16"}  # macro -> fatbin suffix (as CMakeLists.txt)
NVRTC_OPTIONS = ("-std=c++17",)  # nvcc 12/13's default dialect, so both paths compile the same language
CUPY_INSTALL = "pip install -e '.[cuda13]' for CUDA 13, '.[cuda12]' for CUDA 12"  # the extras of pyproject.toml
CUPY_HINT = f"{CUPY_INSTALL}, or run with --kernels off"
_STATIC_SHARED_LIMIT_BYTES = 48 * 1024  # dynamic shared memory above this needs the kernel's attribute raised


def cupy_missing() -> str | None:
    """None when CuPy imports; else why it does not (one line)."""
    try:
        importlib.import_module("cupy")
    except Exception as e:  # ImportError, or a CuPy wheel for another CUDA failing while it loads its libraries
        return _first_line(e)
    return None


def import_cupy() -> ModuleType:
    """The `cupy` module, or a one-line KvscopeError naming the extra to install."""
    try:
        return importlib.import_module("cupy")
    except Exception as e:
        raise KvscopeError(f"kvscope's CUDA kernels need CuPy ({_first_line(e)}); {CUPY_HINT}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def kernels_dir() -> Path | None:
    """The folder of built fatbins: `$KVSCOPE_KERNELS_DIR` (must be a folder), else the checkout's `build/kernels`
    when it exists, else None."""
    env = os.environ.get(KERNELS_DIR_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise KvscopeError(f"{KERNELS_DIR_ENV}={env} is not a folder (unset it to compile the kernels with NVRTC)")
        return path
    return DEFAULT_BUILD_DIR if DEFAULT_BUILD_DIR.is_dir() else None


def source_digest(file: str) -> str:
    """What CMake writes into `<stem>.sha256`: a line `<sha256>  <name>` for each `cuda/*.cuh` (by name), then one for
    the source."""
    paths = [*sorted(CUDA_DIR.glob("*.cuh"), key=lambda p: p.name), CUDA_DIR / file]
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in paths)


def nvrtc_code(file: str) -> str:
    """The text NVRTC compiles: the headers' digest (so CuPy's on-disk cache, keyed by the text, misses when any
    header changes), `common.cuh` (nvcc's `-include` in the CMake build), then the source."""
    digest = hashlib.sha256(source_digest(file).encode()).hexdigest()
    return (f"// kvscope sources {digest}\n" + (CUDA_DIR / "common.cuh").read_text() + "\n"
            + (CUDA_DIR / file).read_text())


@dataclass(frozen=True)
class Choice:
    """Where a module comes from: `path` (a built fatbin) or None (NVRTC), and why."""

    path: Path | None
    reason: str


def choose(file: str, macro: str, arch: int, folder: Path | None) -> Choice:
    """The built fatbin of (`file`, `macro`) for compute capability `arch` (e.g. 90) in `folder`, when present and
    matching; else `Choice(None, why)`."""
    if folder is None:
        return Choice(None, f"no build folder (set {KERNELS_DIR_ENV} or run cmake -S . -B build)")
    stem = Path(file).stem
    fatbin = folder / f"{stem}.{DTYPE_TAGS[macro]}.fatbin"
    if not fatbin.is_file():
        return Choice(None, f"{fatbin} is missing")
    digest = folder / f"{stem}.sha256"
    try:
        built_from = digest.read_text()
    except OSError:
        return Choice(None, f"{digest} is missing")
    if built_from != source_digest(file):
        return Choice(None, f"{fatbin.name} was built from other sources than today's (rebuild: cmake --build)")
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        archs = [int(a) for a in manifest["archs"]]
        ptx_arch = int(manifest["ptx_arch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Choice(None, f"{folder / MANIFEST_NAME} is unreadable ({_first_line(e)})")
    if arch in archs:
        return Choice(fatbin, f"built for sm_{arch}")
    same_major = [a for a in archs if a // 10 == arch // 10 and a < arch]
    if same_major:
        return Choice(fatbin, f"built for sm_{max(same_major)}, which runs on sm_{arch}")
    if arch > ptx_arch:
        return Choice(fatbin, f"PTX of compute_{ptx_arch}, compiled by the driver for sm_{arch}")
    return Choice(None, f"{fatbin.name} holds sm_{', sm_'.join(map(str, archs))}, not sm_{arch}")


@dataclass
class Kernel:
    """A loaded kernel: CuPy's RawKernel (attributes), its Function on the device (the launch), and its origin."""

    raw: Any
    func: Any
    origin: str  # "fatbin <path>" or "nvrtc (<why no fatbin>)"
    shared_limit_bytes: int = _STATIC_SHARED_LIMIT_BYTES


@functools.cache
def _built_module(path: str) -> Any:
    return import_cupy().RawModule(path=path)


@functools.cache
def nvrtc_module(file: str, macro: str, arch: int) -> Any:
    """The NVRTC module of (`file`, `macro`) for compute capability `arch`: one per key in this process (CuPy also
    keeps the binary on disk)."""
    return import_cupy().RawModule(code=nvrtc_code(file), options=(f"-D{macro}", *NVRTC_OPTIONS))


@functools.cache
def device_arch(index: int) -> int:
    """The compute capability of CUDA device `index` as 10 * major + minor (90 for an H100/H200)."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.cache
def kernel(file: str, symbol: str, macro: str, device_index: int) -> Kernel:
    """Kernel `symbol` of source `file` compiled with `macro`, loaded on CUDA device `device_index` (see the module
    docstring for the order); KvscopeError (one line) when it cannot be compiled or is not in the module."""
    cupy = import_cupy()
    arch = device_arch(device_index)
    with cupy.cuda.Device(device_index):
        choice = choose(file, macro, arch, kernels_dir())
        why = choice.reason
        if choice.path is not None:
            try:
                raw = _built_module(str(choice.path)).get_function(symbol)
                return Kernel(raw, raw.kernel, f"fatbin {choice.path} ({choice.reason})")
            except Exception as e:  # e.g. a driver older than the nvcc that built it; NVRTC below
                why = f"{choice.path} did not load: {_first_line(e)}"
        try:
            raw = nvrtc_module(file, macro, arch).get_function(symbol)
            return Kernel(raw, raw.kernel, f"nvrtc ({why})")
        except Exception as e:
            raise KvscopeError(f"compiling {symbol} ({file}, {macro}) for sm_{arch} with NVRTC failed: "
                               f"{_first_line(e)}") from None


def raise_shared_limit(k: Kernel, shared_bytes: int, device_index: int) -> None:
    """Let `k` take `shared_bytes` of dynamic shared memory (above 48 KiB the kernel's attribute must say so)."""
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        k.raw.max_dynamic_shared_size_bytes = shared_bytes
    k.shared_limit_bytes = shared_bytes


@functools.cache
def external_stream(ptr: int) -> Any:
    """CuPy's view of a stream created elsewhere (torch's), by its handle (0: the legacy default stream). CuPy 14
    deprecates `ExternalStream` (kept: it is what the GPU tests ran on); its warning is silenced, once per stream."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return import_cupy().cuda.ExternalStream(ptr)


def clear_caches() -> None:
    """Forget every loaded module, kernel and stream (tests; a rebuilt fatbin in a long-lived process)."""
    for cached in (_built_module, nvrtc_module, device_arch, kernel, external_stream):
        clear = getattr(cached, "cache_clear", None)  # a test may have put a plain function in its place
        if clear is not None:
            clear()
