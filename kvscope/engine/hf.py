"""transformers' own model and decode loop, timed with kvscope's region names (`--engine transformers` and
`--engine transformers-compiled`), so `kvscope run`, `sweep`, `nsys`, `align` and `report` compare the two loops.

- The model: transformers' `AutoModelForCausalLM` of the same architecture, on the run's device and dtype, with
  `--attn` as its `attn_implementation` (`sdpa` or `eager`). A checkpoint folder loads with `from_pretrained` (local
  files only, onto the host, then moved); a preset or a config.json gets kvscope's seeded random weights
  (`model.weights.load_model`, the same seed semantics) copied into transformers' parameters under their Hugging Face
  names, so both engines run the same weights and, in float32, give the same greedy tokens.
- `transformers` (eager): the model's forward over a `DynamicCache` (a new one per prefill), greedy argmax on the
  device, `logits_to_keep=1`. A ragged batch (`kvscope generate`) is left-padded with an attention mask, as
  transformers' `generate` expects.
- `transformers-compiled`: what `generate(cache_implementation="static")` does: a `StaticCache` of the run's context
  (reset before every prefill), the prefill eager, every decode step through the forward transformers compiles for
  decode (`model.get_compiled_call`, torch.compile mode `reduce-overhead`, whose CUDA graphs are `--graphs`' meaning
  for this engine: `--graphs off` compiles in mode `default`). Prompts must share one length. A new engine drops the
  compiled code of an earlier one (`torch._dynamo.reset()`, named: a sweep's points have other cache shapes, and
  would otherwise exhaust dynamo's recompile limit); the compilation falls in the warm-up.

Regions (the names of `kvscope.schema`, opened through the same `Instrument` as kvscope's loop): phase
`prefill` and `decode`, `decode step N`, `sample` (the argmax); with the eager engine also, from forward pre/post
hooks, `embed` (the embedding), `L07` (each decoder layer) and `lm_head` (the final norm to the output projection).

Refused, each in one line (`engine.plan.prepare`): `--granularity op` with either engine (transformers' layers have
no hook points at kvscope's op boundaries: RoPE and the cache write sit inside its attention call), `--granularity
layer` with the compiled engine (hooks do not run inside a compiled, graph-replayed forward), and `--kernels on`
(kvscope's kernels belong to kvscope's loop); `--graphs on` with the eager engine. Left out, both are off for the
eager engine, and `--graphs` is on for the compiled one on CUDA.

KV-cache bytes are measured from the cache itself, after the last decode step: `kv_cache_bytes` sums its key and
value tensors (a DynamicCache holds the final context, a StaticCache its whole preallocated length), `kv_alloc_bytes`
their storages.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvscope.engine.greedy import GreedyLoop
from kvscope.engine.plan import RunConfig
from kvscope.engine.regions import DECODE, PREFILL, EngineRegions, RegionSpec
from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs
from kvscope.model.source import ModelSource, one_line
from kvscope.model.weights import hf_targets, load_model
from kvscope.profiler.instrument import Instrument
from kvscope.schema import step_name


def hf_config(args: ModelArgs) -> Any:
    """transformers' config of the architecture `args` describes."""
    from transformers import AutoConfig

    cfg = args.to_hf_config()
    model_type = cfg.pop("model_type")
    cfg.pop("architectures")
    return AutoConfig.for_model(model_type, **cfg)


