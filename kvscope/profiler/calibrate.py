"""`kvscope calibrate`: measure the GPU's ceilings once and cache them per GPU name.

- copy bandwidth: a device-to-device copy of `copy_bytes`, bytes read + written per second;
- bf16 matmul rate: an n x n x n product on random data;
- the decode step's chain of matrix-vector products for a preset at batch 1, replayed from one CUDA graph: the
  floor of a cuBLAS-based decode step.

Each figure is a median of CUDA-event timings after warm-up. The cache is JSON at
`$XDG_CACHE_HOME/kvscope/calibration.json` (default `~/.cache/kvscope/calibration.json`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kvscope.calibration_cache import cache_path, load_ceilings, read_cache
from kvscope.errors import KvscopeError
from kvscope.io import OutputFile, os_reason
from kvscope.model.config import ModelArgs
from kvscope.profiler.timing import graph_ms, median_event_ms
from kvscope.schema import BYTES_PER_GB, FLOPS_PER_TFLOP, MS_PER_S

__all__ = ["cache_path", "calibrate", "check_cache", "load_ceilings", "matvec_chain_ms", "save"]

COPY_BYTES = 2**30
MATMUL_N = 8192


def matvec_chain_ms(args: ModelArgs, device: torch.device, reps: int = 20, batch: int = 1
                    ) -> tuple[float, int, int]:
    """Median ms of one decode step's matrix products at `batch` rows (fused q/k/v and gate/up as the engine runs
    them, the output projections, the lm_head), replayed from one CUDA graph; also the number of products and the
    weight bytes. At batch 1 these are matrix-vector products: the floor of a cuBLAS-based decode step."""
    dt = torch.bfloat16
    shapes = [(args.q_size + 2 * args.kv_size, args.dim), (args.dim, args.q_size),
              (2 * args.intermediate_size, args.dim), (args.dim, args.intermediate_size)] * args.n_layers
    shapes.append((args.vocab_size, args.dim))
    weights = [torch.randn(o, i, device=device, dtype=dt) * 0.02 for o, i in shapes]
    inputs = {i: torch.randn(batch, i, device=device, dtype=dt) for i in {i for _, i in shapes}}  # (B, in)
    outs = [torch.empty(batch, o, device=device, dtype=dt) for o, _ in shapes]  # (B, out)

    def chain() -> None:
        for w, out in zip(weights, outs, strict=True):
            torch.matmul(inputs[w.shape[1]], w.t(), out=out)

    ms = graph_ms(chain, calls=1, reps=reps, warmup=1)
    return ms, len(shapes), sum(w.numel() * w.element_size() for w in weights)


def calibrate(device: torch.device, preset: ModelArgs, copy_bytes: int = COPY_BYTES, n: int = MATMUL_N
              ) -> dict[str, Any]:
    if device.type != "cuda":
        raise KvscopeError("calibrate: measures a GPU, so it needs --device cuda and a CUDA device")
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_event_ms(lambda: dst.copy_(src), reps=20)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = median_event_ms(lambda: a @ b, reps=20)
    chain_ms, products, chain_bytes = matvec_chain_ms(preset, device)
    torch.cuda.empty_cache()
    return {
        "gpu": torch.cuda.get_device_name(device),
        "date": datetime.now(UTC).date().isoformat(),
        "torch": torch.__version__,
        "copy_gb_s": 2 * copy_bytes / (copy_ms / MS_PER_S) / BYTES_PER_GB,
        "bf16_tflop_s": 2 * n**3 / (mm_ms / MS_PER_S) / FLOPS_PER_TFLOP,
        "matvec_chain": {"preset": preset.name, "products": products, "weight_bytes": chain_bytes,
                         "ms": chain_ms, "gb_s": chain_bytes / (chain_ms / MS_PER_S) / BYTES_PER_GB},
    }


def _is_cache(p: Path) -> bool:
    """Whether `p` is a calibration cache (a JSON object), so `save` may replace it."""
    try:
        return isinstance(json.loads(p.read_bytes()), dict)
    except ValueError:
        return False


def check_cache(path: Path | None = None) -> dict[str, Any]:
    """The cache as `save` will find it, checked before anything is measured: an unusable file, a path the system
    refuses, a folder that cannot be written are one line now, not after the measurement."""
    p = path or cache_path()
    data = read_cache(p)
    if p.parent.is_dir():
        OutputFile(p, "calibration cache", _is_cache, "a kvscope calibration cache")
    return data


def save(result: dict[str, Any], path: Path | None = None) -> Path:
    """Add `result` to the cache (other GPUs' entries kept), written atomically (`kvscope.io.OutputFile`): a file
    that is not a calibration cache is never replaced, and every refusal of the system's is one line."""
    p = path or cache_path()
    data = read_cache(p)  # other GPUs' entries are kept; an unusable file stops here, untouched
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvscopeError(f"calibration cache {p}: cannot make the folder {p.parent}: {os_reason(exc)}") from None
    data[result["gpu"]] = result
    out = OutputFile(p, "calibration cache", _is_cache, "a kvscope calibration cache")
    out.write(json.dumps(data, default=str, indent=1).encode())
    return p
