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
with safetensors' `get_slice`, never the whole tensor). Torch-free (kv-math sizes a rank with `local_args`); the
tensors are sliced with plain indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs

if TYPE_CHECKING:  # annotations only: this module imports no torch
    import torch

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

    def qkv_index(self) -> list[int]:
        """Rows of the full fused wqkv (q | k | v) this rank holds, in its own order [q, k, v]."""
        a = self.args
        (q0, q1), (k0, k1) = self.q_rows, self.kv_rows
        return [*range(q0, q1), *range(a.q_size + k0, a.q_size + k1),
                *range(a.q_size + a.kv_size + k0, a.q_size + a.kv_size + k1)]

    def w13_index(self) -> list[int]:
        """Rows of the full fused w13 (gate | up) this rank holds, in its own order [gate, up]."""
        f0, f1 = self.ff_rows
        return [*range(f0, f1), *range(self.args.intermediate_size + f0, self.args.intermediate_size + f1)]

    def param_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full parameter `name` (a name of `Transformer.named_parameters()`)."""
        if name in ("tok_embeddings.weight", "output.weight"):
            lo, hi = self.vocab_rows
            return full[lo:hi]  # (V/tp, dim)
        if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):
            return full[self.qkv_index()]  # ((H + 2 H_kv)/tp * D, ...), a copy
        if name.endswith("feed_forward.w13.weight"):
            return full[self.w13_index()]  # (2F/tp, dim), a copy
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
