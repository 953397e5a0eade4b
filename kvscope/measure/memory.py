"""Out of memory, for `run` and `sweep`: which exceptions are a failed allocation, how one is told in one line, and
what a configuration needs against what its device has.

A failed allocation is `torch.OutOfMemoryError`, Python's `MemoryError`, or a `RuntimeError` of an allocator that
could not allocate: the CPU's "DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory", cuBLAS'
CUBLAS_STATUS_ALLOC_FAILED, a tensor size beyond 64 bits ("Storage size calculation overflowed"). Any other error is
not one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from kvscope.engine.plan import RunPlan
from kvscope.model.config import kv_bytes_per_token
from kvscope.model.dtypes import itemsize
from kvscope.model.kv_cache import KVCache

# substrings of the messages of allocation failures raised as a plain RuntimeError (compared in lower case)
_ALLOC_FAILURES = ("can't allocate memory", "cannot allocate memory", "out of memory", "cublas_status_alloc_failed",
                   "storage size calculation overflowed")
_ASKED = re.compile(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ [KMGTP]?i?B)", re.IGNORECASE)
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")
_CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def allocation_failure(exc: BaseException) -> bool:
    """Whether `exc` says that memory could not be allocated, on any device (see the module docstring)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _ALLOC_FAILURES)


def allocation_message(exc: BaseException, plan: RunPlan) -> str:
    """One line for a run that ran out of memory: the batch and sequence, the bytes the failed allocation asked
    for, what the KV cache needs."""
    spec, cfg = plan.spec, plan.cfg
    found = _ASKED.search(str(exc))
    if found and found.group(1):
        asked = f"an allocation of {int(found.group(1)):,} bytes failed"
    elif found:
        asked = f"an allocation of {found.group(2)} failed"
    elif "overflow" in str(exc).lower():
        asked = "a tensor size beyond 64 bits was asked for"
    else:
        asked = "an allocation failed"
    kv = kv_bytes_per_token(plan.source.args, itemsize(cfg.dtype)) * spec.batch_size * cfg.max_seq
    return (f"out of memory on {cfg.device} for --batch-size {spec.batch_size} --seq {spec.seq} (--gen-tokens "
            f"{spec.gen_tokens}): {asked}; the KV cache alone takes {kv:,} bytes")


def allocation_reason(exc: BaseException) -> str:
    """The first line of an allocation failure, without c10's "[enforce fail at FILE:LINE] err == 0." prefix."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return _ENFORCE.sub("", first) or type(exc).__name__


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all (on the CPU: physical memory, or the cgroup limit when lower); None when
    it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    if _CGROUP_MEMORY_MAX.is_file():  # cgroup v2: "max" or a byte count
        try:
            limit = _CGROUP_MEMORY_MAX.read_text().strip()
        except OSError:
            limit = "max"  # unreadable: the physical memory is the bound
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def bytes_needed(plan: RunPlan) -> int:
    """A lower bound of the bytes one configuration needs on its device: weights, KV cache, and on the CPU the
    prompt (exact integers: a size no tensor can have is simply larger than any device)."""
    spec, cfg, args = plan.spec, plan.cfg, plan.source.args
    need = args.param_count() * itemsize(cfg.dtype) + KVCache.bytes_for(args, spec.batch_size, cfg.max_seq, cfg.dtype)
    if cfg.device.type == "cpu":
        need += spec.batch_size * spec.seq * torch.int64.itemsize
    return need
