"""The hand-written prefill and decode loop over a `KVCache`.

- `prefill(tokens, lengths)`: a right-padded batch of prompts of different lengths; writes K/V for every prompt
  position and computes logits only at each sequence's last position.
- `decode_step()`: one token for every sequence, from the static `next_tokens` buffer, positions and lengths read
  on the device; greedy sampling on the device; no host sync and no Python-side tensor creation from host data, so a
  step can be captured in a CUDA graph.
- `decode_n(n)`: n steps, tokens gathered into one device tensor `(B, n)`.
- `graphs=True` (CUDA): the first decode step captures one step in a CUDA graph; every step replays it
  (`kvscope.engine.graphs`). When the instrument times layers or ops, their regions are marks inside the graph
  (timestamps written by kernels with `kernels=True`, event-record nodes without), two graphs alternate, and each
  graph's marks are read (one named sync) just before its next replay, two steps later; NVTX then marks only each
  replay (kernels inside are attributed by nsys `--cuda-graph-trace=node`).
- `kernels=True` (CUDA): kvscope's hand-written kernels run RMSNorm, SiLU*up, and RoPE fused with the K/V cache
  write (`kvscope.kernels.ops`); otherwise the same maths runs as torch operations. The RoPE + cache-write strategy
  is chosen once, at construction (`kvscope.engine.rope_kv`). In a captured graph the RMSNorm kernel that opens each
  layer also writes the layer's start timestamp (see Instrument). With `Engine.gemv` as well (GEMV_BY_DEFAULT), the
  products of up to GEMV_ENGINE_MAX_ROWS rows run the gemv kernels: qkv (+bias) and gate/up (+SiLU*up) with the RMSNorm
  before them inside (up to GEMV_NORM_MAX_ROWS rows; the kernel then writes the timestamp), o_proj and down with the
  residual add in their epilogue, lm_head with the final norm inside.

Every piece of work is opened through the engine's `Instrument`, with the names of `kvscope.schema`: phase
(`prefill`, `decode step N`), layer (`L07`, plus `embed`, `lm_head`, `sample`) and op (`L07.norm`, `.qkv`, `.rope`,
`.kv_write`, `.attn`, `.o_proj`, `.mlp`; `norm` is the input norm, `mlp` holds the post-attention norm, the MLP and
its residual add, `o_proj` the attention output projection and its residual add; with kernels on, `rope` includes the
cache write and there is no `kv_write`). The default instrument does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvscope.engine.graphs import CapturedStep, DecodeGraphs
from kvscope.engine.greedy import GreedyLoop
from kvscope.engine.plan import RunConfig
from kvscope.engine.prefill_graphs import PrefillGraphs
from kvscope.engine.regions import DECODE, PREFILL, EngineRegions
from kvscope.engine.rope_kv import DecodeTables, PrefillTables, make_rope_kv
from kvscope.engine.tp import TensorParallel
from kvscope.errors import KvscopeError
from kvscope.kernels import ops as kops
from kvscope.model.attention import DecodeMeta, decode_attention, flash_decode_ok, prefill_attention
from kvscope.model.dtypes import dtype_name
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import Transformer, linear_residual_, rope_tables
from kvscope.profiler.instrument import Instrument
from kvscope.schema import COLLECTIVE_OPS, OPS, step_name

# SDPA backends for decode steps. cuDNN's attention (torch's first choice on Hopper) builds a plan for every new key
# length, which an eager decode step over the growing cache meets at every step (see benchmarks/
# sdpa_decode_shapes.py); flash / memory-efficient / math kernels need no plan.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# attend(i, qkv): RoPE, cache write and attention of layer i, (B, S, H+2H_kv, D) -> (B*S, H*D)
Attend = Callable[[int, torch.Tensor], torch.Tensor]
# rows up to which the gemv kernels normalise their input themselves (RMSNorm fused into the product): each warp
# normalises the x vectors it reads, work that grows with the rows (benchmarks/kernels.py measures both ways)
GEMV_NORM_MAX_ROWS = 4
# rows up to which the engine runs the gemv kernels at all (CUDA cores; beyond, cuBLAS's tensor cores are faster:
# docs/benchmarks.md, "Decode-step products")
GEMV_ENGINE_MAX_ROWS = 4
# whether an engine with kernels on starts with gemv on: off until a gemv step measures faster than cuBLAS's (on the
# H200, qwen2.5-3b batch 1 ctx 512: 2.879 ms with gemv against 2.872 ms without, docs/benchmarks.md); `Engine.gemv`
# switches it per engine before the first decode step
GEMV_BY_DEFAULT = False


class Engine(GreedyLoop):
    """One model, one KV cache, static decode buffers, and the attention switch of the run config."""

    def __init__(self, model: Transformer, cfg: RunConfig, instrument: Instrument | None = None,
                 graphs: bool = False, kernels: bool = False, tp: TensorParallel | None = None) -> None:
        args = model.args  # with `tp`: one rank's numbers (heads, KV heads, MLP width, vocabulary divided)
        cfg.check(args)
        if graphs and cfg.device.type != "cuda":
            raise KvscopeError("CUDA graphs need a CUDA device (--graphs off on the CPU)")
        if kernels and not kops.supported(cfg.device, cfg.dtype):
            raise KvscopeError(f"kvscope's CUDA kernels need a CUDA device and {'/'.join(kops.DTYPE_NAMES)}, "
                               f"got {cfg.device} {dtype_name(cfg.dtype)} (--kernels off)")
        self.model, self.cfg, self.args = model, cfg, args
        self.graphs = graphs
        self.tp = tp  # tensor parallelism: this rank's collectives (kvscope.engine.tp), None on one device
        self.vocab_size = tp.vocab_size if tp is not None else args.vocab_size  # the full vocabulary
        # hand-written kernels: RMSNorm (which also writes in-graph timestamps), SiLU*up, RoPE fused with the cache
        # write; off: the same maths as torch operations
        self.kernels = kernels
        # with kernels on: products of at most GEMV_ENGINE_MAX_ROWS rows (decode steps) run kvscope's gemv kernels,
        # with the RMSNorm before them fused in up to GEMV_NORM_MAX_ROWS rows; False: cuBLAS (tests compare the two)
        self.gemv = kernels and GEMV_BY_DEFAULT
        self.gemv_max_rows = GEMV_ENGINE_MAX_ROWS  # rows up to which products run the gemv kernels (with `gemv`)
        # launch choice of the gemv kernels (`pipelined`, `split_blocks_per_sm` of kops.gemv); empty: its defaults.
        # Set before the first decode step (a captured graph keeps the choice); benchmarks compare them
        self.gemv_options: dict[str, Any] = {}
        # with --attn kvscope: keyword options of kops.decode_attention (`fused_merge`, `long_splits`); empty: its
        # defaults. Set before the first decode step (a captured graph keeps the choice); benchmarks compare them
        self.attn_options: dict[str, bool] = {}
        self.ins = instrument if instrument is not None else Instrument("none", cfg.device, nvtx=False)
        self.regions = EngineRegions(args.n_layers, stamped=kernels)
        self.step = 0  # index of the token the next decode step produces (the prefill produces token 0)
        dev, dt = cfg.device, cfg.dtype
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        self.cache = KVCache(args, cfg.batch_size, cfg.max_seq, dt, dev)
        # measured size of the cache allocation: the allocator's growth on CUDA, the storage's size on the CPU
        self.kv_alloc_bytes = (torch.cuda.memory_allocated(dev) - before if dev.type == "cuda"
                               else self.cache.data.untyped_storage().nbytes())
        cos, sin_rot = rope_tables(args, cfg.max_seq, dev, dt)  # (S_max, D) each
        self.rope_kv = make_rope_kv(kernels, args, self.cache, cos, sin_rot, self.ins, self.regions)
        self._decode_buffers()
        self.decode_graphs = (DecodeGraphs(self.ins, dev, Instrument.graph_marks_bound(
            args.n_layers, len(OPS) + (len(COLLECTIVE_OPS) if tp is not None else 0)),
                                           stamps=kernels) if graphs else None)
        # prefills replayed from CUDA graphs per length bucket (not with tensor parallelism: eager there)
        self.prefill_graphs = (PrefillGraphs(self.ins, dev, cfg.batch_size, cfg.max_seq)
                               if cfg.prefill_graphs and tp is None else None)
        self.logits: torch.Tensor | None = None  # (B, V) logits of the last prefill or decode step

    def _decode_buffers(self) -> None:
        """Static device buffers of decode steps: the input tokens and what attention reads besides the cache."""
        cfg, dev, b = self.cfg, self.cfg.device, self.cfg.batch_size
        self.key_pos = torch.arange(cfg.max_seq, device=dev)  # (S_max,)
        self.batch_idx = torch.arange(b, device=dev)  # (B,)
        self.flash_decode = flash_decode_ok(cfg.attn, dev, cfg.dtype, self.args.head_dim)
        self._cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)  # (B+1,) one query per sequence
        self._cu_k = self._cu_q * cfg.max_seq  # (B+1,) each sequence's block of the token-major cache
        self.next_tokens = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,) static decode input

    # ---- shared pieces ------------------------------------------------------------------------------------
    def _head(self, h_last: torch.Tensor) -> None:
        """h_last: (B, dim) -> logits (B, V) in `self.logits`, greedy tokens into `next_tokens`."""
        m, ins, regions = self.model, self.ins, self.regions
        with ins.region_with(*regions.lm_head):
            if self._gemv_on(h_last):
                self.logits = self._proj(m.output, h_last, m.norm)  # (B, V)
            else:
                self.logits = m.output(self._norm(m.norm, h_last))  # (B, V), with tp (B, V/tp)
            if self.tp is not None:
                self.logits = self.tp.gather_logits(self.logits)  # (B, V)
        with ins.region_with(*regions.sample):
            self.next_tokens.copy_(torch.argmax(self.logits, dim=-1))

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x (..., dim); with kernels on, the kernel also writes the instrument's pending timestamp."""
        if self.kernels:
            return kops.rms_norm(x, norm.weight, norm.eps, stamp=self.ins.take_stamp())
        return norm(x)

    def _layer(self, i: int, h: torch.Tensor, attend: Attend) -> None:
        """One decoder layer, updating h (B, S, dim) in place; `attend(i, qkv)` takes the fused projection
        (B, S, H + 2*H_kv, D), applies RoPE, writes the cache and returns the attention output (B*S, H*D)."""
        layer, region, ops = self.model.layers[i], self.ins.region_with, self.regions.ops[i]
        b, s, dim = h.shape
        h2 = h.view(b * s, dim)  # (B*S, dim), the residual stream, updated in place
        gemv = self._gemv_on(h2)  # then the qkv and gate/up kernels normalise h2 themselves (see _proj)
        with region(*self.regions.layers[i]):
            with region(*ops["norm"]):  # empty with gemv: the norm runs inside the qkv product
                x = None if gemv else self._norm(layer.attention_norm, h)
            with region(*ops["qkv"]):
                if gemv:
                    a = self.args
                    qkv = self._proj(layer.attention.wqkv, h2, layer.attention_norm).view(
                        b, s, a.n_heads + 2 * a.n_kv_heads, a.head_dim)  # (B, S, H+2H_kv, D)
                else:
                    qkv = layer.attention.qkv(x)  # (B, S, H+2H_kv, D)
            y = attend(i, qkv)  # (B*S, H*D)
            with region(*ops["o_proj"]):
                self._residual(h2, y, layer.attention.wo)
            if self.tp is not None:
                with region(*self.tp.regions[i]["allreduce_attn"]):
                    self.tp.all_reduce_(h2)
            with region(*ops["mlp"]):
                ff = layer.feed_forward
                if gemv:  # norm, gate/up product and SiLU*up
                    act = self._proj(ff.w13, h2, layer.ffn_norm, silu_mul=True)  # (B*S, F)
                else:
                    act = ff.hidden_act(self._norm(layer.ffn_norm, h2), kops.silu_mul if self.kernels else None)
                self._residual(h2, act, ff.w2)
            if self.tp is not None:
                with region(*self.tp.regions[i]["allreduce_mlp"]):
                    self.tp.all_reduce_(h2)

    def _residual(self, h2: torch.Tensor, x: torch.Tensor, linear: torch.nn.Linear) -> None:
        """h2 += linear(x) (N, dim); with tp, this rank's row-parallel part (the all-reduce follows)."""
        if self.tp is None:
            if self.gemv and x.shape[0] <= self.gemv_max_rows and kops.gemv_fits(x, linear.weight):
                kops.gemv_residual_(h2, x, linear.weight, linear.bias, **self.gemv_options)
            else:
                linear_residual_(h2, x, linear)
        else:
            self.tp.partial_residual_(h2, x, linear)

    def _gemv_on(self, x2: torch.Tensor) -> bool:
        """Whether the products reading x2 (N, dim) run the gemv kernels: gemv on, one device, N <=
        `gemv_max_rows` (GEMV_ENGINE_MAX_ROWS unless a benchmark sets it)."""
        return (self.gemv and self.tp is None and x2.shape[0] <= self.gemv_max_rows
                and kops.gemv_fits(x2, self.model.output.weight))

    def _proj(self, linear: torch.nn.Linear, x2: torch.Tensor, norm: torch.nn.Module, silu_mul: bool = False
              ) -> torch.Tensor:
        """linear(norm(x2)) (N, out) with the gemv kernels, x2 (N, dim): up to GEMV_NORM_MAX_ROWS rows the kernel
        normalises x2 itself (one launch, the instrument's pending timestamp written by it), else the RMSNorm kernel
        runs first. `silu_mul`: linear is the fused gate/up product and the result silu(gate) * up (N, out / 2)."""
        op = partial(kops.gemv_silu_mul, **self.gemv_options) if silu_mul else partial(
            kops.gemv, bias=linear.bias, **self.gemv_options)
        if x2.shape[0] <= GEMV_NORM_MAX_ROWS:
            return op(x2, linear.weight, norm_weight=norm.weight, eps=norm.eps, stamp=self.ins.take_stamp())
        return op(self._norm(norm, x2), linear.weight)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> (B, S, dim); with tp, this rank's vocabulary rows summed over the ranks."""
        if self.tp is None:
            return self.model.tok_embeddings(tokens)
        return self.tp.embed(self.model.tok_embeddings, tokens)

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
        attend = None if captured is not None else partial(self._prefill_attend, self.rope_kv.prefill_tables(b, s))
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
            attend = partial(self._prefill_attend, self.rope_kv.prefill_tables(*tokens.shape))  # for all layers
        with self.ins.region_with(*self.regions.prefill_embed):
            h = self._embed(tokens)  # (B, S, dim)
        for i in range(self.args.n_layers):
            self._layer(i, h, attend)
        h_last = h[self.batch_idx, self.cache.lengths - 1]  # (B, dim): each sequence's last prompt position
        self._head(h_last)
        return self.logits

    def _prefill_attend(self, t: PrefillTables, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Layer i of a prefill: qkv (B, S, H+2H_kv, D) -> RoPE, K/V into the cache, causal attention (B*S, H*D)."""
        b, s = qkv.shape[:2]
        q, k, v = self.rope_kv.prefill(i, qkv, t)  # (B, S, H|H_kv, D)
        with self.ins.region_with(*self.regions.ops[i]["attn"]):
            y = prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|H_kv, S, D)
                                  self.cfg.attn)  # (B, H, S, D)
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
        b = self.cfg.batch_size
        pos = self.cache.lengths  # (B,) position of the new token
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            tables = self.rope_kv.decode_tables(pos)  # once per step, for all layers
            attend = partial(self._decode_attend, tables, self._decode_meta(pos, static))
            with self.ins.region_with(*self.regions.decode_embed):
                h = self._embed(self.next_tokens.view(b, 1))  # (B, 1, dim)
            for i in range(self.args.n_layers):
                self._layer(i, h, attend)
            self._head(h[:, 0])  # (B, dim)
        return self.logits

    def _decode_meta(self, pos: torch.Tensor, static: bool) -> DecodeMeta:
        """What every layer's decode attention of this step shares (see DecodeMeta); pos: (B,) on the device."""
        cache, b = self.cache, self.cfg.batch_size
        if self.cfg.attn == "kvscope":  # kvscope's split-KV kernel: lengths on the device, fixed shapes
            return DecodeMeta(span=cache.max_seq, kv_lengths=pos + 1)
        if self.flash_decode:
            return DecodeMeta(span=cache.max_seq, seqused=(pos + 1).to(torch.int32), cu_q=self._cu_q,
                              cu_k=self._cu_k)
        host = cache.host_lengths
        span = cache.max_seq if static else max(host) + 1
        key_mask = None
        if static or min(host) != max(host):
            key_mask = (self.key_pos[:span].unsqueeze(0) <= pos.unsqueeze(1)).view(b, 1, 1, span)  # (B, 1, 1, L)
        return DecodeMeta(span=span, key_mask=key_mask)

    def _decode_attend(self, t: DecodeTables, meta: DecodeMeta, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Layer i of a decode step: qkv (B, 1, H+2H_kv, D) -> RoPE, K/V into the cache, attention over the cache
        (B, H*D)."""
        q = self.rope_kv.decode(i, qkv, t)  # (B, H, D)
        with self.ins.region_with(*self.regions.ops[i]["attn"]):
            if meta.kv_lengths is not None:
                y = kops.decode_attention(q, self.cache.k(i), self.cache.v(i), meta.kv_lengths,
                                          **self.attn_options)  # (B, H, D)
            else:
                y = decode_attention(q, self.cache.k(i), self.cache.v(i), meta, self.cfg.attn)  # (B, H, D)
            return y.view(q.shape[0], self.args.q_size)  # (B, H*D)

    def _check_room(self, n: int) -> None:
        self.cache.check_room(n)
