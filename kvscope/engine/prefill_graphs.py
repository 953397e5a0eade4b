"""Prefills replayed from CUDA graphs, one per length bucket, so that a prompt of a few thousand tokens costs one
graph launch on the host instead of hundreds of kernel launches (`--prefill-graphs on|off`; by default on for CUDA
when decode graphs are on).

A prompt batch of padded length S runs in the graph of the smallest bucket >= S (powers of two from 16 to 4,096 by
default, each capped at the cache's length); longer prompts run eagerly. The graph reads a static token buffer
(B, bucket): the prompts are copied into it and the rest is zero-filled. Nothing in the graph depends on the real
lengths on the host: they are the cache's device lengths (`KVCache.start`), read where the logits are gathered
(each sequence's last real position). Attention is causal, so padding after a prompt never reaches its real
positions; the K/V the padding writes at positions >= lengths[b] are never read either: a decode step writes its
token's K/V at lengths[b] before attending, and attends over positions <= lengths[b] only (`seqused_k` of the
flash path, the key mask of the masked path).

A bucket's graph is captured on its first use, before the prefill's timed region opens (a warm-up run on a side
stream, then the capture, with the instrument paused); all buckets share one memory pool (graphs run one at a time).
The prefill region's events and NVTX range then sit around the token copy and the replay. Graphs are used only when
no region finer than the phase is timed: layer and op regions of a prefill are measured eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvscope.errors import KvscopeError
from kvscope.profiler.instrument import Instrument

DEFAULT_BUCKETS = tuple(2 ** i for i in range(4, 13))  # 16 .. 4,096 tokens
# forward(tokens): the prefill's device work over a static (B, bucket) int64 token buffer; returns the logits (B, V)
Forward = Callable[[torch.Tensor], torch.Tensor]


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Bucket lengths sorted and unique; KvscopeError for an empty list or a length that is not a positive int."""
    if not buckets:
        raise KvscopeError("prefill graph buckets: at least one length is needed")
    for n in buckets:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise KvscopeError(f"prefill graph buckets must be positive integers, got {n!r}")
    return tuple(sorted(set(buckets)))


def bucket_for(s: int, buckets: Sequence[int], max_seq: int) -> int | None:
    """The padded length a prefill of `s` tokens runs at: the smallest bucket >= s, capped at `max_seq` (the cache
    holds no more positions); None when `s` exceeds every bucket (the prefill runs eagerly)."""
    i = bisect.bisect_left(buckets, s)
    if i == len(buckets):
        return None
    return min(buckets[i], max_seq)


@dataclass
class PrefillGraph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # (B, bucket) int64, the graph's input
    logits: torch.Tensor  # (B, V), written by every replay


class PrefillGraphs:
    """The captured prefills of one engine, by bucket length."""

    def __init__(self, ins: Instrument, device: torch.device, batch: int, max_seq: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> None:
        if device.type != "cuda":
            raise KvscopeError("prefill graphs need a CUDA device (--prefill-graphs off on the CPU)")
        self.ins, self.device, self.batch, self.max_seq = ins, device, batch, max_seq
        self.buckets = check_buckets(buckets)
        self.graphs: dict[int, PrefillGraph] = {}
        self._pool: tuple[int, int] | None = None

    def usable(self, s: int) -> bool:
        """Whether a prefill of padded length `s` replays a graph: a bucket holds it and the instrument times no
        region inside the prefill (layer or op granularity measure the prefill eagerly)."""
        return bucket_for(s, self.buckets, self.max_seq) is not None and not self.ins.graph_timed()

    def ready(self, s: int, forward: Forward) -> PrefillGraph:
        """The graph of the bucket of `s` tokens, captured now if this is the bucket's first use (call it outside
        any timed region). Call only where `usable(s)`."""
        bucket = bucket_for(s, self.buckets, self.max_seq)
        if bucket is None:
            raise ValueError(f"prefill of {s} tokens: no bucket holds it (largest {self.buckets[-1]})")
        g = self.graphs.get(bucket)
        if g is None:
            g = self.graphs[bucket] = self._capture(bucket, forward)
        return g

    def _capture(self, bucket: int, forward: Forward) -> PrefillGraph:
        """Warm up once on a side stream (library handles, workspaces, kernel loading), then capture `forward` over
        a zeroed (B, bucket) token buffer, the instrument paused throughout."""
        tokens = torch.zeros(self.batch, bucket, dtype=torch.int64, device=self.device)  # (B, bucket)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with self.ins.paused(), torch.cuda.stream(side):
            forward(tokens)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self.ins.paused(), torch.cuda.graph(graph, pool=self._pool):
            logits = forward(tokens)  # (B, V), this graph's own buffer
        self._pool = graph.pool()
        return PrefillGraph(graph, tokens, logits)

    @staticmethod
    def replay(g: PrefillGraph, tokens: torch.Tensor) -> torch.Tensor:
        """Copy `tokens` (B, S <= bucket) into the graph's input, zero the padding, replay; returns the logits
        buffer (B, V). Device work only, on the current stream: no host sync."""
        s = tokens.shape[1]
        g.tokens[:, :s].copy_(tokens)
        if s < g.tokens.shape[1]:
            g.tokens[:, s:].zero_()
        g.graph.replay()
        return g.logits
