"""Tensor parallelism's collectives in the engine, over a standard torch.distributed process group (NCCL on CUDA,
gloo on the CPU). The shard plan (who holds what): `kvscope.model.tp`.

Per decoder layer two all-reduces (sum) join the row-parallel products: after `o_proj` and after the MLP's down
product. The residual stream h is replicated; rank 0 computes h += x_r W_r^T (+ the o_proj bias) and every other rank
h = x_r W_r^T, so one all-reduce of h gives h + sum of the partials, the residual and the bias counted once. With
tp=1 the product is exactly the single-GPU one and the all-reduce over one rank leaves it as it is.

The embedding: each rank looks up the ids of its vocabulary range (zero rows elsewhere), one all-reduce (a sum of
one row and zeros, so exact). The lm_head: each rank's logits (B, V/tp), gathered into the full (B, V) so the argmax
and the logits are those of one GPU.

Every collective runs on torch's current stream without a host sync, so a decode step with them is captured in a
CUDA graph (NCCL); the all-reduces of layer i are regions `L07.allreduce_attn` and `L07.allreduce_mlp` (events and
NVTX, op level, `schema.COLLECTIVE_OPS`); those of the embedding and the lm_head sit inside the `embed` and
`lm_head` regions.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from kvscope.engine.regions import RegionSpec
from kvscope.errors import KvscopeError
from kvscope.model.layers import linear_residual_
from kvscope.model.tp import ShardPlan
from kvscope.schema import COLLECTIVE_OPS, op_name

# how long a rank waits in a collective for the others before failing (a rank that died leaves the rest waiting)
COLLECTIVE_TIMEOUT_S = 600


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS picks it), for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of `rank`: cuda:rank on CUDA (one GPU per rank, on one host), else the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def check_devices(device: torch.device, tp: int) -> None:
    """Refuse more CUDA ranks than GPUs, in one line."""
    if device.type == "cuda" and tp > torch.cuda.device_count():
        raise KvscopeError(f"--tp {tp} needs {tp} GPUs on this host, torch sees {torch.cuda.device_count()}")


def init_group(rank: int, world: int, device: torch.device, init_method: str | None = None) -> None:
    """Join the default process group: NCCL bound to `device` on CUDA (communicators made now, before any
    capture), gloo on the CPU. `init_method` None: the environment (torchrun's MASTER_ADDR/MASTER_PORT)."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world, timeout=timeout,
                                device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class TensorParallel:
    """One rank's collectives for the engine; `plan` says what this rank holds."""

    def __init__(self, plan: ShardPlan, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise KvscopeError("tensor parallelism needs a process group (kvscope.engine.tp.init_group)")
        size = dist.get_world_size(group)
        if size != plan.tp or dist.get_rank(group) != plan.rank:
            raise KvscopeError(f"shard plan of rank {plan.rank}/{plan.tp} in a process group where this process is "
                               f"rank {dist.get_rank(group)}/{size}")
        self.plan, self.group = plan, group
        self.rank, self.tp = plan.rank, plan.tp
        self.vocab_size = plan.args.vocab_size  # the full vocabulary (the rank's modules hold vocab_size / tp)
        n = plan.args.n_layers
        # L07.allreduce_attn, L07.allreduce_mlp
        self.regions: list[Mapping[str, RegionSpec]] = [
            {op: RegionSpec(op_name(i, n, op), "op", {"layer": i, "op": op, "chain": True}) for op in COLLECTIVE_OPS}
            for i in range(n)]

    # ---- the three places where ranks meet ---------------------------------------------------------------------
    def embed(self, emb: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., ) int64 of the full vocabulary -> embeddings (..., dim), summed over the ranks."""
        lo, hi = self.plan.vocab_rows
        ids = tokens - lo  # (...,)
        outside = (ids < 0) | (ids >= hi - lo)  # (...,) ids another rank holds
        h = emb(ids.masked_fill(outside, 0))  # (..., dim)
        h.masked_fill_(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(h, group=self.group)
        return h

    def partial_residual_(self, h: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The row-parallel product before its all-reduce: rank 0 h += x W^T (+ bias), every other rank h = x W^T.
        h: (N, dim), x: (N, in/tp), 2-D views; returns h."""
        if self.rank == 0:
            return linear_residual_(h, x, linear)
        if h.dim() != 2 or x.dim() != 2 or h.shape[0] != x.shape[0] or h.shape[1] != linear.out_features \
                or x.shape[1] != linear.in_features:
            raise ValueError(f"partial_residual_: h{tuple(h.shape)} = x{tuple(x.shape)} @ "
                             f"W({linear.out_features}, {linear.in_features})^T does not fit")
        return h.addmm_(x, linear.weight.t(), beta=0)  # beta=0: h's old values are ignored, not multiplied

    def all_reduce_(self, h: torch.Tensor) -> torch.Tensor:
        """Sum h over the ranks, in place."""
        dist.all_reduce(h, group=self.group)
        return h

    def barrier(self) -> None:
        """Wait for every rank (a host sync: used only outside timed work, named where it is called)."""
        dist.barrier(group=self.group)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Each rank's logits (B, V/tp) -> the full logits (B, V), in vocabulary order, on every rank."""
        if local.dim() != 2 or local.shape[1] * self.tp != self.vocab_size:
            raise ValueError(f"gather_logits: logits {tuple(local.shape)} are not (B, {self.vocab_size} / {self.tp})")
        b, v_local = local.shape
        out = torch.empty(self.tp * b, v_local, dtype=local.dtype, device=local.device)  # (tp*B, V/tp)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12: the latter
        gather(out, local.contiguous(), group=self.group)
        return out.view(self.tp, b, v_local).permute(1, 0, 2).reshape(b, self.tp * v_local)  # (B, V)
