#!/usr/bin/env bash
# Install kvscope (editable) and its dependencies into the current python3. Idempotent and quiet.
# Without torch: on a machine with an NVIDIA driver, the default (CUDA) torch from PyPI; otherwise torch 2.13.0,
# the CPU build this workplace keeps on disk (a plain `pip install torch` would fetch a CUDA build of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python3 -m pip install -q torch
  else
    python3 -m pip install -q "torch==2.13.0"
  fi
fi
# With a driver: CuPy for torch's CUDA major version (kvscope's kernels load and launch through it)
extras="dev"
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda_major=$(python3 -c "import torch; print((torch.version.cuda or '').split('.')[0])")
  case "$cuda_major" in 12|13) extras="dev,cuda${cuda_major}" ;; esac
fi
python3 -m pip install -q -e ".[${extras}]" 2> >(grep -v -e "^WARNING: Location" -e "^WARNING: Running pip as" >&2)
# With a driver, nvcc and cmake: the kernels built ahead of time into build/kernels (else NVRTC compiles them at
# first use); a failed build is a note, not a failed setup
if command -v nvidia-smi >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then
  if ! { cmake -S . -B build >/dev/null && cmake --build build -j >/dev/null; }; then
    echo "kvscope: note: the CMake build of the kernels failed; they will be compiled with NVRTC at first use" >&2
  fi
fi
