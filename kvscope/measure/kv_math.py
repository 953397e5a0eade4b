"""The numbers of `kvscope kv-math` (and `kvscope.kv_math`) for its parsed arguments: the model's architecture, the
memory budget (given, or with `--device cuda` the GPU's), and `kvscope.analysis.kv_math`'s maths. Torch-free, except
that `--device cuda` asks torch for the GPU's memory."""

from __future__ import annotations

import argparse
from typing import Any

from kvscope.analysis.kv_math import KvQuery, kv_math
from kvscope.errors import KvscopeError
from kvscope.model.source import resolve_model
from kvscope.schema import GIB_BYTES


def compute(ns: argparse.Namespace) -> dict[str, Any]:
    """The numbers of `kvscope kv-math` for its parsed arguments (also `kvscope.kv_math`'s)."""
    source = resolve_model(ns.model, need_weights=False)  # the architecture is all kv-math needs
    gpu_mem = _budget(ns)
    if ns.reserve_gb < 0:
        raise KvscopeError(f"--reserve-gb must be >= 0, got {ns.reserve_gb}")
    dtype = ns.dtype or source.dtype_name()
    return kv_math(KvQuery(source.args, batch=ns.batch_size, seq=ns.seq, dtype=dtype, kv_dtype=ns.kv_dtype,
                           gpu_mem_bytes=gpu_mem, reserve_bytes=int(ns.reserve_gb * GIB_BYTES), rps=ns.rps,
                           latency_s=ns.latency_s, page_size=ns.page_size,
                           tp=1 if getattr(ns, "tp", None) is None else ns.tp))


def _budget(ns: argparse.Namespace) -> int | None:
    """The memory budget in bytes: --gpu-mem-gb, or with --device cuda the memory of the GPU present; None: none."""
    if ns.gpu_mem_gb is not None:
        if not ns.gpu_mem_gb > 0:
            raise KvscopeError(f"--gpu-mem-gb must be positive, got {ns.gpu_mem_gb}")
        return int(ns.gpu_mem_gb * GIB_BYTES)
    if ns.device is None:
        return None
    import torch  # only here: the rest of kv-math runs without torch

    from kvscope.engine.plan import resolve_device

    dev = resolve_device(ns.device)
    if dev.type != "cuda":
        raise KvscopeError("--device for kv-math takes cuda (the budget is the GPU's memory)")
    return int(torch.cuda.mem_get_info(dev)[1])
