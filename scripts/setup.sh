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
python3 -m pip install -q -e ".[dev]" 2> >(grep -v -e "^WARNING: Location" -e "^WARNING: Running pip as" >&2)
