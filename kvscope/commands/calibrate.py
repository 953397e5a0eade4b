"""`kvscope calibrate`: measure this GPU's ceilings (copy bandwidth, bf16 matmul rate, a decode step's matvec chain
in one CUDA graph) and cache them, so that runs report `decode_mbu` and `prefill_mfu` against them."""

from __future__ import annotations

import argparse
import json

from kvscope.engine.plan import resolve_device
from kvscope.model.config import ModelArgs
from kvscope.profiler.calibrate import calibrate, check_cache, save


def command(ns: argparse.Namespace) -> int:
    check_cache()  # the cache it will write, before anything is measured
    result = calibrate(resolve_device(ns.device), ModelArgs.from_preset(ns.model))
    path = save(result)
    if ns.json:
        print(json.dumps(result))
        return 0
    chain = result["matvec_chain"]
    print(f"{result['gpu']}: copy {result['copy_gb_s']:,.0f} GB/s (read + written), bf16 matmul "
          f"{result['bf16_tflop_s']:,.0f} TFLOP/s, {chain['preset']} batch-1 matvec chain "
          f"({chain['products']} products, one CUDA graph) {chain['ms']:.3f} ms = {chain['gb_s']:,.0f} GB/s")
    print(f"cached in {path}")
    return 0
