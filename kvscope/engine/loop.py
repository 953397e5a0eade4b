"""The hand-written prefill and decode loop over a `KVCache`.

- `prefill(tokens, lengths)`: a right-padded batch of prompts of different lengths; writes K/V for every prompt
  position and computes logits only at each sequence's last position.
- `decode_step()`: one token for every sequence, from the static `next_tokens` buffer, positions and lengths read
  on the device; greedy sampling on the device; no host sync and no Python-side tensor creation from host data, so a
  step can be captured in a CUDA graph.
- `decode_n(n)`: n steps, tokens gathered into one device tensor `(B, n)`.
- `graphs=True` (CUDA): the first decode step captures one step in a CUDA graph; every step replays it. When the
  instrument times layers or ops, their regions are marks inside the graph (timestamps written by kernels with
  `kernels=True`, event-record nodes without), two graphs alternate, and each graph's marks are read (one named
  sync) just before its next replay, two steps later; NVTX then marks only each replay (kernels inside are
  attributed by nsys `--cuda-graph-trace=node`).
- `kernels=True` (CUDA): kvscope's hand-written kernels run RMSNorm, SiLU*up, and RoPE fused with the K/V cache
  write (`kvscope.kernels.ops`); otherwise the same maths runs as torch operations. In a captured graph the RMSNorm
  kernel that opens each layer also writes the layer's start timestamp (see Instrument).

Every piece of work is opened through the engine's `Instrument`: phase (`prefill`, `decode step N`), layer (`L07`,
plus `embed`, `lm_head`, `sample`) and op (`L07.norm`, `.qkv`, `.rope`, `.kv_write`, `.attn`, `.o_proj`, `.mlp`;
`norm` is the input norm, `mlp` holds the post-attention norm, the MLP and its residual add, `o_proj` the attention
output projection and its residual add; with kernels on, `rope` includes the cache write and there is no
`kv_write`). The default instrument does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.kernels import ops as kops
from kvscope.model.attention import DecodeMeta, decode_attention, flash_decode_ok, prefill_attention
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import Transformer, apply_rope, linear_residual_, rope_tables
from kvscope.profiler.instrument import GraphTimer, Instrument

# largest RoPE table (bytes, each of cos and sin) a prefill materialises at the projection's shape
PREFILL_ROPE_TABLE_MAX_BYTES = 64 * 2**20
OPS = ("norm", "qkv", "rope", "kv_write", "attn", "o_proj", "mlp")
# SDPA backends for decode steps. cuDNN's attention (torch's first choice on Hopper) builds a plan for every new key
# length, which an eager decode step over the growing cache meets at every step (see benchmarks/
# sdpa_decode_shapes.py); flash / memory-efficient / math kernels need no plan.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, V), written by every replay
    timer: GraphTimer | None  # marks (timestamp slots or event-record nodes) of the timed regions inside, or None


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


class Engine:
    """One model, one KV cache, static decode buffers, and the attention switch of the run config."""

    def __init__(self, model: Transformer, cfg: RunConfig, instrument: Instrument | None = None,
                 graphs: bool = False, kernels: bool = False) -> None:
        args = model.args
        cfg.check(args)
        if graphs and cfg.device.type != "cuda":
            raise KvscopeError("CUDA graphs need a CUDA device (--graphs off on the CPU)")
        if kernels and not kops.supported(cfg.device, cfg.dtype):
            raise KvscopeError(f"kvscope's CUDA kernels need a CUDA device and float32/bfloat16/float16, "
                               f"got {cfg.device} {cfg.dtype} (--kernels off)")
        self.graphs = graphs
        # hand-written kernels: RMSNorm (which also writes in-graph timestamps), SiLU*up, RoPE fused with the cache
        # write; off: the same maths as torch operations
        self.kernels = kernels
        self._graphs: list[_CapturedStep] = []  # one captured step, or two alternating ones with timing marks
        self._replays = 0
        self.model = model
        self.cfg = cfg
        self.args = args
        self.ins = instrument if instrument is not None else Instrument("none", cfg.device, nvtx=False)
        width = max(2, len(str(args.n_layers - 1)))
        self._layer_names = [f"L{i:0{width}d}" for i in range(args.n_layers)]
        # (name, level, keys) of every layer and op region, built once
        # `chain`: the region follows its sibling with no GPU work between (inside a captured graph it reuses the
        # sibling's end mark as its start, see Instrument); `stamped`: its first GPU work is a kernel that takes the
        # instrument's pending timestamp (`Instrument.take_stamp`), the RMSNorm kernel here
        stamped = {"stamped": True} if kernels else {}
        self._layer_regions = [(n, "layer", {"layer": i, "chain": True, **stamped})
                               for i, n in enumerate(self._layer_names)]
        self._op_regions = [{op: (f"{n}.{op}", "op", {"layer": i, "op": op, "chain": True,
                                                      **(stamped if op == "norm" else {})}) for op in OPS}
                            for i, n in enumerate(self._layer_names)]
        self._lm_head_keys = {"chain": True, **stamped}
        self.step = 0  # index of the token the next decode step produces (the prefill produces token 0)
        dev, dt = cfg.device, cfg.dtype
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        self.cache = KVCache(args, cfg.batch_size, cfg.max_seq, dt, dev)
        # measured size of the cache allocation: the allocator's growth on CUDA, the storage's size on the CPU
        self.kv_alloc_bytes = (torch.cuda.memory_allocated(dev) - before if dev.type == "cuda"
                               else self.cache.data.untyped_storage().nbytes())
        self.cos, self.sin_rot = rope_tables(args, cfg.max_seq, dev, dt)  # (S_max, D) each
        self.key_pos = torch.arange(cfg.max_seq, device=dev)  # (S_max,)
        b = cfg.batch_size
        self.batch_idx = torch.arange(b, device=dev)  # (B,)
        # V heads go through the decode step's RoPE with cos 1 and sin 0, i.e. unchanged
        self._v_cos = torch.ones(1, 1, args.n_kv_heads, args.head_dim, dtype=dt, device=dev)  # (1, 1, H_kv, D)
        self._v_sin = torch.zeros(1, 1, args.n_kv_heads, args.head_dim, dtype=dt, device=dev)  # (1, 1, H_kv, D)
        self.flash_decode = flash_decode_ok(cfg.attn, dev, dt, args.head_dim)
        self._cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)  # (B+1,) one query per sequence
        self._cu_k = self._cu_q * cfg.max_seq  # (B+1,) each sequence's block of the token-major cache
        self.next_tokens = torch.zeros(cfg.batch_size, dtype=torch.int64, device=dev)  # (B,) static decode input
        self.logits: torch.Tensor | None = None  # (B, V) logits of the last prefill or decode step

    # ---- shared pieces ------------------------------------------------------------------------------------
    def _head(self, h_last: torch.Tensor) -> None:
        """h_last: (B, dim) -> logits (B, V) in `self.logits`, greedy tokens into `next_tokens`."""
        m, ins = self.model, self.ins
        with ins.region_with("lm_head", "layer", self._lm_head_keys):
            self.logits = m.output(self._norm(m.norm, h_last))  # (B, V)
        with ins.region("sample", "layer", chain=True):
            self.next_tokens.copy_(torch.argmax(self.logits, dim=-1))

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x (..., dim); with kernels on, the kernel also writes the instrument's pending timestamp."""
        if self.kernels:
            return kops.rms_norm(x, norm.weight, norm.eps, stamp=self.ins.take_stamp())
        return norm(x)

    def _layer(self, i: int, h: torch.Tensor, attend) -> None:
        """One decoder layer, updating h (B, S, dim) in place; `attend(i, qkv)` takes the fused projection
        (B, S, H + 2*H_kv, D), applies RoPE, writes the cache and returns the attention output (B*S, H*D)."""
        layer, region, ops = self.model.layers[i], self.ins.region_with, self._op_regions[i]
        b, s, dim = h.shape
        h2 = h.view(b * s, dim)  # (B*S, dim), the residual stream, updated in place
        with region(*self._layer_regions[i]):
            with region(*ops["norm"]):
                x = self._norm(layer.attention_norm, h)
            with region(*ops["qkv"]):
                qkv = layer.attention.qkv(x)  # (B, S, H+2H_kv, D)
            y = attend(i, qkv)  # (B*S, H*D)
            with region(*ops["o_proj"]):
                linear_residual_(h2, y, layer.attention.wo)
            with region(*ops["mlp"]):
                ff = layer.feed_forward
                act = ff.hidden_act(self._norm(layer.ffn_norm, h2), kops.silu_mul if self.kernels else None)
                linear_residual_(h2, act, ff.w2)

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
        ins, m, cache, impl = self.ins, self.model, self.cache, self.cfg.attn

        hq, hkv = self.args.n_heads, self.args.n_kv_heads
        cos = self.cos[:s].view(1, s, 1, -1)  # (1, S, 1, D)
        sin = self.sin_rot[:s].view(1, s, 1, -1)  # (1, S, 1, D)
        full = (b, s, hq + 2 * hkv, self.args.head_dim)
        v_through = not self.kernels and math.prod(full) * cos.element_size() <= PREFILL_ROPE_TABLE_MAX_BYTES
        if v_through:
            # tables at the projection's own shape, made once per prefill for all layers: torch vectorises
            # elementwise kernels only over operands of one contiguous shape, not over broadcast ones; V heads get
            # cos 1 and sin 0, so the rotated projection holds K and V side by side for one cache write
            cos, sin = cos.expand(full).contiguous(), sin.expand(full).contiguous()  # (B, S, H+2H_kv, D)
            cos[:, :, hq + hkv:] = 1
            sin[:, :, hq + hkv:] = 0

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """q, k, v: (B, S, H|H_kv, D) -> (B*S, H*D)."""
            with ins.region_with(*self._op_regions[i]["attn"]):
                y = prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), impl)  # (B, H, S, D)
                return y.transpose(1, 2).reshape(b * s, hq * self.args.head_dim)  # (B*S, H*D)

        def attend_fused(i: int, qkv: torch.Tensor) -> torch.Tensor:
            with ins.region_with(*self._op_regions[i]["rope"]):  # RoPE on q and k in place, K and V into the cache
                kops.rope_kv_(qkv, self.cos, self.sin_rot, cache.k(i), cache.v(i), hq)
            return attention(i, qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:])  # (B, S, H|H_kv, D)

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            ops = self._op_regions[i]
            with ins.region_with(*ops["rope"]):
                # over all heads of the contiguous projection (vectorised kernels; a q/k slice would be strided);
                # V heads pass unchanged with the materialised tables, and are not used otherwise
                r = apply_rope(qkv, cos, sin)  # (B, S, H+2H_kv, D)
            q, k, v = r[:, :, :hq], r[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]  # (B, S, H|H_kv, D)
            with ins.region_with(*ops["kv_write"]):
                if v_through:
                    kv = r[:, :, hq:].view(b, s, 2, hkv, -1).permute(2, 0, 1, 3, 4)  # (2, B, S, H_kv, D)
                    cache.kv(i)[:, :, :s].copy_(kv)
                else:
                    cache.k(i)[:, :s].copy_(k)  # (B, S, H_kv, D)
                    cache.v(i)[:, :s].copy_(v)
            return attention(i, q, k, v)

        with ins.region("prefill", "phase", phase="prefill", step=0, tokens=sum(lengths), context_len=max(lengths)):
            with ins.region("embed", "layer"):
                h = m.tok_embeddings(tokens)  # (B, S, dim)
            for i in range(self.args.n_layers):
                self._layer(i, h, attend_fused if self.kernels else attend)
            h_last = h[self.batch_idx, cache.lengths - 1]  # (B, dim): each sequence's last prompt position
            self._head(h_last)
        return self.next_tokens

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
        if self.graphs and not self._graphs:
            self._capture()
        cs = self._graphs[self._replays % len(self._graphs)] if self._graphs else None
        if cs is not None and cs.timer is not None:
            self.ins.before_replay(cs.timer)  # reads its events of two steps back (a named sync inside)
        with self.ins.region(f"decode step {step}", "step", phase="decode", step=step,
                             tokens=self.cfg.batch_size, context_len=max(self.cache.host_lengths) + 1):
            if cs is not None:
                cs.graph.replay()  # forward, K/V write, greedy token and length update, as captured
                if cs.timer is not None:
                    self.ins.replayed(cs.timer)
                self._replays += 1
                self.cache.advance(device=False)
                self.logits = cs.logits
            else:
                with sdpa_kernel(DECODE_SDPA_BACKENDS):
                    self._decode_forward()
                self.cache.advance()
        self.step = step + 1
        return self.next_tokens

    def _capture(self) -> None:
        """Capture one decode step (fixed shapes) in a CUDA graph.

        Warm-up runs execute a real step's forward twice on a side stream without advancing the lengths, from the
        same input tokens (restored before and after), so the K/V they write at the current positions are the ones
        the first replay writes again. Regions are paused while warming up. At phase granularity they are paused
        while capturing too: timing and NVTX happen around replays. When layers or ops are timed, their regions
        become event-record nodes inside the graph, and two graphs (one memory pool) are captured and replayed
        alternately, so the events of one replay can be read while the next runs (see Instrument.before_replay).
        """
        saved = self.next_tokens.clone()
        side = torch.cuda.Stream(self.cfg.device)
        side.wait_stream(torch.cuda.current_stream(self.cfg.device))
        with self.ins.paused(), torch.cuda.stream(side), sdpa_kernel(DECODE_SDPA_BACKENDS):
            for _ in range(2):
                self.next_tokens.copy_(saved)
                self._decode_forward(static=True)
        torch.cuda.current_stream(self.cfg.device).wait_stream(side)
        self.next_tokens.copy_(saved)
        timed = self.ins.graph_timed()
        pool = None
        for _ in range(2 if timed else 1):
            graph = torch.cuda.CUDAGraph()
            # with kernels on, the timed regions are timestamp slots written by the RMSNorm kernel or a one-thread
            # kernel; otherwise event-record nodes
            stamps = host = None
            if self.kernels and timed:
                n = self.ins.graph_marks_bound(self.args.n_layers, len(OPS))
                stamps = torch.zeros(n, dtype=torch.int64, device=self.cfg.device)  # (n,) written by the graph
                host = torch.zeros(n, dtype=torch.int64, pin_memory=True)  # (n,) where they are read
            mode = self.ins.capturing(stamps, host) if timed else self.ins.paused()
            with torch.cuda.graph(graph, pool=pool), sdpa_kernel(DECODE_SDPA_BACKENDS):
                with mode as timer:  # closes (its last timestamp written) before the length update below
                    self._decode_forward(static=True)
                self.cache.lengths.add_(1)
            pool = graph.pool()  # graphs replayed one after the other can share intermediates
            # self.logits: this graph's own output buffer, rewritten by each of its replays
            self._graphs.append(_CapturedStep(graph, self.logits, timer if timed else None))

    def _decode_forward(self, static: bool = False) -> None:
        """The device work of one step: reads next_tokens and cache.lengths, writes K/V and next_tokens.

        `static=False` (eager): attention reads only the first L cache positions, L = the longest sequence after
        this step, known on the host without a sync; a key mask is built only for a ragged batch.
        `static=True` (for CUDA-graph capture): fixed shapes, attention over all `max_seq` positions with a mask.
        """
        m, cache, a, ins, impl = self.model, self.cache, self.args, self.ins, self.cfg.attn
        b, hq, hkv, d = self.cfg.batch_size, a.n_heads, a.n_kv_heads, a.head_dim
        pos = cache.lengths  # (B,) position of the new token
        if not self.kernels:
            # RoPE tables of this step for all H + 2*H_kv heads of the fused projection (V heads: cos 1, sin 0)
            cos = torch.cat((self.cos[pos].view(b, 1, 1, d).expand(b, 1, hq + hkv, d),
                             self._v_cos.expand(b, 1, hkv, d)), dim=2)  # (B, 1, H+2H_kv, D)
            sin = torch.cat((self.sin_rot[pos].view(b, 1, 1, d).expand(b, 1, hq + hkv, d),
                             self._v_sin.expand(b, 1, hkv, d)), dim=2)  # (B, 1, H+2H_kv, D)
            write_idx = pos.view(1, b, 1, 1, 1).expand(2, b, 1, hkv, d)  # (2, B, 1, H_kv, D)
        if self.flash_decode:
            meta = DecodeMeta(span=cache.max_seq, seqused=(pos + 1).to(torch.int32), cu_q=self._cu_q,
                              cu_k=self._cu_k)
        else:
            host = cache.host_lengths
            span = cache.max_seq if static else max(host) + 1
            key_mask = None
            if static or min(host) != max(host):
                key_mask = (self.key_pos[:span].unsqueeze(0) <= pos.unsqueeze(1)).view(b, 1, 1, span)  # (B,1,1,L)
            meta = DecodeMeta(span=span, key_mask=key_mask)

        def attention(i: int, q: torch.Tensor) -> torch.Tensor:
            """q: (B, H, D) against layer i's cache -> (B, H*D)."""
            with ins.region_with(*self._op_regions[i]["attn"]):
                y = decode_attention(q, cache.k(i), cache.v(i), meta, impl)  # (B, H, D)
                return y.view(b, hq * d)  # (B, H*D)

        def attend_fused(i: int, qkv: torch.Tensor) -> torch.Tensor:
            with ins.region_with(*self._op_regions[i]["rope"]):  # RoPE on q and k in place, K/V at each position
                kops.rope_kv_(qkv, self.cos, self.sin_rot, cache.k(i), cache.v(i), hq, lengths=pos)
            return attention(i, qkv[:, 0, :hq])

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            ops = self._op_regions[i]
            with ins.region_with(*ops["rope"]):
                r = apply_rope(qkv, cos, sin)  # (B, 1, H+2H_kv, D): rotated q and k, v unchanged
            with ins.region_with(*ops["kv_write"]):
                new_kv = r[:, :, hq:].view(b, 1, 2, hkv, d).permute(2, 0, 1, 3, 4)  # (2, B, 1, H_kv, D)
                cache.kv(i).scatter_(2, write_idx, new_kv)  # K and V at each sequence's position, one kernel
            return attention(i, r[:, 0, :hq])

        with ins.region("embed", "layer", chain=True):
            h = m.tok_embeddings(self.next_tokens.view(b, 1))  # (B, 1, dim)
        for i in range(a.n_layers):
            self._layer(i, h, attend_fused if self.kernels else attend)
        self._head(h[:, 0])

    @torch.inference_mode()
    def decode_n(self, n: int) -> torch.Tensor:
        """Run n decode steps after a prefill; returns (B, n+1): the prefill's token, then one per step."""
        if n < 0:
            raise KvscopeError(f"number of decode steps must be >= 0, got {n}")
        self.cache.check_room(n)
        b = self.cfg.batch_size
        out = torch.empty(b, n + 1, dtype=torch.int64, device=self.cfg.device)  # (B, n+1)
        out[:, 0] = self.next_tokens
        with self.ins.region("decode", "phase", phase="decode", tokens=b * n):
            for i in range(n):
                out[:, i + 1] = self.decode_step()
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy generation of `max_new_tokens` per prompt; one host sync at the end (the `.tolist()`)."""
        if max_new_tokens < 1:
            raise KvscopeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if len(prompts) != self.cfg.batch_size:
            raise KvscopeError(f"engine was built for {self.cfg.batch_size} prompts, got {len(prompts)}")
        tokens, lengths = pad_prompts(prompts, self.args.vocab_size, self.cfg.device)
        self.prefill(tokens, lengths)
        return self.decode_n(max_new_tokens - 1).tolist()  # the one host sync
