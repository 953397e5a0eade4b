"""The hand-written prefill and decode loop over a `KVCache`.

- `prefill(tokens, lengths)`: a right-padded batch of prompts of different lengths; writes K/V for every prompt
  position and computes logits only at each sequence's last position.
- `decode_step()`: one token for every sequence, from the static `next_tokens` buffer, positions and lengths read
  on the device; greedy sampling on the device; no host sync and no Python-side tensor creation from host data, so a
  step can be captured in a CUDA graph.
- `decode_n(n)`: n steps, tokens gathered into one device tensor `(B, n)`.

What runs is fixed when the engine is built, by its `EngineOptions` (`kvscope.engine.options`, frozen: nothing
switches an engine's implementation afterwards; a benchmark that compares two choices builds two engines):
- `graphs=True` (CUDA): the first decode step captures one step in a CUDA graph; every step replays it
  (`kvscope.engine.graphs`). When the instrument times layers or ops, their regions are marks inside the graph
  (timestamps written by kernels with `kernels=True`, event-record nodes without), two graphs alternate, and each
  graph's marks are read (one named sync) just before its next replay, two steps later; NVTX then marks only each
  replay (kernels inside are attributed by nsys `--cuda-graph-trace=node`).
- `kernels=True` (CUDA): kvscope's hand-written kernels run RMSNorm, SiLU*up, and RoPE fused with the K/V cache
  write (`kvscope.kernels`); otherwise the same maths runs as torch operations. In a captured graph the RMSNorm
  kernel that opens each layer also writes the layer's start timestamp (see Instrument). With `gemv` as well (unset:
  `options.GEMV_BY_DEFAULT`, one device), the products of up to `gemv_max_rows` rows (`options.GEMV_ENGINE_MAX_ROWS`)
  run the gemv kernels with the launch choice `gemv_launch`: qkv (+bias) and gate/up (+SiLU*up) with the RMSNorm
  before them inside (up to `layer_ops.GEMV_NORM_MAX_ROWS` rows; the kernel then writes the timestamp), o_proj and
  down with the residual add in their epilogue, lm_head with the final norm inside.
- `attention`: the options of kvscope's split-KV decode kernel (`--attn kvscope`).

The options pick strategies, each chosen once: the norms and products (`kvscope.engine.layer_ops`: torch, kernels,
gemv with the norm fused or first, a tensor-parallel wrapper owning the all-reduces), by row count: B rows (decode
steps and every lm_head) picked at construction, B*S rows picked once per prefill for all its layers; RoPE and the
cache write (`kvscope.engine.rope_kv`); decode attention (`kvscope.engine.decode_attn`: kvscope's kernel, flash,
masked). `_layer` is the layer's maths between its instrument regions.

Every piece of work is opened through the engine's `Instrument`, with the names of `kvscope.schema`: phase
(`prefill`, `decode step N`), layer (`L07`, plus `embed`, `lm_head`, `sample`) and op (`L07.norm`, `.qkv`, `.rope`,
`.kv_write`, `.attn`, `.o_proj`, `.mlp`; `norm` is the input norm, `mlp` holds the post-attention norm, the MLP and
its residual add, `o_proj` the attention output projection and its residual add; with kernels on, `rope` includes the
cache write and there is no `kv_write`). The default instrument does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from operator import attrgetter

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvscope.engine.decode_attn import FlashDecode, make_decode_attention
from kvscope.engine.graphs import CapturedStep, DecodeGraphs
from kvscope.engine.greedy import GreedyLoop
from kvscope.engine.layer_ops import LayerOps, choose_ops, run_layer
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.engine.prefill_graphs import PrefillGraphs
from kvscope.engine.regions import DECODE, PREFILL, EngineRegions
from kvscope.engine.rope_kv import DecodeTables, PrefillTables, make_rope_kv
from kvscope.engine.tp import TensorParallel
from kvscope.errors import KvscopeError
from kvscope.kernels import common as k_common
from kvscope.model.attention import DecodeMeta, prefill_attention, prefill_mask
from kvscope.model.dtypes import dtype_name
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import Transformer, rope_tables
from kvscope.profiler.instrument import Instrument
from kvscope.schema import COLLECTIVE_OPS, OPS, step_name

# SDPA backends for decode steps. cuDNN's attention (torch's first choice on Hopper) builds a plan for every new key
# length, which an eager decode step over the growing cache meets at every step (see benchmarks/
# sdpa_decode_shapes.py); flash / memory-efficient / math kernels need no plan.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# attend(i, qkv): RoPE, cache write and attention of layer i, (B, S, H+2H_kv, D) -> (B*S, H*D)
Attend = Callable[[int, torch.Tensor], torch.Tensor]


class Engine(GreedyLoop):
    """One model, one KV cache, static decode buffers, and the strategies its `EngineOptions` pick."""

    def __init__(self, model: Transformer, cfg: RunConfig, instrument: Instrument | None = None,
                 options: EngineOptions | None = None, tp: TensorParallel | None = None) -> None:
        args = model.args  # with `tp`: one rank's numbers (heads, KV heads, MLP width, vocabulary divided)
        cfg.check(args)
        options = EngineOptions() if options is None else options
        if not isinstance(options, EngineOptions):
            raise ValueError(f"Engine: options must be an EngineOptions, got {options!r}")
        if options.graphs and cfg.device.type != "cuda":
            raise KvscopeError("CUDA graphs need a CUDA device (--graphs off on the CPU)")
        if options.kernels and not k_common.supported(cfg.device, cfg.dtype):
            raise KvscopeError(f"kvscope's CUDA kernels need a CUDA device and {'/'.join(k_common.DTYPE_NAMES)}, "
                               f"got {cfg.device} {dtype_name(cfg.dtype)} (--kernels off)")
        self._options = options
        self.model, self.cfg, self.args = model, cfg, args
        self.tp = tp  # tensor parallelism: this rank's collectives (kvscope.engine.tp), None on one device
        self.vocab_size = tp.vocab_size if tp is not None else args.vocab_size  # the full vocabulary
        self.ins = instrument if instrument is not None else Instrument("none", cfg.device, nvtx=False)
        self.regions = EngineRegions(args.n_layers, stamped=options.kernels)
        self.step = 0  # index of the token the next decode step produces (the prefill produces token 0)
        dev, dt, b = cfg.device, cfg.dtype, cfg.batch_size
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        self.cache = KVCache(args, b, cfg.max_seq, dt, dev)
        # measured size of the cache allocation: the allocator's growth on CUDA, the storage's size on the CPU
        self.kv_alloc_bytes = (torch.cuda.memory_allocated(dev) - before if dev.type == "cuda"
                               else self.cache.data.untyped_storage().nbytes())
        cos, sin_rot = rope_tables(args, cfg.max_seq, dev, dt)  # (S_max, D) each
        self.rope_kv = make_rope_kv(options.kernels, args, self.cache, cos, sin_rot, self.ins, self.regions)
        self.decode_attn = make_decode_attention(cfg, args.head_dim, self.cache, options.attention)
        self.flash_decode = isinstance(self.decode_attn, FlashDecode)
        # the norms and products by row count; B rows (decode steps, every lm_head) picked here, once
        self.ops = choose_ops(model, self.ins, options, tp)
        self.step_ops: LayerOps = self.ops.pick(b)
        self.batch_idx = torch.arange(b, device=dev)  # (B,)
        self.next_tokens = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,) static decode input
        self.decode_graphs = (DecodeGraphs(self.ins, dev, Instrument.graph_marks_bound(
            args.n_layers, len(OPS) + (len(COLLECTIVE_OPS) if tp is not None else 0)),
                                           stamps=options.kernels) if options.graphs else None)
        # prefills replayed from CUDA graphs per length bucket (not with tensor parallelism: eager there)
        self.prefill_graphs = (PrefillGraphs(self.ins, dev, b, cfg.max_seq)
                               if cfg.prefill_graphs and tp is None else None)
        self.logits: torch.Tensor | None = None  # (B, V) logits of the last prefill or decode step

    # read-only: what this engine runs, as it was built (the measuring layer reads graphs and kernels, as HfEngine's)
    options = property(attrgetter("_options"), doc="The EngineOptions the engine was built with (frozen).")
    graphs = property(attrgetter("_options.graphs"), doc="Decode steps replayed from a CUDA graph.")
    kernels = property(attrgetter("_options.kernels"), doc="kvscope's hand-written kernels.")

    # ---- shared pieces ------------------------------------------------------------------------------------
    def _head(self, h_last: torch.Tensor) -> None:
        """h_last: (B, dim) -> logits (B, V) in `self.logits`, greedy tokens into `next_tokens`."""
        with self.ins.region_with(*self.regions.lm_head):
            self.logits = self.step_ops.logits(h_last)  # (B, V): B rows, the decode step's strategy
        with self.ins.region_with(*self.regions.sample):
            self.next_tokens.copy_(torch.argmax(self.logits, dim=-1))

    def _layer(self, i: int, h: torch.Tensor, attend: Attend, ops: LayerOps) -> None:
        """One decoder layer over h (B, S, dim), in place (`layer_ops.run_layer`)."""
        run_layer(self.ins, self.regions, i, h, attend, ops)

    # ---- prefill ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """tokens: (B, S) int64, right-padded; lengths: host ints, one per sequence. Returns the first generated
        token of each sequence (B,), which also becomes the input of the next decode step."""
        b = self.cfg.batch_size
        if tokens.dim() != 2 or tokens.shape[0] != b or tokens.dtype != torch.int64:
            raise ValueError(f"prefill: tokens must be int64 (B={b}, S), got {tokens.dtype} {tuple(tokens.shape)}")
        s = tokens.shape[1]
        if len(lengths) != b or min(lengths) < 1 or max(lengths) > s:
            raise ValueError(f"prefill: lengths {list(lengths)} must be {b} values in [1, {s}]")
        self.cache.start(lengths)  # checks the cache can hold every prompt
        self.step = 1
        graphs = self.prefill_graphs
        # a bucket's first prefill captures its graph here, outside the timed region
        captured = graphs.ready(s, self._prefill_forward) if graphs is not None and graphs.usable(s) else None
        attend = None if captured is not None else self._prefill_attend_for(b, s)
        with self.ins.region(PREFILL, "phase", phase=PREFILL, step=0, tokens=sum(lengths), context_len=max(lengths)):
            if captured is not None:
                self.logits = graphs.replay(captured, tokens)  # the tokens copied in, one graph launch
            else:
                self._prefill_forward(tokens, attend)
        return self.next_tokens

    def _prefill_forward(self, tokens: torch.Tensor, attend: Attend | None = None) -> torch.Tensor:
        """The device work of a prefill over tokens (B, S): embedding, layers (K/V into the cache), logits at each
        sequence's last prompt position (the cache's device lengths - 1) and the greedy token into `next_tokens`;
        returns the logits (B, V). `attend`: the layers' attention with its RoPE tables (made here when None, as
        for a CUDA-graph capture). No host sync and no tensor made from host data."""
        if attend is None:
            attend = self._prefill_attend_for(*tokens.shape)  # for all layers
        ops = self.ops.pick(tokens.numel())  # B*S rows: one strategy for every layer of this prefill
        with self.ins.region_with(*self.regions.prefill_embed):
            h = ops.embed(tokens)  # (B, S, dim)
        for i in range(self.args.n_layers):
            self._layer(i, h, attend, ops)
        h_last = h[self.batch_idx, self.cache.lengths - 1]  # (B, dim): each sequence's last prompt position
        self._head(h_last)
        return self.logits

    def _prefill_attend_for(self, b: int, s: int) -> Attend:
        """The attention of every layer of a prefill of (B, S) tokens, with what they share made once: the RoPE
        tables and, under a sliding window shorter than S, its (S, S) mask."""
        mask = prefill_mask(s, self.args.sliding_window, self.cfg.device)
        return partial(self._prefill_attend, self.rope_kv.prefill_tables(b, s), mask)

    def _prefill_attend(self, t: PrefillTables, mask: torch.Tensor | None, i: int, qkv: torch.Tensor
                        ) -> torch.Tensor:
        """Layer i of a prefill: qkv (B, S, H+2H_kv, D) -> RoPE, K/V into the cache, causal attention (B*S, H*D),
        within the sliding window's `mask` when there is one."""
        b, s = qkv.shape[:2]
        q, k, v = self.rope_kv.prefill(i, qkv, t)  # (B, S, H|H_kv, D)
        with self.ins.region_with(*self.regions.ops[i]["attn"]):
            y = prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|H_kv, S, D)
                                  self.cfg.attn, mask)  # (B, H, S, D)
            return y.transpose(1, 2).reshape(b * s, self.args.q_size)  # (B*S, H*D)

    # ---- decode -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every sequence by one token. Input: `tokens` (B,) or the static `next_tokens` buffer (the last
        step's output). Returns `next_tokens`, overwritten in place by the greedy choice."""
        if tokens is not None:
            if tokens.shape != self.next_tokens.shape or tokens.dtype != torch.int64:
                raise ValueError(f"decode_step: tokens must be int64 {tuple(self.next_tokens.shape)}, "
                                 f"got {tokens.dtype} {tuple(tokens.shape)}")
            self.next_tokens.copy_(tokens)
        self.cache.check_room(1)
        step = self.step
        captured = self._next_captured()  # with marks: reads those of two steps back (a named sync inside)
        with self.ins.region(step_name(step), "step", phase=DECODE, step=step, tokens=self.cfg.batch_size,
                             context_len=max(self.cache.host_lengths) + 1):
            if captured is not None:
                self.logits = self.decode_graphs.replay(captured)  # the device lengths advance inside the graph
                self.cache.advance(device=False)
            else:
                self.decode_forward()
                self.cache.advance()
        self.step = step + 1
        return self.next_tokens

    def _next_captured(self) -> CapturedStep | None:
        """With graphs on, the captured step to replay next (the first call captures); else None."""
        graphs = self.decode_graphs
        if graphs is None:
            return None
        if not graphs.captured:
            graphs.capture(partial(self.decode_forward, static=True), self.next_tokens, self.cache.lengths)
        return graphs.next_step()

    def decode_forward(self, static: bool = False) -> torch.Tensor:
        """The device work of one step: reads next_tokens and cache.lengths, writes K/V and next_tokens; returns the
        logits buffer (B, V). No host-side state changes (the caller advances the cache).

        `static=False` (eager): attention reads only the first L cache positions, L = the longest sequence after
        this step, known on the host without a sync; a key mask is built only for a ragged batch.
        `static=True` (for CUDA-graph capture): fixed shapes, attention over all `max_seq` positions with a mask.
        """
        b, ops = self.cfg.batch_size, self.step_ops
        pos = self.cache.lengths  # (B,) position of the new token
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            tables = self.rope_kv.decode_tables(pos)  # once per step, for all layers
            attend = partial(self._decode_attend, tables, self.decode_attn.meta(pos, static))
            with self.ins.region_with(*self.regions.decode_embed):
                h = ops.embed(self.next_tokens.view(b, 1))  # (B, 1, dim)
            for i in range(self.args.n_layers):
                self._layer(i, h, attend, ops)
            self._head(h[:, 0])  # (B, dim)
        return self.logits

    def _decode_attend(self, t: DecodeTables, meta: DecodeMeta, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Layer i of a decode step: qkv (B, 1, H+2H_kv, D) -> RoPE, K/V into the cache, attention over the cache
        (B, H*D)."""
        q = self.rope_kv.decode(i, qkv, t)  # (B, H, D)
        with self.ins.region_with(*self.regions.ops[i]["attn"]):
            y = self.decode_attn.attend(i, q, meta)  # (B, H, D)
            return y.view(q.shape[0], self.args.q_size)  # (B, H*D)

    def _check_room(self, n: int) -> None:
        self.cache.check_room(n)
