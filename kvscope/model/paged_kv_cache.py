"""The paged KV cache: one allocation of fixed-size blocks shared by every sequence, a free list, and swap space.

`data` is `(layers, 2, n_blocks, block_size, kv_heads, head_dim)`: layer i's keys are the pool `data[i, 0]`, `(n_blocks,
block_size, H_kv, D)`, and position t of a sequence whose block table is `table` lives in row
`table[t // block_size] * block_size + t % block_size` of the pool viewed as `(n_blocks * block_size, H_kv, D)` (its
"slot"). Block 0 is never handed out: it is the scratch block that the padding rows of a CUDA-graph bucket write to
and read from, so a padded row never touches a live sequence's keys.

Sizing follows the serving engines: a byte budget (`--kv-pool-gb`) or a fraction of the free device memory, divided
by the bytes of one block (`block_bytes`, from `kv_bytes_per_token`, the formula `kvscope kv-math` prints; checked
against `nbytes`, which is counted from `numel()`).

The block tables themselves are host lists held by the scheduler's sequences; the engine turns the ones an
iteration needs into device tensors. Swapping copies a sequence's blocks to page-locked host memory and back
(`swap_out` / `swap_in`), on the current stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs, kv_bytes_per_token
from kvscope.model.dtypes import itemsize

SCRATCH_BLOCK = 0  # the block padding rows use; never allocated to a sequence
RESERVED_BLOCKS = 1


class BlockPool:
    """The free list of `n_blocks` blocks (block 0 reserved): allocation takes from the top, freeing pushes back."""

    def __init__(self, n_blocks: int) -> None:
        if n_blocks <= RESERVED_BLOCKS:
            raise KvscopeError(f"a KV pool needs more than {RESERVED_BLOCKS} block, got {n_blocks}")
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, RESERVED_BLOCKS - 1, -1))  # lowest ids handed out first

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (the reserved scratch block excluded)."""
        return self.n_blocks - RESERVED_BLOCKS

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks off the free list; KvscopeError when fewer are free (callers check `free` first)."""
        if n < 0 or n > len(self._free):
            raise KvscopeError(f"KV pool: {n} blocks asked, {len(self._free)} free of {self.capacity}")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def release(self, blocks: Sequence[int]) -> None:
        """Give blocks back (a finished, preempted or swapped-out sequence's)."""
        if any(b < RESERVED_BLOCKS or b >= self.n_blocks for b in blocks):
            raise KvscopeError(f"KV pool: blocks {list(blocks)} outside [{RESERVED_BLOCKS}, {self.n_blocks})")
        self._free.extend(reversed(blocks))
        if len(self._free) > self.capacity:
            raise KvscopeError("KV pool: a block was released twice")


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


class PagedKVCache:
    """K and V of every layer in one tensor `(L, 2, n_blocks, block_size, H_kv, D)`, handed out in blocks."""

    def __init__(self, args: ModelArgs, n_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if block_size <= 0:
            raise KvscopeError(f"KV block size must be positive, got {block_size}")
        self.args = args
        self.block_size = block_size
        self.dtype = dtype
        self.pool = BlockPool(n_blocks)
        # (L, 2, N, bs, H_kv, D); zeros so that unused rows are finite (they are masked out anyway)
        self.data = torch.zeros((args.n_layers, 2, n_blocks, block_size, args.n_kv_heads, args.head_dim),
                                dtype=dtype, device=device)

    @staticmethod
    def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over every layer, K and V (kv-math's formula)."""
        return kv_bytes_per_token(args, itemsize(dtype)) * block_size

    @classmethod
    def blocks_in_budget(cls, args: ModelArgs, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
        """Blocks a byte budget holds (the scratch block included)."""
        return budget_bytes // cls.block_bytes(args, block_size, dtype)

    @property
    def n_blocks(self) -> int:
        return self.pool.n_blocks

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one position over every layer, K and V (from `numel()`; equals `block_bytes(...) // block_size`)."""
        return self.nbytes // (self.n_blocks * self.block_size)

    @property
    def token_capacity(self) -> int:
        """Positions the pool can hold across all sequences."""
        return self.pool.capacity * self.block_size

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]  # (N, bs, H_kv, D)

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]  # (N, bs, H_kv, D)

    def slot(self, table: Sequence[int], position: int) -> int:
        """The pool row of `position` of a sequence with block table `table`."""
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def swap_out(self, blocks: Sequence[int]) -> torch.Tensor:
        """Copy `blocks` of every layer to page-locked host memory `(L, 2, n, bs, H_kv, D)` (on CUDA a non-blocking
        copy on the current stream; the caller releases the blocks only once the copy is ordered before any reuse,
        which the stream guarantees)."""
        idx = torch.tensor(list(blocks), dtype=torch.int64, device=self.data.device)
        gathered = self.data.index_select(2, idx)  # (L, 2, n, bs, H_kv, D)
        if self.data.device.type != "cuda":
            return gathered
        host = torch.empty(gathered.shape, dtype=self.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        return host

    def swap_in(self, host: torch.Tensor, blocks: Sequence[int]) -> None:
        """Copy a swapped-out sequence's blocks back into `blocks` (as many as it had)."""
        if host.shape[2] != len(blocks):
            raise KvscopeError(f"swap in: {host.shape[2]} blocks saved, {len(blocks)} given")
        idx = torch.tensor(list(blocks), dtype=torch.int64, device=self.data.device)
        self.data.index_copy_(2, idx, host.to(self.data.device, non_blocking=True))
