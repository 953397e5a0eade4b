"""The manual KV cache: one contiguous allocation with per-layer views."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs, kv_bytes_per_token
from kvscope.model.dtypes import itemsize


class KVCache:
    """K and V of every layer in one tensor `(layers, 2, batch, max_seq, kv_heads, head_dim)`.

    Token-major per sequence: one sequence's keys of one layer are a single `(max_seq * kv_heads * head_dim)` block,
    which the flash-attention decode kernel reads in place (varlen layout) and a prefill writes without a transpose.

    `lengths` (device, int64, (B,)) is how many positions of each sequence hold valid K/V; the engine reads it as the
    position of the next token, so decoding needs no host sync. A host mirror of the lengths is kept in step (every
    sequence advances by one per decode step), so overflow is caught on the host before any kernel runs.
    """

    def __init__(self, args: ModelArgs, batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if batch <= 0 or max_seq <= 0:
            raise KvscopeError(f"KV cache needs batch > 0 and max_seq > 0, got batch={batch}, max_seq={max_seq}")
        self.args = args
        self.batch = batch
        self.max_seq = max_seq
        # (L, 2, B, S, H_kv, D); zeros so that unused slots are finite (they are masked out anyway)
        self.data = torch.zeros(
            (args.n_layers, 2, batch, max_seq, args.n_kv_heads, args.head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)  # (B,)
        self._host_lengths = [0] * batch
        self._staged: torch.Tensor | None = None  # page-locked lengths of a ragged start (CUDA), made at first use
        self._staged_read: torch.cuda.Event | None = None

    @staticmethod
    def bytes_for(args: ModelArgs, batch: int, max_seq: int, dtype: torch.dtype) -> int:
        """Bytes a cache of this shape takes, without allocating it (kv-math's formula, `kv_bytes_per_token`)."""
        return kv_bytes_per_token(args, itemsize(dtype)) * batch * max_seq

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]  # (B, S, H_kv, D)

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]  # (B, S, H_kv, D)

    def kv(self, layer: int) -> torch.Tensor:
        return self.data[layer]  # (2, B, S, H_kv, D)

    @property
    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    def start(self, lengths: Sequence[int]) -> None:
        """Begin new sequences of the given prompt lengths (host ints); sets the device lengths without a host sync
        (equal lengths: a fill; ragged ones on CUDA: a non-blocking copy from page-locked memory)."""
        if len(lengths) != self.batch:
            raise KvscopeError(f"KV cache holds {self.batch} sequences, got {len(lengths)} lengths")
        too_long = [n for n in lengths if n > self.max_seq]
        if too_long:
            raise KvscopeError(f"prompt of {max(too_long)} tokens overflows the KV cache of {self.max_seq} positions")
        self._host_lengths = [int(n) for n in lengths]
        if len(set(self._host_lengths)) == 1:
            self.lengths.fill_(self._host_lengths[0])  # a kernel with a scalar argument: no copy, no host sync
            return
        if self.lengths.device.type != "cuda":
            self.lengths.copy_(torch.tensor(self._host_lengths, dtype=torch.int64))
            return
        # a ragged batch: the lengths go through a page-locked staging buffer, copied without a host sync
        if self._staged is None:
            self._staged = torch.empty(self.batch, dtype=torch.int64, pin_memory=True)  # (B,)
            self._staged_read = torch.cuda.Event()
        else:
            self._staged_read.synchronize()  # named sync: the previous start's copy has read the staging buffer
        self._staged.copy_(torch.tensor(self._host_lengths, dtype=torch.int64))
        self.lengths.copy_(self._staged, non_blocking=True)
        self._staged_read.record()

    def check_room(self, steps: int = 1) -> None:
        """Raise before a step would write past `max_seq`."""
        longest = max(self._host_lengths) + steps
        if longest > self.max_seq:
            raise KvscopeError(
                f"KV cache overflow: a sequence would reach {longest} positions, cache holds {self.max_seq}")

    def advance(self, device: bool = True) -> None:
        """Every sequence gained one position (call after its K/V were written). `device=False` when the device
        lengths were already advanced by captured work (a CUDA-graph replay)."""
        if device:
            self.lengths.add_(1)
        self._host_lengths = [n + 1 for n in self._host_lengths]
