"""RoPE and the K/V-cache write of a decoder layer: one strategy, chosen when the engine is built.

- `TorchRopeKV` (`--kernels off`): rotate-half RoPE as torch operations over the fused projection, then a cache
  write (regions `rope`, then `kv_write`).
- `FusedRopeKV` (`--kernels on`): kvscope's `rope_kv` kernel rotates q and k in place and writes K and V into the
  cache in one launch (region `rope` only, no `kv_write`).

Both share one interface, in a prefill and a decode variant: `prefill_tables(b, s)` / `decode_tables(pos)` build
what every layer of one prefill or decode step shares (once per call, before the layers run), and
`prefill(i, qkv, t)` / `decode(i, qkv, t)` run layer i's RoPE and cache write inside their regions and return the
attention's inputs. Decode tables hold device tensors only (positions are the cache's lengths, read on the device),
so a decode step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvscope.engine.regions import EngineRegions
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.model.config import ModelArgs
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import apply_rope
from kvscope.profiler.instrument import Instrument

# largest RoPE table (bytes, each of cos and sin) a prefill materialises at the projection's shape
PREFILL_ROPE_TABLE_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PrefillTables:
    """What every layer's RoPE of one prefill shares (torch path; the kernel reads the engine's tables itself).

    cos, sin: (1, S, 1, D) broadcast views of the tables, or (B, S, H+2H_kv, D) materialised at the projection's
    shape with cos 1 and sin 0 on the V heads (`v_through`: the rotated projection then holds K and V side by side
    for one cache write)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    v_through: bool = False


@dataclass(frozen=True)
class DecodeTables:
    """What every layer's RoPE and cache write of one decode step shares.

    pos: (B,) the position of each sequence's new token (the cache's lengths, on the device). Torch path: cos, sin
    (B, 1, H+2H_kv, D) for all heads of the fused projection (V heads: cos 1, sin 0) and write_idx
    (2, B, 1, H_kv, D), the scatter index of K and V at each sequence's position."""

    pos: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    write_idx: torch.Tensor | None = None


