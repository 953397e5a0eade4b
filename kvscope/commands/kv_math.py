"""`kvscope kv-math`: KV-cache memory maths of a model (bytes per token and per request, capacity under a memory
budget, Little's-law concurrency, paged-cache waste), printed as a table or one JSON object. Torch-free, except that
`--device cuda` asks torch for the GPU's memory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from kvscope.analysis.kvmath import GIB_BYTES, KvQuery, kv_math
from kvscope.errors import KvscopeError
from kvscope.model.source import resolve_model


def command(ns: argparse.Namespace) -> int:
    result = compute(ns)
    if ns.json:
        print(json.dumps(result))
    else:
        Console().print(_table(result))
    return 0


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


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"KV-cache maths: {result['model']}, batch {result['batch']} x seq {result['seq']}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, int) and "bytes" in key:
            shown = f"{value:,} B ({value / GIB_BYTES:.3f} GiB)"
        elif isinstance(value, float):
            shown = f"{value:,.1f}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, shown)
    return table
