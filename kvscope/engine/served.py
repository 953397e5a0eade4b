"""The served engine: one forward per scheduler iteration over a flat batch of tokens from many sequences, reading
and writing K/V through block tables of a `PagedKVCache` (continuous batching).

An iteration's batch (`IterationBatch`, built on the host by the scheduler) is T tokens in one row, `(1, T)`:
first the single-token rows (each a sequence's next token: decode steps, and any prefill work of one token), then
the prefill chunks, each a run of consecutive positions of one sequence. Every token has its position (RoPE) and
its slot (the pool row its K/V go to). The products and norms run over all T rows at once, with the strategy the
engine's `EngineOptions` pick for T rows (`layer_ops.OpsChoice.pick`, as the static engine's prefill); only the
attention differs by row:
- single-token rows: paged decode attention over each sequence's block table and length: kvscope's split-KV kernel
  with block tables on CUDA (`kernels.decode_attention.split_kv_decode(block_table=...)`), its torch reference
  (`paged_split_kv_decode_ref`, the blocks gathered) elsewhere;
- a chunk of n tokens from position p: causal attention of its n queries over keys 0 .. p + n - 1, torch SDPA; the
  chunk's own keys are used in place when p = 0, else the sequence's blocks are gathered from the pool.
Logits are computed only at the rows the scheduler samples (`sample_rows`), greedy.

Decode-only iterations replay CUDA graphs bucketed by batch size (`ServeGraphs`, CUDA with kernels): static buffers
of a bucket's B rows (tokens, positions, slots, lengths, block tables), padding rows writing nothing (slot -1) and
reading nothing (length 0). Inputs reach the device as one non-blocking copy from page-locked memory; the caller
reads the sampled tokens back once per iteration (the scheduler needs them), the one named sync of an iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kvscope.engine.layer_ops import LayerOps, choose_ops, run_layer
from kvscope.engine.options import EngineOptions
from kvscope.engine.regions import EngineRegions
from kvscope.errors import KvscopeError
from kvscope.kernels import common as k_common
from kvscope.kernels import decode_attention as k_attn
from kvscope.kernels import rope_kv as k_rope
from kvscope.model.dtypes import dtype_name
from kvscope.model.layers import Transformer, rope_tables
from kvscope.model.paged_kv_cache import PagedKVCache
from kvscope.profiler.instrument import Instrument
from kvscope.schema import SERVE_PHASE, iteration_name

# batch sizes of the decode-only CUDA graphs (a decode iteration of n sequences replays the smallest bucket >= n)
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class Chunk:
    """A run of `n` consecutive positions of one sequence, from `start`, at rows `row0 .. row0 + n - 1`."""

    row0: int
    n: int
    start: int
    table: list[int]


@dataclass
class IterationBatch:
    """What one iteration runs (host arrays). Rows 0 .. n_single - 1 are single-token rows (decode attention over
    `tables` and `lengths`), then `chunks`. `sample_rows`: the rows whose next token is sampled."""

    tokens: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slots: np.ndarray  # (T,) int64, pool rows
    n_single: int
    tables: np.ndarray  # (n_single, max_blocks) int32, padded with the scratch block
    chunks: list[Chunk] = field(default_factory=list)
    sample_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n_sample,)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def decode_only(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class ServeConfig:
    """The served engine's budget: the longest sequence (RoPE tables, block-table width), the largest batch of
    sequences in an iteration (graph buckets), the dtype and device."""

    max_seq: int
    max_seqs: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Feed:
    """Tokens of an iteration that come from the previous one's device output, not the host (one iteration ahead:
    the host has not read them yet): rows `rows` of the batch take `prev[idx]`."""

    rows: np.ndarray  # (k,) int64, rows of the batch (single-token rows)
    idx: np.ndarray  # (k,) int64, positions in `prev`
    prev: torch.Tensor  # (n_sample,) int64 on the device: the previous iteration's sampled tokens


class Readback:
    """An iteration's sampled tokens on their way to the host: on CUDA a non-blocking copy into page-locked memory
    and an event recorded after it, so that reading them waits for this iteration alone, not for one queued after it."""

    def __init__(self, out: torch.Tensor) -> None:
        self.device_tokens = out
        if out.device.type == "cuda":
            self.host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.host.copy_(out, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:  # a copy: `out` may be a replayed bucket's output buffer, which the next iteration overwrites
            self.host, self.event = out.clone(), None

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # named sync: this iteration's tokens (the next one may already run)
        return self.host.tolist()


class _Static:
    """The static inputs of one decode bucket of B rows (device) and its captured graph."""

    def __init__(self, b: int, max_blocks: int, device: torch.device) -> None:
        self.b = b
        self.ints = torch.zeros(4, b, dtype=torch.int64, device=device)  # tokens, positions, slots, lengths
        self.ints[2].fill_(-1)  # padding rows write nothing, read nothing (length 0)
        self.tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=device)  # (B, max_blocks)
        self.rows = torch.arange(b, device=device)  # (B,) the rows sampled: every row (kept: the graph reads it)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # (B,) sampled tokens, written by every replay


class ServedEngine:
    """One model over one `PagedKVCache`; `forward(batch, iteration)` runs an iteration and returns its sampled
    tokens (device, (n_sample,) int64)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, cfg: ServeConfig,
                 instrument: Instrument | None = None, options: EngineOptions | None = None) -> None:
        options = EngineOptions() if options is None else options
        args = model.args
        if cfg.max_seq > args.max_position_embeddings:
            raise KvscopeError(f"context of {cfg.max_seq} tokens exceeds {args.name}'s maximum of "
                               f"{args.max_position_embeddings}")
        if options.kernels and not k_common.supported(cfg.device, cfg.dtype):
            raise KvscopeError(f"kvscope's CUDA kernels need a CUDA device and {'/'.join(k_common.DTYPE_NAMES)}, "
                               f"got {cfg.device} {dtype_name(cfg.dtype)} (--kernels off)")
        if options.graphs and not options.kernels:
            raise KvscopeError("the served load's CUDA graphs need kvscope's kernels (--kernels on, or --graphs off)")
        if options.kernels and not k_attn.paged_block_size_ok(cache.block_size):
            raise KvscopeError(f"block size {cache.block_size} is not one the paged decode kernel serves "
                               f"({', '.join(map(str, k_attn.PAGED_BLOCK_SIZES))})")
        self.model, self.cache, self.cfg, self.args, self.options = model, cache, cfg, args, options
        self.ins = instrument if instrument is not None else Instrument("none", cfg.device, nvtx=False)
        self.regions = EngineRegions(args.n_layers, stamped=False)
        self.max_blocks = -(-cfg.max_seq // cache.block_size)
        self.cos, self.sin_rot = rope_tables(args, cfg.max_seq, cfg.device, cfg.dtype)  # (S_max, D) each
        self.ops = choose_ops(model, self.ins, options)
        self.window = args.sliding_window
        self._staging: list[torch.Tensor | None] = [None, None]  # page-locked inputs (CUDA), used in turn
        self._staged: list[torch.cuda.Event | None] = [None, None]  # recorded after each buffer's last copy
        self._turn = 0
        self.graphs: dict[int, _Static] = {}  # captured buckets (`capture_graphs`); empty: every iteration eager
        self.last_bucket = 0  # the bucket the last iteration replayed (0: eager)
        self.buckets = (*(b for b in GRAPH_BUCKETS if b < cfg.max_seqs), cfg.max_seqs)

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        """A host int64 array on the device: one non-blocking copy from page-locked memory on CUDA, through two
        staging buffers in turn (an iteration may be built while the previous one's copy is queued): a buffer is
        refilled only once the copy out of it, two uploads back, has run (its event; a named sync that in practice
        never waits)."""
        t = torch.from_numpy(np.ascontiguousarray(host, dtype=np.int64))
        if self.cfg.device.type != "cuda":
            return t
        n = t.numel()
        k = self._turn = 1 - self._turn
        stage, done = self._staging[k], self._staged[k]
        if stage is None or stage.numel() < n:
            stage = self._staging[k] = torch.empty(max(n, 4096), dtype=torch.int64, pin_memory=True)
        elif done is not None:
            done.synchronize()
        view = stage[:n]
        view.copy_(t.view(-1))
        dev = view.view(t.shape).to(self.cfg.device, non_blocking=True)
        if done is None:
            done = self._staged[k] = torch.cuda.Event()
        done.record()
        return dev

    def _inputs(self, batch: IterationBatch, feed: Feed | None) -> tuple[torch.Tensor, ...]:
        """tokens, positions, slots (T,), lengths (n_single,), tables (n_single, max_blocks) int32, sample rows;
        with a feed, its rows of `tokens` taken from the previous iteration's device output."""
        t, ns = batch.n_tokens, batch.n_single
        lengths = batch.positions[:ns] + 1
        k = 0 if feed is None else feed.rows.shape[0]
        parts = [batch.tokens, batch.positions, batch.slots, lengths, batch.sample_rows]
        if k:
            parts += [feed.rows, feed.idx]
        dev = self._to_device(np.concatenate([*parts, batch.tables.reshape(-1).astype(np.int64)]))
        o = np.cumsum([0, t, t, t, ns, batch.sample_rows.shape[0], k, k])
        tokens = dev[:o[1]]
        if k:
            tokens.index_copy_(0, dev[o[5]:o[6]], feed.prev.index_select(0, dev[o[6]:o[7]]))
        tables = dev[o[7]:].view(ns, self.max_blocks).to(torch.int32)  # (n_single, max_blocks)
        return tokens, dev[o[1]:o[2]], dev[o[2]:o[3]], dev[o[3]:o[4]], tables, dev[o[4]:o[5]]

    def check(self, batch: IterationBatch) -> None:
        """Shapes of a batch, on the host (cheap; the scheduler builds them)."""
        t, ns = batch.n_tokens, batch.n_single
        if t == 0 or batch.positions.shape != (t,) or batch.slots.shape != (t,):
            raise ValueError(f"served batch: tokens {batch.tokens.shape}, positions {batch.positions.shape}, slots "
                             f"{batch.slots.shape} must be equal non-empty (T,)")
        if batch.tables.shape != (ns, self.max_blocks):
            raise ValueError(f"served batch: tables {batch.tables.shape} must be ({ns}, {self.max_blocks})")
        if ns + sum(c.n for c in batch.chunks) != t:
            raise ValueError(f"served batch: {ns} single rows + chunks {[c.n for c in batch.chunks]} != {t} tokens")

    # ---- the forward ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: IterationBatch, iteration: int, feed: Feed | None = None) -> torch.Tensor:
        """Run one iteration inside its region `iter N`; returns the sampled tokens (n_sample,) on the device.
        `feed`: tokens taken from the previous iteration's device output (the host has not read them yet)."""
        self.check(batch)
        ctx = int(batch.positions.max()) + 1
        bucket = self._bucket(batch) if batch.decode_only and self.graphs else None
        self.last_bucket = bucket.b if bucket is not None else 0
        with self.ins.region(iteration_name(iteration), "step", phase=SERVE_PHASE, step=iteration,
                             tokens=batch.n_tokens, context_len=ctx):
            if bucket is not None:
                return self._replay(bucket, batch, feed)
            tokens, pos, slots, lengths, tables, rows = self._inputs(batch, feed)
            return self._forward(tokens, pos, slots, lengths, tables, batch.chunks, rows)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                 tables: torch.Tensor, chunks: list[Chunk], rows: torch.Tensor) -> torch.Tensor:
        """The device work of an iteration over T tokens; returns the greedy tokens at `rows` (n_sample,)."""
        t = tokens.shape[0]
        ops = self.ops.pick(t)
        with self.ins.region_with(*self.regions.decode_embed):
            h = ops.embed(tokens.view(1, t))  # (1, T, dim)

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            return self._attend(i, qkv, pos, slots, lengths, tables, chunks)

        for i in range(self.args.n_layers):
            run_layer(self.ins, self.regions, i, h, attend, ops)
        h_last = h[0].index_select(0, rows)  # (n_sample, dim)
        head: LayerOps = self.ops.pick(h_last.shape[0])
        with self.ins.region_with(*self.regions.lm_head):
            logits = head.logits(h_last)  # (n_sample, V)
        with self.ins.region_with(*self.regions.sample):
            return torch.argmax(logits, dim=-1)  # (n_sample,)

    def _attend(self, i: int, qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                tables: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """Layer i: qkv (1, T, H+2H_kv, D) -> RoPE, K/V into the pool at `slots`, attention (T, H*D)."""
        a, t = self.args, qkv.shape[1]
        k_pool, v_pool = self.cache.k(i), self.cache.v(i)  # (N, bs, H_kv, D) each
        rows = qkv.view(t, 1, a.n_heads + 2 * a.n_kv_heads, a.head_dim)  # (T, 1, H+2H_kv, D)
        with self.ins.region_with(*self.regions.ops[i]["rope"]):
            rope = k_rope.rope_kv_ if self.options.kernels else k_rope.rope_kv_ref_
            rope(rows, self.cos, self.sin_rot, k_pool, v_pool, a.n_heads, lengths=pos, slots=slots)
        q = rows[:, 0, :a.n_heads]  # (T, H, D), strided rows of qkv
        with self.ins.region_with(*self.regions.ops[i]["attn"]):
            out = torch.empty(t, a.n_heads, a.head_dim, dtype=qkv.dtype, device=qkv.device)  # (T, H, D)
            ns = lengths.shape[0]
            if ns:
                if self.options.kernels:
                    k_attn.split_kv_decode(q[:ns], k_pool, v_pool, lengths, out=out[:ns], block_table=tables,
                                           window=self.window)
                else:
                    out[:ns] = k_attn.paged_split_kv_decode_ref(q[:ns], k_pool, v_pool, tables, lengths,
                                                                window=self.window)
            for c in chunks:
                out[c.row0:c.row0 + c.n] = self._chunk_attention(rows[c.row0:c.row0 + c.n, 0], c, k_pool, v_pool)
            return out.view(t, a.q_size)  # (T, H*D)

    def _chunk_attention(self, x: torch.Tensor, c: Chunk, k_pool: torch.Tensor, v_pool: torch.Tensor
                         ) -> torch.Tensor:
        """Causal attention of a chunk's n queries (positions start .. start + n - 1) over its sequence's keys
        0 .. start + n - 1; x (n, H+2H_kv, D) after RoPE -> (n, H, D)."""
        a = self.args
        n, end = c.n, c.start + c.n
        q = x[:, :a.n_heads].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        if c.start == 0:
            k = x[:, a.n_heads:a.n_heads + a.n_kv_heads]  # (n, H_kv, D)
            v = x[:, a.n_heads + a.n_kv_heads:]  # (n, H_kv, D)
        else:
            blocks = torch.tensor(c.table[:-(-end // self.cache.block_size)], dtype=torch.int64, device=x.device)
            k = k_pool.index_select(0, blocks).flatten(0, 1)[:end]  # (end, H_kv, D)
            v = v_pool.index_select(0, blocks).flatten(0, 1)[:end]  # (end, H_kv, D)
        k = k.transpose(0, 1).unsqueeze(0)  # (1, H_kv, end, D)
        v = v.transpose(0, 1).unsqueeze(0)  # (1, H_kv, end, D)
        mask = self._chunk_mask(c.start, n, end, x.device)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (1, H, n, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (1, H, n, D)
        return y[0].transpose(0, 1)  # (n, H, D)

    def _chunk_mask(self, start: int, n: int, end: int, device: torch.device) -> torch.Tensor | None:
        """(n, end) bool: query start + i sees key j when j <= start + i (and start + i - j < window); None for a
        plain causal square (start 0, no window cutting into it)."""
        w = self.window
        if start == 0 and (w is None or w >= n):
            return None
        qpos = torch.arange(start, end, device=device).view(n, 1)  # (n, 1)
        kpos = torch.arange(end, device=device).view(1, end)  # (1, end)
        mask = kpos <= qpos
        if w is not None:
            mask &= kpos > qpos - w
        return mask  # (n, end)

    # ---- decode-only CUDA graphs ----------------------------------------------------------------------------
    def _bucket(self, batch: IterationBatch) -> _Static:
        """The captured bucket a decode-only batch replays: the smallest of at least its rows."""
        n = batch.n_single
        b = next((s for s in self.buckets if s >= n), None)
        if b is None or b not in self.graphs:
            raise KvscopeError(f"no captured decode graph holds {n} sequences (buckets {self.buckets})")
        return self.graphs[b]

    def capture_graphs(self) -> tuple[int, str]:
        """Capture the decode-only graph of every bucket (before the load; the instrument paused). Returns the bytes
        of the graphs' private memory pool and how they were counted: its segments in the allocator's snapshot
        (`graph_pool_bytes`), or, where the snapshot does not say, the allocator's reserved growth over the capture
        (which a cache filled by an earlier engine of the process hides)."""
        if not self.options.graphs:
            return 0, "no graphs"
        dev = self.cfg.device
        before = torch.cuda.memory_reserved(dev)
        pool = None
        for b in self.buckets:
            st = _Static(b, self.max_blocks, dev)
            fwd = self._captured_forward(st)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with self.ins.paused(), torch.inference_mode():
                with torch.cuda.stream(side):
                    fwd()  # warm-up: kernels loaded, workspaces made, outside the graph
                torch.cuda.current_stream(dev).wait_stream(side)
                st.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(st.graph, pool=pool):
                    st.out = fwd()
            pool = st.graph.pool()
            self.graphs[b] = st
        torch.cuda.synchronize(dev)  # named sync: capture done before the load starts
        counted = graph_pool_bytes(pool, dev)
        if counted is not None:
            return counted, "the pool's segments in the allocator snapshot"
        grown = torch.cuda.memory_reserved(dev) - before
        return grown, "reserved growth over the capture (no pool ids in the snapshot)"

    def _captured_forward(self, st: _Static):
        """The forward a bucket's graph captures. Every tensor it reads from outside the capture is an attribute of
        `st` (or of the engine), never a local: a graph keeps addresses, not tensors, so an input freed after the
        capture would be read from memory handed to something else."""
        def fwd() -> torch.Tensor:
            return self._forward(st.ints[0], st.ints[1], st.ints[2], st.ints[3], st.tables, [], st.rows)
        return fwd

    def _replay(self, st: _Static, batch: IterationBatch, feed: Feed | None) -> torch.Tensor:
        """Copy a decode batch into bucket `st`'s static inputs (padding: slot -1, length 0; fed rows from the
        previous iteration's device output) and replay. Returns the tokens of the batch's sample rows: every row's,
        or (a single-token row that samples nothing: one prompt token of a chunked prefill) those rows' alone."""
        n, b = batch.n_single, st.b
        ints = np.zeros((4, b), dtype=np.int64)
        ints[0, :n], ints[1, :n], ints[2, :n], ints[2, n:] = batch.tokens, batch.positions, batch.slots, -1
        ints[3, :n] = batch.positions + 1
        tables = np.zeros((b, self.max_blocks), dtype=np.int64)
        tables[:n] = batch.tables
        k = 0 if feed is None else feed.rows.shape[0]
        extra = [feed.rows, feed.idx] if k else []
        every_row = batch.sample_rows.shape[0] == n  # sample rows are increasing rows of the batch: then all of them
        rows = [] if every_row else [batch.sample_rows]
        dev = self._to_device(np.concatenate([ints.reshape(-1), *extra, *rows, tables.reshape(-1)]))
        st.ints.copy_(dev[:4 * b].view(4, b))
        if k:
            st.ints[0].index_copy_(0, dev[4 * b:4 * b + k], feed.prev.index_select(0, dev[4 * b + k:4 * b + 2 * k]))
        o = 4 * b + 2 * k + (0 if every_row else batch.sample_rows.shape[0])
        st.tables.copy_(dev[o:].view(b, self.max_blocks))
        st.graph.replay()
        return st.out[:n] if every_row else st.out.index_select(0, dev[4 * b + 2 * k:o])  # (n_sample,)


def graph_pool_bytes(pool: tuple[int, int] | None, device: torch.device) -> int | None:
    """The bytes of the allocator segments that belong to the CUDA-graph memory pool `pool` on `device` (0 for
    none), or None where the allocator's snapshot does not name each segment's pool."""
    if pool is None:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    segments = [s for s in torch.cuda.memory_snapshot() if s.get("device") == index]
    if any("segment_pool_id" not in s or "total_size" not in s for s in segments):
        return None
    return sum(int(s["total_size"]) for s in segments if tuple(s["segment_pool_id"]) == tuple(pool))