class RopeKV(ABC):
    """RoPE on the query and key heads of layer i's fused projection `qkv` (B, S, H+2H_kv, D, contiguous) and K/V
    into `cache` at each sequence's positions, inside the layer's `rope` (and `kv_write`) regions."""

    def __init__(self, args: ModelArgs, cache: KVCache, cos: torch.Tensor, sin_rot: torch.Tensor, ins: Instrument,
                 regions: EngineRegions) -> None:
        self.cache = cache
        self.cos, self.sin_rot = cos, sin_rot  # (S_max, D) each, see kvscope.model.layers.rope_tables
        self.ins = ins
        self.regions = regions
        self.hq, self.hkv, self.d = args.n_heads, args.n_kv_heads, args.head_dim

    @abstractmethod
    def prefill_tables(self, b: int, s: int) -> PrefillTables:
        """Built once per prefill of B prompts padded to S tokens, before its region opens."""

    @abstractmethod
    def prefill(self, i: int, qkv: torch.Tensor, t: PrefillTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions 0..S-1 -> q, k, v (B, S, H|H_kv, D): rotated q and k, the values; K and V are in the cache."""

    @abstractmethod
    def decode_tables(self, pos: torch.Tensor) -> DecodeTables:
        """Built once per decode step, before its first layer; `pos` (B,) on the device."""

    @abstractmethod
    def decode(self, i: int, qkv: torch.Tensor, t: DecodeTables) -> torch.Tensor:
        """One token per sequence (S = 1) at `t.pos` -> rotated q (B, H, D); K and V are in the cache."""


class TorchRopeKV(RopeKV):
    """Torch operations: RoPE over all heads of the contiguous projection (torch vectorises its elementwise kernels
    only over operands of one contiguous shape; a q/k slice would be strided), then the cache write."""

    def __init__(self, args: ModelArgs, cache: KVCache, cos: torch.Tensor, sin_rot: torch.Tensor, ins: Instrument,
                 regions: EngineRegions) -> None:
        super().__init__(args, cache, cos, sin_rot, ins, regions)
        dt, dev = cos.dtype, cos.device
        # V heads go through the decode step's RoPE with cos 1 and sin 0, i.e. unchanged
        self._v_cos = torch.ones(1, 1, self.hkv, self.d, dtype=dt, device=dev)  # (1, 1, H_kv, D)
        self._v_sin = torch.zeros(1, 1, self.hkv, self.d, dtype=dt, device=dev)  # (1, 1, H_kv, D)

    def prefill_tables(self, b: int, s: int) -> PrefillTables:
        hq, hkv = self.hq, self.hkv
        cos = self.cos[:s].view(1, s, 1, -1)  # (1, S, 1, D)
        sin = self.sin_rot[:s].view(1, s, 1, -1)  # (1, S, 1, D)
        full = (b, s, hq + 2 * hkv, self.d)
        if math.prod(full) * cos.element_size() > PREFILL_ROPE_TABLE_MAX_BYTES:
            return PrefillTables(cos, sin, v_through=False)
        # tables at the projection's own shape, made once per prefill for all layers (vectorised kernels); V heads
        # get cos 1 and sin 0, so the rotated projection holds K and V side by side for one cache write
        cos, sin = cos.expand(full).contiguous(), sin.expand(full).contiguous()  # (B, S, H+2H_kv, D)
        cos[:, :, hq + hkv:] = 1
        sin[:, :, hq + hkv:] = 0
        return PrefillTables(cos, sin, v_through=True)

    def prefill(self, i: int, qkv: torch.Tensor, t: PrefillTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, hkv, cache, ops = self.hq, self.hkv, self.cache, self.regions.ops[i]
        b, s = qkv.shape[:2]
        with self.ins.region_with(*ops["rope"]):
            # V heads pass unchanged with the materialised tables, and are not used otherwise
            r = apply_rope(qkv, t.cos, t.sin)  # (B, S, H+2H_kv, D)
        q, k, v = r[:, :, :hq], r[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]  # (B, S, H|H_kv, D)
        with self.ins.region_with(*ops["kv_write"]):
            if t.v_through:
                kv = r[:, :, hq:].view(b, s, 2, hkv, -1).permute(2, 0, 1, 3, 4)  # (2, B, S, H_kv, D)
                cache.kv(i)[:, :, :s].copy_(kv)
            else:
                cache.k(i)[:, :s].copy_(k)  # (B, S, H_kv, D)
                cache.v(i)[:, :s].copy_(v)
        return q, k, v

    def decode_tables(self, pos: torch.Tensor) -> DecodeTables:
        b, hq, hkv, d = pos.shape[0], self.hq, self.hkv, self.d
        # RoPE tables of this step for all H + 2*H_kv heads of the fused projection (V heads: cos 1, sin 0)
        cos = torch.cat((self.cos[pos].view(b, 1, 1, d).expand(b, 1, hq + hkv, d),
                         self._v_cos.expand(b, 1, hkv, d)), dim=2)  # (B, 1, H+2H_kv, D)
        sin = torch.cat((self.sin_rot[pos].view(b, 1, 1, d).expand(b, 1, hq + hkv, d),
                         self._v_sin.expand(b, 1, hkv, d)), dim=2)  # (B, 1, H+2H_kv, D)
        write_idx = pos.view(1, b, 1, 1, 1).expand(2, b, 1, hkv, d)  # (2, B, 1, H_kv, D)
        return DecodeTables(pos, cos, sin, write_idx)

    def decode(self, i: int, qkv: torch.Tensor, t: DecodeTables) -> torch.Tensor:
        hq, hkv, d, ops = self.hq, self.hkv, self.d, self.regions.ops[i]
        b = qkv.shape[0]
        with self.ins.region_with(*ops["rope"]):
            r = apply_rope(qkv, t.cos, t.sin)  # (B, 1, H+2H_kv, D): rotated q and k, v unchanged
        with self.ins.region_with(*ops["kv_write"]):
            new_kv = r[:, :, hq:].view(b, 1, 2, hkv, d).permute(2, 0, 1, 3, 4)  # (2, B, 1, H_kv, D)
            self.cache.kv(i).scatter_(2, t.write_idx, new_kv)  # K and V at each sequence's position, one kernel
        return r[:, 0, :hq]  # (B, H, D)


class FusedRopeKV(RopeKV):
    """kvscope's `rope_kv` kernel: q and k rotated in place, K and V written into the cache, one launch per layer;
    it reads the full (S_max, D) tables itself, so no per-call tables are built."""

    def prefill_tables(self, b: int, s: int) -> PrefillTables:
        return PrefillTables()

    def prefill(self, i: int, qkv: torch.Tensor, t: PrefillTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, hkv, cache = self.hq, self.hkv, self.cache
        with self.ins.region_with(*self.regions.ops[i]["rope"]):  # RoPE on q and k in place, K and V into the cache
            k_rope_kv.rope_kv_(qkv, self.cos, self.sin_rot, cache.k(i), cache.v(i), hq)
        return qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]  # (B, S, H|H_kv, D)

    def decode_tables(self, pos: torch.Tensor) -> DecodeTables:
        return DecodeTables(pos)

    def decode(self, i: int, qkv: torch.Tensor, t: DecodeTables) -> torch.Tensor:
        cache = self.cache
        with self.ins.region_with(*self.regions.ops[i]["rope"]):  # RoPE on q and k in place, K/V at each position
            k_rope_kv.rope_kv_(qkv, self.cos, self.sin_rot, cache.k(i), cache.v(i), self.hq, lengths=t.pos)
        return qkv[:, 0, :self.hq]  # (B, H, D)


def make_rope_kv(kernels: bool, args: ModelArgs, cache: KVCache, cos: torch.Tensor, sin_rot: torch.Tensor,
                 ins: Instrument, regions: EngineRegions) -> RopeKV:
    """The fused kernel with kernels on, torch operations otherwise."""
    cls = FusedRopeKV if kernels else TorchRopeKV
    return cls(args, cache, cos, sin_rot, ins, regions)
