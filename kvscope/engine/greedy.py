"""Greedy generation shared by kvscope's engine and transformers' (`kvscope.engine.hf`): prompts padded and checked
on the host, `decode_n` over the engine's own `decode_step`, and `generate` with its one host sync.

An engine that mixes in `GreedyLoop` provides `cfg` (its RunConfig), `ins` (its Instrument), `vocab_size`,
`next_tokens` (B,) on the device after a prefill or step, `prefill(tokens, lengths)`, `decode_step()` and
`_check_room(n)`; `GRAD_MODE` is the context manager its steps run under.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch

from kvscope.engine.regions import DECODE
from kvscope.errors import KvscopeError


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device
                ) -> tuple[torch.Tensor, list[int]]:
    """Right-pad host token lists into `(B, S_max)` int64 on `device`; validates ids on the host."""
    check_prompts(prompts, vocab_size)
    lengths = [len(p) for p in prompts]
    rows = [list(p) + [0] * (max(lengths) - len(p)) for p in prompts]
    return torch.tensor(rows, dtype=torch.int64, device=device), lengths  # (B, S_max)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every prompt non-empty, every id an int inside the vocabulary (host-side, before any device work)."""
    if not prompts:
        raise KvscopeError("no prompt given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise KvscopeError(f"prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise KvscopeError(f"prompt {i}: token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")


class GreedyLoop:
    """`decode_n` and `generate` over an engine's `decode_step` (see the module docstring)."""

    GRAD_MODE: ClassVar[Callable[[], AbstractContextManager[Any]]] = torch.inference_mode
    cfg: Any
    ins: Any
    vocab_size: int
    next_tokens: torch.Tensor

    def prefill(self, tokens: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def decode_step(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_room(self, n: int) -> None:
        raise NotImplementedError

    def decode_n(self, n: int) -> torch.Tensor:
        """Run n decode steps after a prefill; returns (B, n+1): the prefill's token, then one per step."""
        if n < 0:
            raise KvscopeError(f"number of decode steps must be >= 0, got {n}")
        self._check_room(n)
        b = self.cfg.batch_size
        with self.GRAD_MODE():
            out = torch.empty(b, n + 1, dtype=torch.int64, device=self.cfg.device)  # (B, n+1)
            out[:, 0] = self.next_tokens
            with self.ins.region(DECODE, "phase", phase=DECODE, tokens=b * n):
                for i in range(n):
                    out[:, i + 1] = self.decode_step()
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy generation of `max_new_tokens` per prompt; one host sync at the end (the `.tolist()`)."""
        if max_new_tokens < 1:
            raise KvscopeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if len(prompts) != self.cfg.batch_size:
            raise KvscopeError(f"engine was built for {self.cfg.batch_size} prompts, got {len(prompts)}")
        tokens, lengths = pad_prompts(prompts, self.vocab_size, self.cfg.device)
        self.prefill(tokens, lengths)
        return self.decode_n(max_new_tokens - 1).tolist()  # the one host sync
