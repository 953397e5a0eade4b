"""The CMake build of kvscope's kernels (CMakeLists.txt), run here with this machine's nvcc (no GPU needed): every
`kvscope/kernels/cuda/*.cu` gives one fatbin per element type whose sm_90 image exports exactly the source's
`extern "C" __global__` kernels (read from the cubins' ELF symbol tables, no cuobjdump needed), PTX with the same
entries, digests that the runtime loader accepts, and the C++ benchmark links.

One architecture (sm_90) keeps the build short: 31 s here for 7 sources on 2 busy cores (decode_attention.cu and
gemv.cu take 3-4 s of nvcc each per dtype); the default five architectures took 19 s on the 16-core H200 machine.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from paths import ROOT

from kvscope.kernels import loader

CUDA_DIR = ROOT / "kvscope" / "kernels" / "cuda"
TEST_ARCH = 90
_EM_CUDA = 190  # ELF e_machine of CUDA cubins
_STB_GLOBAL, _STT_FUNC, _SHT_SYMTAB = 1, 2, 2
_BUILD_LIMIT_S = 300  # the test's build takes ~30 s; a hang fails instead of stalling the suite


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), None)


def elf_kernels(blob: bytes) -> dict[int, set[str]]:
    """The global functions (kernels) of every CUDA ELF image in a fatbin, by SM version (e_flags bits 8-15)."""
    images: dict[int, set[str]] = {}
    at = blob.find(b"\x7fELF")
    while at != -1:
        elf = blob[at:]
        if elf[4] == 2:  # 64-bit ELF
            machine = struct.unpack_from("<H", elf, 18)[0]
            flags = struct.unpack_from("<I", elf, 48)[0]
            shoff = struct.unpack_from("<Q", elf, 40)[0]
            shentsize, shnum = struct.unpack_from("<HH", elf, 58)
            sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
            if machine == _EM_CUDA:
                names: set[str] = set()
                for _, kind, _, _, offset, size, link, _, _, _ in sections:
                    if kind != _SHT_SYMTAB:
                        continue
                    strtab = sections[link][4]
                    for i in range(size // 24):
                        st_name, st_info, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", elf, offset + i * 24)
                        if st_info >> 4 == _STB_GLOBAL and st_info & 0xF == _STT_FUNC and st_shndx != 0:
                            end = elf.index(b"\0", strtab + st_name)
                            names.add(elf[strtab + st_name:end].decode())
                images[(flags >> 8) & 0xFF] = names
        at = blob.find(b"\x7fELF", at + 4)
    return images


def declared_kernels(nvcc: str, source: Path, macro: str) -> set[str]:
    """The `extern "C" __global__` kernels of a source after the preprocessor (kernels may be made by macros)."""
    text = subprocess.run([nvcc, "-E", "-x", "cu", f"-D{macro}", "-include", str(CUDA_DIR / "common.cuh"),
                           str(source)], capture_output=True, text=True, check=True, timeout=120).stdout
    names = set()
    for m in re.finditer(r'extern\s+"C"\s+__attribute__\(\(global\)\)', text):
        head = text[m.end():m.end() + 2000].split("{", 1)[0]
        found = re.search(r"\b(kvscope_\w+)\s*\(", head)
        if found:
            names.add(found.group(1))
    return names


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    nvcc, cmake = _nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip(f"the CMake build needs nvcc and cmake ({'nvcc' if nvcc is None else 'cmake'} not found)")
    out = tmp_path_factory.mktemp("cmake-build")
    t0 = time.monotonic()
    for cmd in ([cmake, "-S", str(ROOT), "-B", str(out), f"-DKVSCOPE_CUDA_ARCHS={TEST_ARCH}"],
                [cmake, "--build", str(out), "-j", "2"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_LIMIT_S)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return out, time.monotonic() - t0


def test_every_kernel_symbol_is_in_its_fatbins(build: tuple[Path, float]) -> None:
    out, _ = build
    nvcc = _nvcc()
    assert nvcc is not None
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert {p.name for p in sources} >= {"rms_norm.cu", "silu_mul.cu", "rope_kv.cu", "stamp.cu"}
    for source in sources:
        declared = {macro: declared_kernels(nvcc, source, macro) for macro in loader.DTYPE_TAGS}  # may differ by dtype
        assert any(declared.values()), f"{source.name} declares no extern \"C\" kernel"
        for macro, tag in loader.DTYPE_TAGS.items():
            expected = declared[macro]
            blob = (out / "kernels" / f"{source.stem}.{tag}.fatbin").read_bytes()
            assert elf_kernels(blob) == {TEST_ARCH: expected}, f"{source.stem}.{tag}.fatbin ({macro})"
            entries = set(re.findall(rb"\.entry\s+(kvscope_\w+)", blob))  # the PTX of compute_90 rides along
            assert {e.decode() for e in entries} == expected


def test_the_loader_takes_the_build_and_knows_its_architectures(build: tuple[Path, float]) -> None:
    out, _ = build
    folder = out / "kernels"
    assert (folder / loader.MANIFEST_NAME).read_text().startswith(f'{{"archs": [{TEST_ARCH}], "ptx_arch": {TEST_ARCH}')
    for source in sorted(CUDA_DIR.glob("*.cu")):
        assert (folder / f"{source.stem}.sha256").read_text() == loader.source_digest(source.name)
        chosen = loader.choose(source.name, "KV_F16", TEST_ARCH, folder)
        assert chosen == loader.Choice(folder / f"{source.stem}.f16.fatbin", f"built for sm_{TEST_ARCH}")
        assert loader.choose(source.name, "KV_F16", 80, folder).path is None  # no sm_80 image, no older PTX
        assert loader.choose(source.name, "KV_F16", 100, folder).path is not None  # the driver JITs the PTX


def test_the_benchmark_executable_is_built(build: tuple[Path, float]) -> None:
    out, seconds = build
    bench = out / "kvscope_kernel_bench"
    assert bench.is_file() and bench.stat().st_mode & 0o111
    assert seconds < _BUILD_LIMIT_S