def load_hf_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"
                  ) -> tuple[torch.nn.Module, float]:
    """transformers' model for `source` on `device` in `dtype` (see the module docstring); returns it and the seconds
    it took (synchronised)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if source.folder is not None:
        try:
            # loaded on the host, then moved: a device_map would need the accelerate package
            model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype, attn_implementation=attn,
                                                         local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc):
                raise
            raise KvscopeError(f"transformers cannot load {source.folder} ({type(exc).__name__}): "
                               f"{one_line(str(exc), 300) or 'no message'}") from None
    else:
        ours, _ = load_model(source, device, dtype, seed=seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(source.args), attn_implementation=attn, dtype=dtype)
        _copy_weights(ours, model)
        del ours
        if device.type == "cuda":
            torch.cuda.empty_cache()  # kvscope's copy of the weights is freed, not kept reserved (memory columns)
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # named sync: the ready time includes the device work
    return model, time.perf_counter() - t0


@torch.no_grad()
def _copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """kvscope's (fused) parameters into transformers' parameters of the same Hugging Face names."""
    targets = hf_targets(ours)
    params = dict(hf.named_parameters())  # tied weights listed once, as in kvscope's table
    if set(params) != set(targets):
        odd = sorted(set(params) ^ set(targets))
        raise KvscopeError(f"transformers' {type(hf).__name__} and kvscope's model name different parameters: "
                           f"{', '.join(odd[:3])}")
    for name, (src, lo, hi) in targets.items():
        params[name].copy_(src[lo:hi])


class HfEngine(GreedyLoop):
    """transformers' model driven greedily over its own cache, with the surface `kvscope run` uses of `Engine`:
    `prefill`, `decode_step`, `decode_n`, `generate`, `cfg`, `graphs`, `kernels`, the KV-cache bytes."""

    GRAD_MODE = torch.no_grad

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, instrument: Instrument | None = None,
                 compiled: bool = False, graphs: bool = False) -> None:
        self.ins = instrument if instrument is not None else Instrument("none", cfg.device, nvtx=False)
        timed = self.ins.timed_levels()
        if "op" in timed or (compiled and "layer" in timed):
            what = "the compiled transformers engine times phases and decode steps only" if compiled else \
                "the transformers engine times phases, decode steps and layers, not ops"
            raise KvscopeError(f"--granularity {self.ins.granularity}: {what}")
        self.model, self.cfg, self.compiled = model, cfg, compiled
        self.vocab_size = int(model.config.vocab_size)
        self.graphs = compiled and graphs  # torch.compile's CUDA graphs (mode reduce-overhead)
        self.kernels = False
        self.n_layers = int(model.config.num_hidden_layers)
        self.regions = EngineRegions(self.n_layers, stamped=False)
        b, dev = cfg.batch_size, cfg.device
        self.next_tokens = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,) the next decode input
        self.positions = torch.zeros(b, 1, dtype=torch.int64, device=dev)  # (B, 1) its position ids
        self.step = 0
        self.context = 0  # cache slots in use (host): the padded prompt length plus the decode steps
        self._mask: torch.Tensor | None = None  # (B, context) attention mask of a left-padded ragged batch
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._open: list[Any] = []  # regions a pre-hook entered whose post-hook has not run yet
        self._cache: Any = None
        if compiled:
            from transformers import CompileConfig, StaticCache

            self._cache = StaticCache(config=model.config, max_cache_len=cfg.max_seq)
            torch._dynamo.reset()  # named: drops an earlier engine's compiled code (other cache shapes)
            self._decode_call = model.get_compiled_call(CompileConfig(mode="reduce-overhead" if graphs else "default"))
            self._hooks: list[Any] = []
        else:
            self._decode_call = model
            self._hooks = self._register_hooks()

    # ---- hooks --------------------------------------------------------------------------------------------
    def _register_hooks(self) -> list[Any]:
        """Pre/post forward hooks that open `embed`, every `L07` and `lm_head` (final norm to the output projection)."""
        base = self.model.model
        hooks = [*self._around(base.embed_tokens, base.embed_tokens, self.regions.prefill_embed),
                 *self._around(base.norm, self.model.lm_head, self.regions.lm_head)]
        for i, layer in enumerate(base.layers):
            hooks += self._around(layer, layer, self.regions.layers[i])
        return hooks

    def _around(self, first: torch.nn.Module, last: torch.nn.Module, spec: RegionSpec) -> list[Any]:
        ins, opened = self.ins, self._open

        def enter(_module: torch.nn.Module, _args: Any) -> None:
            region = ins.region_with(*spec)
            region.__enter__()
            opened.append(region)

        def leave(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            opened.pop().__exit__(None, None, None)

        return [first.register_forward_pre_hook(enter), last.register_forward_hook(leave)]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---- one forward --------------------------------------------------------------------------------------
    def _forward(self, call: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        """ids, positions (B, S); mask (B, context) or None. The greedy tokens of the last position into
        `next_tokens`."""
        kw: dict[str, Any] = {self._cache_kw: self._cache, "use_cache": True, "logits_to_keep": 1,
                              "position_ids": positions}
        if mask is not None:
            kw["attention_mask"] = mask
        try:
            logits = call(input_ids=ids, **kw).logits  # (B, 1, V)
        finally:
            while self._open:  # a forward that raised leaves the regions of its hooks open
                self._open.pop().__exit__(None, None, None)
        with self.ins.region_with(*self.regions.sample):
            self.next_tokens.copy_(torch.argmax(logits[:, -1], dim=-1))

    # ---- prefill ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """tokens: (B, S) int64, right-padded; lengths: host ints, one per sequence. Returns the first generated
        token of each sequence (B,), also the input of the next decode step."""
        b = self.cfg.batch_size
        if tokens.dim() != 2 or tokens.shape[0] != b or tokens.dtype != torch.int64:
            raise ValueError(f"prefill: tokens must be int64 (B={b}, S), got {tokens.dtype} {tuple(tokens.shape)}")
        if len(lengths) != b or min(lengths) < 1 or max(lengths) > tokens.shape[1]:
            raise ValueError(f"prefill: lengths {list(lengths)} must be {b} values in [1, {tokens.shape[1]}]")
        n = max(lengths)
        if n > self.cfg.max_seq:
            raise KvscopeError(f"prompt of {n} tokens exceeds the cache's {self.cfg.max_seq}")
        ragged = min(lengths) != n
        if ragged and self.compiled:
            raise KvscopeError("the compiled transformers engine needs prompts of one length (a static cache and "
                               "compiled shapes); use --engine transformers for a ragged batch")
        ids, positions, self._mask = self._left_padded(tokens[:, :n], lengths)  # (B, n) each; mask or None
        self._new_cache()
        with self.ins.region(PREFILL, "phase", phase=PREFILL, step=0, tokens=sum(lengths), context_len=n):
            self._forward(self.model, ids, positions, self._mask)
        self.step, self.context = 1, n
        return self.next_tokens

    def _left_padded(self, tokens: torch.Tensor, lengths: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens (B, n) right-padded -> (ids, positions, mask), left-padded when ragged (mask None otherwise);
        sets `positions` to each sequence's length, the position of its first decode input."""
        b, n = tokens.shape
        dev = tokens.device
        lens = torch.tensor(list(lengths), dtype=torch.int64, device=dev)  # (B,)
        self.positions.copy_(lens.view(b, 1))
        col = torch.arange(n, device=dev)  # (n,)
        if min(lengths) == n:
            return tokens, col.expand(b, n), None
        src = col.view(1, n) - (n - lens).view(b, 1)  # (B, n) each slot's index in the right-padded row
        valid = src >= 0  # (B, n)
        ids = torch.gather(tokens, 1, src.clamp(min=0)) * valid  # (B, n), padding 0
        return ids, src.clamp(min=0), valid.to(torch.int64)

    def _new_cache(self) -> None:
        if self.compiled:
            self._cache.reset()
        else:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.model.config)

    # ---- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every sequence by one token from `tokens` (B,) or `next_tokens`; returns `next_tokens`."""
        if tokens is not None:
            if tokens.shape != self.next_tokens.shape or tokens.dtype != torch.int64:
                raise ValueError(f"decode_step: tokens must be int64 {tuple(self.next_tokens.shape)}, "
                                 f"got {tokens.dtype} {tuple(tokens.shape)}")
            self.next_tokens.copy_(tokens)
        if self.step == 0:
            raise KvscopeError("decode_step before a prefill")
        self._check_room(1)
        b, step = self.cfg.batch_size, self.step
        with self.ins.region(step_name(step), "step", phase=DECODE, step=step, tokens=b, context_len=self.context + 1):
            if self._mask is not None:
                self._mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], dim=1)  # (B, context + 1)
            self._forward(self._decode_call, self.next_tokens.view(b, 1), self.positions, self._mask)
            self.positions.add_(1)
        self.step, self.context = step + 1, self.context + 1
        return self.next_tokens

    def _check_room(self, n: int) -> None:
        if self.context + n > self.cfg.max_seq:
            raise KvscopeError(f"{n} more token(s) after {self.context} exceed the cache's {self.cfg.max_seq}")

    # ---- the cache's bytes --------------------------------------------------------------------------------
    def _cache_tensors(self) -> list[torch.Tensor]:
        found = []
        for layer in getattr(self._cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.numel():
                    found.append(t)
        return found

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the cache's key and value tensors now (measured, not computed from the architecture)."""
        return sum(t.nbytes for t in self._cache_tensors())

    @property
    def kv_alloc_bytes(self) -> int:
        """Bytes of the storages behind the cache's tensors, each storage counted once."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._cache_tensors()}
        return sum(storages.values())

    def kv_cache_meta(self) -> dict[str, Any]:
        """The run metadata's `kv_cache`: bytes, allocated bytes, the cache's class and one layer's key shape."""
        tensors = self._cache_tensors()
        return {"bytes": self.kv_cache_bytes, "alloc_bytes": self.kv_alloc_bytes,
                "cache": type(self._cache).__name__ if self._cache is not None else None,
                "shape": [self.n_layers, 2, *tensors[0].shape] if tensors else []}
