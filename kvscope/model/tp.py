"""Tensor parallelism's shard plan (Megatron-style), torch only: no process group, no collective.

Rank r of `tp` holds:
- attention: its `n_heads/tp` query heads and `n_kv_heads/tp` KV heads, column-parallel. The fused `wqkv` of a rank
  is [its q rows, its k rows, its v rows], each cut out of its own block of the full q | k | v stack (the q bias,
  k bias and v bias likewise); `wo` is row-parallel: the columns of its q heads, the bias whole (added by rank 0 only).
- MLP: its `intermediate_size/tp` gate columns and the same up columns (`w13` = [its gate rows, its up rows]), and
  the matching columns of `w2` (row-parallel).
- embeddings and lm_head: its `vocab_size/tp` vocabulary rows.
- norms: whole on every rank.

A rank's modules are the ordinary `Transformer` of `local_args(args, tp)` (the same numbers with heads, intermediate
size and vocabulary divided), so the KV cache of a rank holds `n_kv_heads/tp` heads. Random weights: each full tensor
is drawn exactly as `model.weights.init_random` draws it for tp=1 and the rank keeps its slice, so tp=N holds the
same numbers as tp=1. A checkpoint: `checkpoint_slice` names the part of each Hugging Face tensor a rank reads (read
with safetensors' `get_slice`, never the whole tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs
from kvscope.model.layers import Transformer

MAX_TP = 1024  # a bound on --tp that any host of GPUs sits far below


def check_tp(args: ModelArgs, tp: int) -> None:
    """Refuse a tensor-parallel degree that does not split the model evenly, with the numbers, in one line."""
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
        raise KvscopeError(f"--tp must be an integer from 1 to {MAX_TP}, got {tp!r}")
    for what, n in (("KV heads (n_kv_heads)", args.n_kv_heads), ("attention heads (n_heads)", args.n_heads),
                    ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size)):
        if n % tp:
            raise KvscopeError(f"--tp {tp} does not divide {args.name}'s {n} {what}; tensor parallelism shards "
                               f"them evenly (choose a tp that divides {n})")


def local_args(args: ModelArgs, tp: int) -> ModelArgs:
    """The numbers of one rank's modules: heads, KV heads, intermediate size and vocabulary divided by `tp`."""
    check_tp(args, tp)
    return replace(args, n_heads=args.n_heads // tp, n_kv_heads=args.n_kv_heads // tp,
                   intermediate_size=args.intermediate_size // tp, vocab_size=args.vocab_size // tp,
                   head_dim=args.head_dim)


@dataclass(frozen=True)
class ShardPlan:
    """Which part of every full tensor rank `rank` of `tp` holds (row ranges are [start, end))."""

    args: ModelArgs  # the full model
    tp: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.args, self.tp)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.tp:
            raise KvscopeError(f"rank must be an integer from 0 to {self.tp - 1}, got {self.rank!r}")

    @property
    def local(self) -> ModelArgs:
        return local_args(self.args, self.tp)

    def _part(self, n: int) -> tuple[int, int]:
        size = n // self.tp
        return self.rank * size, (self.rank + 1) * size

    @property
    def q_rows(self) -> tuple[int, int]:
        """Rows of the full q block (heads * head_dim) this rank holds."""
        return self._part(self.args.q_size)

    @property
    def kv_rows(self) -> tuple[int, int]:
        """Rows of the full k block (and of the v block) this rank holds."""
        return self._part(self.args.kv_size)

    @property
    def ff_rows(self) -> tuple[int, int]:
        """Rows of the full gate block (and of the up block) this rank holds."""
        return self._part(self.args.intermediate_size)

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """The vocabulary ids [start, end) of this rank's embedding and lm_head rows."""
        return self._part(self.args.vocab_size)

    def qkv_index(self) -> torch.Tensor:
        """Rows of the full fused wqkv (q | k | v) this rank holds, in its own order [q, k, v] (int64)."""
        a = self.args
        (q0, q1), (k0, k1) = self.q_rows, self.kv_rows
        return torch.cat((torch.arange(q0, q1), a.q_size + torch.arange(k0, k1),
                          a.q_size + a.kv_size + torch.arange(k0, k1)))

    def w13_index(self) -> torch.Tensor:
        """Rows of the full fused w13 (gate | up) this rank holds, in its own order [gate, up] (int64)."""
        f0, f1 = self.ff_rows
        return torch.cat((torch.arange(f0, f1), self.args.intermediate_size + torch.arange(f0, f1)))

    def param_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full parameter `name` (a name of `Transformer.named_parameters()`)."""
        if name in ("tok_embeddings.weight", "output.weight"):
            lo, hi = self.vocab_rows
            return full[lo:hi]  # (V/tp, dim)
        if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):
            return full.index_select(0, self.qkv_index().to(full.device))  # ((H + 2 H_kv)/tp * D, ...)
        if name.endswith("feed_forward.w13.weight"):
            return full.index_select(0, self.w13_index().to(full.device))  # (2F/tp, dim)
        if name.endswith("attention.wo.weight"):
            lo, hi = self.q_rows
            return full[:, lo:hi]  # (dim, H/tp * D)
        if name.endswith("feed_forward.w2.weight"):
            lo, hi = self.ff_rows
            return full[:, lo:hi]  # (dim, F/tp)
        if name.endswith(("norm.weight", "attention.wo.bias")):
            return full  # replicated (the o_proj bias is added by rank 0 only)
        raise KeyError(f"no shard rule for parameter {name!r}")

    def checkpoint_slice(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, end) of the Hugging Face tensor `name` this rank reads, or None for a tensor read whole."""
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab_rows)
        if ".self_attn.q_proj." in name:
            return (0, *self.q_rows)
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return (0, *self.kv_rows)
        if name.endswith(".self_attn.o_proj.weight"):
            return (1, *self.q_rows)
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            return (0, *self.ff_rows)
        if name.endswith(".mlp.down_proj.weight"):
            return (1, *self.ff_rows)
        return None


@torch.no_grad()
def init_random_shard(model: Transformer, plan: ShardPlan, seed: int,
                      draw: Callable[[torch.Tensor, torch.Generator], None]) -> None:
    """Fill a rank's modules (of `plan.local`) with its slices of the tp=1 random weights: every full parameter is
    drawn in `init_random`'s order with the same generator by `draw(full, gen)` (norm weights are 1), then sliced.
    One full tensor at a time is held on the device."""
    device = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    with torch.device("meta"):
        full_model = Transformer(plan.args)
    if plan.args.tie_word_embeddings:
        full_model.output.weight = full_model.tok_embeddings.weight
    local = dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, meta in sorted(full_model.named_parameters(), key=lambda kv: kv[0]):  # tied weights listed once
        param = local[name]
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        full = torch.empty(meta.shape, dtype=dtype, device=device)
        draw(full, gen)
        part = plan.param_slice(name, full)
        if part.shape != param.shape:
            raise ValueError(f"shard of {name}: {tuple(part.shape)} does not fit the rank's {tuple(param.shape)}")
        param.copy_(part)
        del full
