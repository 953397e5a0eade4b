"""The ranks of a tensor-parallel command (`run --tp N`, `generate --tp N`): started by torchrun, or spawned here.

`run_ranks(tp, device, target, *args)` calls `target(ctx, *args)` once per rank with the default process group
joined (NCCL on CUDA, rank r on cuda:r; gloo on the CPU) and returns rank 0's value, with the same code either way:
- inside a process started by torchrun (RANK and WORLD_SIZE set): this process is one rank, the group meets at
  torchrun's MASTER_ADDR/MASTER_PORT; every rank returns its own value (`RankValue.rank` says whose);
- otherwise: `tp` processes are spawned (torch.multiprocessing, start method spawn) and meet at 127.0.0.1 on a free
  port; each writes its value (or its one-line error) into a private temporary folder, read back here.

A `KvscopeError` in any rank comes back as that one line; the other ranks are ended by torch's spawn (they would wait
in a collective otherwise).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from kvscope.engine.plan import RunPlan
from kvscope.engine.tp import check_devices, free_port, init_group, launched_by_torchrun, leave_group, rank_device
from kvscope.errors import KvscopeError
from kvscope.model.tp import check_tp
from kvscope.schema import KVSCOPE_ENGINE

_RESULT = "rank{}.pkl"
_ERROR = "rank{}.error"


@dataclass(frozen=True)
class RankContext:
    """Who this process is: its rank of `tp`, its device, and the process group of its tensor-parallel ranks (None:
    the default group, every process)."""

    rank: int
    tp: int
    device: torch.device
    group: Any = None  # torch.distributed.ProcessGroup


@dataclass(frozen=True)
class RankValue:
    rank: int
    value: Any


def check_plan(plan: RunPlan, tp: int) -> None:
    """What --tp needs, checked before any rank starts: kvscope's engine, an even split, enough GPUs."""
    if plan.spec.engine != KVSCOPE_ENGINE:
        raise KvscopeError(f"--tp needs kvscope's engine, not --engine {plan.spec.engine}")
    check_tp(plan.source.args, tp)
    check_devices(plan.cfg.device, tp)


def run_ranks(tp: int, device: torch.device, target: Callable[..., Any], *args: Any,
              start_method: str = "spawn") -> RankValue:
    """`target(RankContext, *args)` in every rank (see the module docstring). `target` and `args` are pickled for
    spawned ranks: a module-level function and plain values. `start_method` "fork" (CPU only, the tests: no
    re-import in each rank) starts the ranks as copies of this process."""
    if start_method not in ("spawn", "fork") or (start_method == "fork" and device.type != "cpu"):
        raise KvscopeError(f"ranks start by spawn, or by fork on the CPU; got {start_method!r} on {device.type}")
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise KvscopeError(f"--tp {tp} under a launcher of {world} processes (WORLD_SIZE={world}); they must agree")
        local = int(os.environ.get("LOCAL_RANK", rank))  # its GPU on this host
        return RankValue(rank, _in_group(RankContext(rank, tp, rank_device(device, local)), None, target, args))
    with tempfile.TemporaryDirectory(prefix="kvscope-tp-") as tmp:
        init = f"tcp://127.0.0.1:{free_port()}"
        try:
            mp.start_processes(_spawned, args=(tp, device.type, init, target, args, tmp), nprocs=tp, join=True,
                               start_method=start_method)
        except ProcessException:
            errors = sorted(Path(tmp).glob(_ERROR.format("*")))
            if errors:
                raise KvscopeError(errors[0].read_text(encoding="utf-8")) from None
            raise
        with open(Path(tmp) / _RESULT.format(0), "rb") as f:
            return RankValue(0, pickle.load(f))


def _in_group(ctx: RankContext, init: str | None, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    init_group(ctx.rank, ctx.tp, ctx.device, init)
    try:
        return target(ctx, *args)
    finally:
        leave_group()


def _spawned(rank: int, tp: int, device_type: str, init: str, target: Callable[..., Any], args: tuple[Any, ...],
             tmp: str) -> None:
    """One spawned rank: CPU threads shared out between the ranks, the value (rank 0) or the error into `tmp`."""
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    ctx = RankContext(rank, tp, rank_device(torch.device(device_type), rank))
    try:
        value = _in_group(ctx, init, target, args)
    except KvscopeError as exc:
        Path(tmp, _ERROR.format(rank)).write_text(str(exc), encoding="utf-8")
        raise
    if rank == 0:
        with open(Path(tmp) / _RESULT.format(rank), "wb") as f:
            pickle.dump(value, f)
