"""The kernel loader on the CPU, with a stand-in `cupy` module in sys.modules: the built fatbin vs NVRTC, the cache
keys (per source, dtype macro and architecture), the stream and arguments a launch passes, and the one-line errors."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from paths import ROOT

from kvscope.engine import plan
from kvscope.errors import KvscopeError
from kvscope.kernels import launch as kl
from kvscope.kernels import loader

CUDA0 = torch.device("cuda", 0)
TORCH_STREAM_HANDLE = 0x5EED  # what the stand-in torch.cuda.current_stream reports


class FakeCupy:
    """Records what kvscope asks of CuPy: modules made (from a path or from code), devices entered, launches."""

    def __init__(self, symbols: set[str] | None = None, path_load_error: str | None = None,
                 compile_error: str | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.symbols = symbols
        self.path_load_error, self.compile_error = path_load_error, compile_error
        fake = self

        class Function:
            def __init__(self, symbol: str, module: Any) -> None:
                self.symbol, self.module = symbol, module

            def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0,
                         stream: Any = None) -> None:
                fake.log.append(("launch", self.symbol, grid, block, args, shared_mem, stream.ptr))

        class RawKernel:
            def __init__(self, symbol: str, module: Any) -> None:
                self.kernel = Function(symbol, module)
                self._shared = 0

            @property
            def max_dynamic_shared_size_bytes(self) -> int:
                return self._shared

            @max_dynamic_shared_size_bytes.setter
            def max_dynamic_shared_size_bytes(self, value: int) -> None:
                fake.log.append(("shared", self.kernel.symbol, value))
                self._shared = value

        class RawModule:
            def __init__(self, *, code: str | None = None, path: str | None = None, options: tuple = ()) -> None:
                self.code, self.path, self.options = code, path, options
                fake.log.append(("module", "path" if path else "code", path, options))

            def get_function(self, name: str) -> RawKernel:
                if self.path and fake.path_load_error:
                    raise RuntimeError(fake.path_load_error)
                if self.code and fake.compile_error:
                    raise RuntimeError(fake.compile_error)
                if fake.symbols is not None and name not in fake.symbols:
                    raise RuntimeError("CUDA_ERROR_NOT_FOUND: named symbol not found")
                return RawKernel(name, self)

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> Device:
                fake.log.append(("device", self.index))
                return self

            def __exit__(self, *exc: object) -> None:
                return None

        class ExternalStream:
            def __init__(self, ptr: int) -> None:
                self.ptr = ptr

        self.module = SimpleNamespace(RawModule=RawModule, cuda=SimpleNamespace(Device=Device,
                                                                                ExternalStream=ExternalStream))

    def modules(self) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == "module"]

    def launches(self) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == "launch"]


@pytest.fixture
def cupy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeCupy:
    """A stand-in cupy, device 0 of compute capability 9.0 (device 1: 8.0), torch's stream a fixed handle, and an
    empty build folder in KVSCOPE_KERNELS_DIR."""
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(loader, "device_arch", lambda index: {0: 90, 1: 80}[index])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(
        cuda_stream=TORCH_STREAM_HANDLE))
    monkeypatch.setenv(loader.KERNELS_DIR_ENV, str(tmp_path))
    loader.clear_caches()
    kl.kernel_file.cache_clear()
    yield fake
    loader.clear_caches()


def _build(folder: Path, stem: str, tags: tuple[str, ...], archs: list[int], ptx_arch: int,
           digest: str | None = None) -> None:
    """What the CMake build leaves for one source (the fatbin's bytes do not matter to the stand-in)."""
    for tag in tags:
        (folder / f"{stem}.{tag}.fatbin").write_bytes(b"fatbin")
    (folder / f"{stem}.sha256").write_text(loader.source_digest(f"{stem}.cu") if digest is None else digest)
    (folder / loader.MANIFEST_NAME).write_text(json.dumps({"archs": archs, "ptx_arch": ptx_arch}))


def _stamp(device: torch.device = CUDA0, dtype: torch.dtype = torch.bfloat16) -> None:
    kl.launch("kvscope_stamp", "", dtype, device, (1, 1, 1), (1, 1, 1), [kl.ptr(None)])


def test_a_matching_fatbin_is_loaded_and_launched_on_torchs_stream(cupy: FakeCupy, tmp_path: Path) -> None:
    _build(tmp_path, "stamp", ("bf16",), [80, 90], 90)
    x = torch.zeros(3)
    kl.launch("kvscope_stamp", "", torch.bfloat16, CUDA0, (2, 1, 1), (32, 1, 1),
              [kl.ptr(x), kl.i32(7), kl.i64(-1), kl.f32(0.5), kl.ptr(None)], shared_bytes=128)
    assert cupy.modules() == [("module", "path", str(tmp_path / "stamp.bf16.fatbin"), ())]
    [(_, symbol, grid, block, args, shared, stream)] = cupy.launches()
    assert (symbol, grid, block, shared, stream) == ("kvscope_stamp", (2, 1, 1), (32, 1, 1), 128,
                                                     TORCH_STREAM_HANDLE)
    assert args == (x.data_ptr(), 7, -1, 0.5, 0)  # the tensor's own address: no copy
    assert [type(a) for a in args] == [int, np.int32, np.int64, np.float32, int]
    assert ("device", 0) in cupy.log
    assert loader.kernel("stamp.cu", "kvscope_stamp", "KV_BF16", 0).origin == (
        f"fatbin {tmp_path / 'stamp.bf16.fatbin'} (built for sm_90)")


def test_without_a_build_nvrtc_compiles_once_per_source_dtype_and_architecture(cupy: FakeCupy) -> None:
    for _ in range(3):
        _stamp()
    assert cupy.modules() == [("module", "code", None, ("-DKV_BF16", "-std=c++17"))]
    _stamp(dtype=torch.float16)  # another macro: another module
    _stamp(device=torch.device("cuda", 1))  # another architecture (sm_80): another module
    kl.launch("kvscope_rms_norm", "vec", torch.bfloat16, CUDA0, (1, 1, 1), (32, 1, 1), [])  # another source
    assert [m[3][0] for m in cupy.modules()] == ["-DKV_BF16", "-DKV_F16", "-DKV_BF16", "-DKV_BF16"]
    assert loader.nvrtc_module.cache_info().currsize == 4  # keys (source, macro, architecture)
    assert [m[3] for m in cupy.modules()].count(("-DKV_BF16", "-std=c++17")) == 3
    code = loader.nvrtc_code("stamp.cu")
    common = (loader.CUDA_DIR / "common.cuh").read_text()
    assert code.index(common) < code.index((loader.CUDA_DIR / "stamp.cu").read_text())
    assert len(cupy.launches()) == 6 and {e[6] for e in cupy.launches()} == {TORCH_STREAM_HANDLE}
    assert loader.kernel("stamp.cu", "kvscope_stamp", "KV_BF16", 0).origin.startswith("nvrtc (")


@pytest.mark.parametrize(("archs", "ptx_arch", "device", "loads_fatbin", "reason"), [
    ([90], 90, 0, True, "built for sm_90"),
    ([80, 86, 89, 90, 100], 100, 1, True, "built for sm_80"),
    ([90], 90, 1, False, "stamp.bf16.fatbin holds sm_90, not sm_80"),
])
def test_the_fatbin_must_hold_the_devices_architecture(cupy: FakeCupy, tmp_path: Path, archs: list[int],
                                                       ptx_arch: int, device: int, loads_fatbin: bool,
                                                       reason: str) -> None:
    _build(tmp_path, "stamp", ("bf16",), archs, ptx_arch)
    _stamp(device=torch.device("cuda", device))
    assert [m[1] for m in cupy.modules()] == (["path"] if loads_fatbin else ["code"])
    assert reason in loader.kernel("stamp.cu", "kvscope_stamp", "KV_BF16", device).origin


def test_choose_by_architecture(tmp_path: Path) -> None:
    _build(tmp_path, "stamp", ("f32",), [80, 90], 100)
    fatbin = tmp_path / "stamp.f32.fatbin"
    assert loader.choose("stamp.cu", "KV_F32", 86, tmp_path) == loader.Choice(
        fatbin, "built for sm_80, which runs on sm_86")
    assert loader.choose("stamp.cu", "KV_F32", 120, tmp_path) == loader.Choice(
        fatbin, "PTX of compute_100, compiled by the driver for sm_120")
    assert loader.choose("stamp.cu", "KV_F32", 75, tmp_path).path is None
    assert loader.choose("stamp.cu", "KV_BF16", 90, tmp_path) == loader.Choice(
        None, f"{tmp_path / 'stamp.bf16.fatbin'} is missing")
    assert loader.choose("stamp.cu", "KV_F32", 90, None).path is None
    (tmp_path / loader.MANIFEST_NAME).write_text("{not json")
    assert "is unreadable" in loader.choose("stamp.cu", "KV_F32", 90, tmp_path).reason


def test_a_fatbin_built_from_other_sources_is_not_used(cupy: FakeCupy, tmp_path: Path) -> None:
    stale = loader.source_digest("stamp.cu").replace("  stamp.cu", "  stamp.cu ")
    _build(tmp_path, "stamp", ("bf16",), [90], 90, digest=stale)
    _stamp()
    assert [m[1] for m in cupy.modules()] == ["code"]
    origin = loader.kernel("stamp.cu", "kvscope_stamp", "KV_BF16", 0).origin
    assert origin == "nvrtc (stamp.bf16.fatbin was built from other sources than today's (rebuild: cmake --build))"


def test_the_source_digest_covers_every_header(tmp_path: Path) -> None:
    lines = loader.source_digest("stamp.cu").splitlines()
    headers = sorted(p.name for p in loader.CUDA_DIR.glob("*.cuh"))
    assert [line.split("  ")[1] for line in lines] == [*headers, "stamp.cu"]
    assert all(len(line.split("  ")[0]) == 64 for line in lines)


def test_a_fatbin_the_driver_refuses_falls_back_to_nvrtc(cupy: FakeCupy, tmp_path: Path) -> None:
    _build(tmp_path, "stamp", ("bf16",), [90], 90)
    cupy.path_load_error = "CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an unsupported"
    _stamp()
    assert [m[1] for m in cupy.modules()] == ["path", "code"]
    assert len(cupy.launches()) == 1
    assert "did not load: RuntimeError: CUDA_ERROR_UNSUPPORTED_PTX_VERSION" in loader.kernel(
        "stamp.cu", "kvscope_stamp", "KV_BF16", 0).origin


def test_compile_errors_and_missing_symbols_are_one_line(cupy: FakeCupy) -> None:
    cupy.compile_error = "nvrtc: error: identifier \"x\" is undefined\n\n1 error detected"
    with pytest.raises(KvscopeError) as e:
        _stamp()
    assert str(e.value) == ("compiling kvscope_stamp (stamp.cu, KV_BF16) for sm_90 with NVRTC failed: RuntimeError: "
                            "nvrtc: error: identifier \"x\" is undefined")
    cupy.compile_error = None
    cupy.symbols = set()
    loader.clear_caches()
    with pytest.raises(KvscopeError, match=r"^compiling kvscope_rms_norm_vec .*named symbol not found$"):
        kl.launch("kvscope_rms_norm", "vec", torch.float32, CUDA0, (1, 1, 1), (1, 1, 1), [])
    with pytest.raises(KvscopeError, match=r"no source for kernel kvscope_nope: .*nope\.cu is missing"):
        kl.launch("kvscope_nope", "", torch.float32, CUDA0, (1, 1, 1), (1, 1, 1), [])


def test_large_shared_memory_raises_the_kernels_limit_once(cupy: FakeCupy) -> None:
    for _ in range(2):
        kl.launch("kvscope_stamp", "", torch.float32, CUDA0, (1, 1, 1), (1, 1, 1), [], shared_bytes=100_000)
    kl.launch("kvscope_stamp", "", torch.float32, CUDA0, (1, 1, 1), (1, 1, 1), [], shared_bytes=40_000)
    assert [e for e in cupy.log if e[0] == "shared"] == [("shared", "kvscope_stamp", 100_000)]
    assert [e[5] for e in cupy.launches()] == [100_000, 100_000, 40_000]


def test_arguments_are_typed_explicitly() -> None:
    assert kl._arg(ctypes.c_int(3)) == 3 and type(kl._arg(ctypes.c_int(3))) is np.int32
    assert type(kl._arg(ctypes.c_float(1.5))) is np.float32
    assert type(kl._arg(ctypes.c_longlong(-2))) is np.int64
    assert kl._arg(ctypes.c_void_p(None)) == 0 and kl._arg(ctypes.c_void_p(4096)) == 4096
    for bad in (1.5, True, "x"):
        with pytest.raises(TypeError, match="pass ptr\\(\\), i32\\(\\), i64\\(\\) or f32\\(\\)"):
            kl._arg(bad)


def test_kernel_sources_are_found_by_name() -> None:
    kl.kernel_file.cache_clear()
    assert kl.kernel_file("kvscope_rms_norm") == "rms_norm.cu"
    assert kl.kernel_file("kvscope_stamp") == "stamp.cu"
    assert all(kl.kernel_file(e) == f for e, f in kl.KERNEL_FILES.items())


def test_kernels_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(loader.KERNELS_DIR_ENV, str(tmp_path))
    assert loader.kernels_dir() == tmp_path
    monkeypatch.setenv(loader.KERNELS_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(KvscopeError, match=r"^KVSCOPE_KERNELS_DIR=.*absent is not a folder"):
        loader.kernels_dir()
    monkeypatch.delenv(loader.KERNELS_DIR_ENV)
    assert loader.kernels_dir() == (loader.DEFAULT_BUILD_DIR if loader.DEFAULT_BUILD_DIR.is_dir() else None)
    assert ROOT / "build" / "kernels" == loader.DEFAULT_BUILD_DIR


def test_without_cupy_kernels_on_is_one_line_and_the_default_is_off_with_one_note(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setattr(plan, "_NOTES_SHOWN", set())
    loader.clear_caches()
    with pytest.raises(KvscopeError) as e:
        loader.import_cupy()
    assert "\n" not in str(e.value) and "need CuPy" in str(e.value) and "--kernels off" in str(e.value)
    with pytest.raises(KvscopeError) as e:
        plan.use_kernels(True, CUDA0, torch.bfloat16)
    assert str(e.value).startswith("--kernels on needs CuPy (ModuleNotFoundError") and "'.[cuda13]'" in str(e.value)
    assert str(e.value).endswith("or run with --kernels off")
    assert plan.use_kernels(None, CUDA0, torch.bfloat16) is False
    assert plan.use_kernels(None, CUDA0, torch.bfloat16) is False
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kvscope: note: kvscope's CUDA kernels are off, CuPy is missing")
    assert plan.use_kernels(False, CUDA0, torch.bfloat16) is False
    assert plan.use_kernels(None, torch.device("cpu"), torch.float32) is False
    assert capsys.readouterr().err == ""


def test_with_cupy_the_default_on_cuda_is_on(cupy: FakeCupy) -> None:
    assert plan.use_kernels(None, CUDA0, torch.bfloat16) is True
    assert plan.use_kernels(True, CUDA0, torch.float16) is True


# ---- GPU: the real CuPy ---------------------------------------------------------------------------------------
def _need_gpu_and_cupy() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("cupy")


@pytest.mark.gpu
def test_gpu_kernels_come_from_the_build_when_it_matches() -> None:
    """Where each kernel came from, as the loader says and as `choose` predicts: the CMake build's fatbin when one
    matches this device (run after `cmake --build build`), else NVRTC."""
    _need_gpu_and_cupy()
    from kvscope.kernels import rms_norm as k_rms_norm

    loader.clear_caches()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    k_rms_norm.rms_norm(x, torch.ones(256, device="cuda", dtype=torch.bfloat16), 1e-6)
    chosen = loader.choose("rms_norm.cu", "KV_BF16", loader.device_arch(0), loader.kernels_dir())
    origin = loader.kernel("rms_norm.cu", "kvscope_rms_norm_vec", "KV_BF16", 0).origin
    print(f"rms_norm bf16: {origin}")
    assert origin.startswith("fatbin" if chosen.path is not None else "nvrtc")


@pytest.mark.gpu
def test_gpu_a_launch_inside_a_capture_is_a_kernel_node() -> None:
    """Captured once, replayed over new input in place: the replay recomputes from what the input holds then."""
    _need_gpu_and_cupy()
    from kvscope.kernels import common as k_common
    from kvscope.kernels import rms_norm as k_rms_norm

    x = torch.randn(8, 512, device="cuda", dtype=torch.float16)
    w = torch.rand(512, device="cuda", dtype=torch.float16) + 0.5
    k_rms_norm.rms_norm(x, w, 1e-6)  # loads the kernel before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = k_rms_norm.rms_norm(x, w, 1e-6)  # (8, 512) in the graph's pool
    for seed in (1, 2):
        x.copy_(torch.randn(8, 512, generator=torch.Generator("cuda").manual_seed(seed), device="cuda",
                            dtype=torch.float16))
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out, k_rms_norm.rms_norm_ref(x, w, 1e-6), **k_common.REF_TOLERANCE[torch.float16])


@pytest.mark.gpu
def test_gpu_launches_go_to_torchs_current_stream() -> None:
    """On a side stream held busy by a sleep, the input is rewritten and then normalised: launched anywhere but on
    that stream, the kernel would read the old input."""
    _need_gpu_and_cupy()
    from kvscope.kernels import rms_norm as k_rms_norm

    x = torch.zeros(2, 256, device="cuda", dtype=torch.float32)
    w = torch.ones(256, device="cuda", dtype=torch.float32)
    k_rms_norm.rms_norm(x, w, 1e-6)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time on this stream before the fill
        x.fill_(3.0)
        out = k_rms_norm.rms_norm(x, w, 1e-6)
    side.synchronize()
    torch.testing.assert_close(out, torch.ones(2, 256, device="cuda"), atol=1e-5, rtol=1e-5)
