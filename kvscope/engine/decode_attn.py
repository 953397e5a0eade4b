"""A decode step's attention over the KV cache: one strategy, chosen when the engine is built (as `rope_kv`'s).

- `SplitKVDecode` (`--attn kvscope`): kvscope's split-KV kernel (`kvscope.kernels.decode_attention.split_kv_decode`)
  with the keyword options of `EngineOptions.attention`; lengths on the device, fixed shapes.
- `FlashDecode` (`--attn sdpa` on CUDA in fp16/bf16, `flash_decode_ok`): flash attention's varlen kernel over the
  cache in place, lengths on the device, fixed shapes.
- `MaskedDecode` (otherwise: `sdpa`, `eager`): attention over the first L cache positions, L the longest sequence
  after this step (known on the host without a sync), with a key mask only for a ragged batch; a static step (for a
  CUDA-graph capture) attends over all `max_seq` positions with a mask.

A sliding window W (`ModelArgs.sliding_window`, read from the cache's args, fixed per engine) applies on every path:
each sequence attends its last W positions, the new one included (`[max(0, L - W), L)` for L valid keys): the kernel
takes `window`, flash its local-attention window, the masked path starts at the first position any sequence still
sees and masks the rest. The cache itself keeps every position (contiguous, `max_seq` long).

`meta(pos, static)` builds what every layer of one step shares (`DecodeMeta`, once per step, before the first layer;
`pos` (B,) the new tokens' positions on the device); `attend(i, q, meta)` is layer i's attention, q (B, H, D) ->
(B, H, D). Each strategy's buffers are made once, here.
"""

from __future__ import annotations

from typing import Any

import torch

from kvscope.engine.options import AttentionOptions
from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.model.attention import DecodeMeta, decode_attention, flash_decode_ok
from kvscope.model.kv_cache import KVCache


class DecodeAttention:
    """Layer i's attention of one decode step over `cache` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, cache: KVCache) -> None:
        self.cfg, self.cache = cfg, cache
        self.window = cache.args.sliding_window  # None: every position

    def meta(self, pos: torch.Tensor, static: bool) -> DecodeMeta:
        raise NotImplementedError

    def attend(self, i: int, q: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
        """q (B, H, D) -> (B, H, D); torch's attention by default (`cfg.attn`, or flash with `meta.seqused`)."""
        return decode_attention(q, self.cache.k(i), self.cache.v(i), meta, self.cfg.attn)  # (B, H, D)


class SplitKVDecode(DecodeAttention):
    """kvscope's split-KV kernel over each sequence's first `pos + 1` positions."""

    def __init__(self, cfg: RunConfig, cache: KVCache, options: dict[str, Any]) -> None:
        super().__init__(cfg, cache)
        self.options = options  # keyword options of split_kv_decode (EngineOptions.attention)

    def meta(self, pos: torch.Tensor, static: bool) -> DecodeMeta:
        return DecodeMeta(span=self.cache.max_seq, kv_lengths=pos + 1)

    def attend(self, i: int, q: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
        return k_decode_attention.split_kv_decode(q, self.cache.k(i), self.cache.v(i), meta.kv_lengths,
                                                  window=self.window, **self.options)  # (B, H, D)


class FlashDecode(DecodeAttention):
    """Flash attention's varlen kernel: the cache as B sequences of `max_seq` keys, `pos + 1` of them used."""

    def __init__(self, cfg: RunConfig, cache: KVCache) -> None:
        super().__init__(cfg, cache)
        b, dev = cfg.batch_size, cfg.device
        self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)  # (B+1,) one query per sequence
        self.cu_k = self.cu_q * cfg.max_seq  # (B+1,) each sequence's block of the token-major cache

    def meta(self, pos: torch.Tensor, static: bool) -> DecodeMeta:
        return DecodeMeta(span=self.cache.max_seq, seqused=(pos + 1).to(torch.int32), cu_q=self.cu_q, cu_k=self.cu_k,
                          window=self.window)


class MaskedDecode(DecodeAttention):
    """torch's SDPA or eager attention over the first L positions, masked where the batch is ragged."""

    def __init__(self, cfg: RunConfig, cache: KVCache) -> None:
        super().__init__(cfg, cache)
        self.key_pos = torch.arange(cfg.max_seq, device=cfg.device)  # (S_max,)

    def meta(self, pos: torch.Tensor, static: bool) -> DecodeMeta:
        cache, b, w = self.cache, self.cfg.batch_size, self.window
        host = cache.host_lengths
        span = cache.max_seq if static else max(host) + 1
        # with a window, positions before the shortest sequence's window are nobody's: not read (eager steps only)
        start = 0 if static or w is None else max(0, min(host) + 1 - w)
        key_mask = None
        if static or min(host) != max(host):
            keys = self.key_pos[start:span].unsqueeze(0)  # (1, L)
            seen = keys <= pos.unsqueeze(1)  # (B, L)
            if w is not None:
                seen &= keys > pos.unsqueeze(1) - w
            key_mask = seen.view(b, 1, 1, span - start)  # (B, 1, 1, L)
        return DecodeMeta(span=span, start=start, key_mask=key_mask)


def make_decode_attention(cfg: RunConfig, head_dim: int, cache: KVCache, options: AttentionOptions
                          ) -> DecodeAttention:
    """kvscope's kernel with `--attn kvscope`, flash where `flash_decode_ok`, the masked path otherwise. Options of
    the kernel with another attention: KvscopeError."""
    kwargs = options.kwargs()
    if cfg.attn == "kvscope":
        return SplitKVDecode(cfg, cache, kwargs)
    if kwargs:
        raise KvscopeError(f"attention options {kwargs} are options of kvscope's decode attention (--attn kvscope), "
                           f"got --attn {cfg.attn}")
    if flash_decode_ok(cfg.attn, cfg.device, cfg.dtype, head_dim):
        return FlashDecode(cfg, cache)
    return MaskedDecode(cfg, cache)
