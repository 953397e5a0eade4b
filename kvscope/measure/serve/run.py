"""A served load, measured: the model loaded, a paged KV pool sized, the served engine built and warmed up (decode
graphs captured per bucket), then the load driven in real time on the host clock: arrivals admitted between
iterations, one forward per iteration, its sampled tokens read back (the one named sync of an iteration), records
kept per request, per iteration and per (iteration, request).

`serve(spec, stop)` returns a `ServeResult` (frames in memory); `kvscope.measure.serve.output` writes the run folder.
It is `build_served` (the engine built and warmed up) then `run_served` (a `ServeLoop` driven, the records and the
ledger collected): the HTTP front (`kvscope.measure.serve.http_run`) takes the same two steps with its own loop.
`stop()` is asked between iterations (a SIGINT/SIGTERM handler installed by the command sets it): the load ends
there, every unfinished request recorded as cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunPlan, RunSpec, prepare
from kvscope.engine.served import ServeConfig, ServedEngine
from kvscope.errors import KvscopeError
from kvscope.measure.memory import allocation_failure
from kvscope.measure.output import common_metadata
from kvscope.measure.run import raise_guard_reason
from kvscope.measure.serve.load import ClosedLoop, RequestSpec, synthetic_prompt
from kvscope.measure.serve.loop import ServeLoop
from kvscope.measure.serve.scheduler import Scheduler, Sequence
from kvscope.measure.serve.spec import ServeSpec, load_source
from kvscope.model.paged_kv_cache import PagedKVCache
from kvscope.model.weights import load_model
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.nvml import NvmlSampler
from kvscope.schema import GIB_BYTES

# warm-up iterations before the load (instrument paused): a prefill and a mixed iteration per distinct shape class
WARMUP_PREFILL_TOKENS = 256


@dataclass
class ServeResult:
    sequences: list[Sequence]
    iterations: list[dict[str, Any]]
    batches: list[tuple[int, int, str, int, int]]  # (iteration, request_id, kind, tokens, context_len)
    regions: list[dict[str, Any]]  # the instrument's rows (`iter N` and any nested regions)
    ledger: list[tuple[str, int, str]]
    meta: dict[str, Any]
    cut_reason: str = ""
    nvml: Any = None  # the NVML samples (a DataFrame), None without NVML


@dataclass
class _Built:
    plan: RunPlan
    engine: ServedEngine
    sched: Scheduler
    ins: Instrument
    ledger: list[tuple[str, int, str]]


def plan_for(spec: ServeSpec, max_seq: int) -> RunPlan:
    """The run plan behind a served load (device, model, dtype, kernels, graphs resolved and checked as `kvscope
    run` does), for sequences of up to `max_seq` tokens."""
    run_spec = RunSpec(model=spec.model, batch_size=spec.max_seqs, seq=max(1, max_seq - 1), gen_tokens=1, warmup=1,
                       reps=1, granularity=spec.granularity, dtype=spec.dtype, device=spec.device, nvtx=spec.nvtx,
                       seed=spec.seed, graphs=spec.graphs, kernels=spec.kernels, prefill_graphs=False,
                       nvml_interval_ms=spec.nvml_interval_ms)
    return prepare(run_spec)


def _pool_blocks(spec: ServeSpec, plan: RunPlan, max_seq: int) -> tuple[int, str]:
    """Blocks of the KV pool, and how the budget was chosen."""
    cfg, args = plan.cfg, plan.source.args
    block = PagedKVCache.block_bytes(args, spec.block_size, cfg.dtype)
    if spec.kv_pool_gb is not None:
        budget, how = int(spec.kv_pool_gb * GIB_BYTES), f"--kv-pool-gb {spec.kv_pool_gb:g}"
    elif cfg.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(cfg.device)
        budget, how = int(free * spec.kv_pool_frac), f"{spec.kv_pool_frac:g} of the free device memory"
    else:
        budget = spec.max_seqs * -(-max_seq // spec.block_size) * block
        how = f"--max-seqs {spec.max_seqs} sequences of {max_seq} tokens (CPU default)"
    n = budget // block + 1  # + the scratch block
    if n < 2:
        raise KvscopeError(f"a KV pool of {budget} bytes holds no block of {block} bytes ({how})")
    return n, how


def _build(plan: RunPlan, spec: ServeSpec, max_seq: int, say: Callable[[str], None]) -> _Built:
    cfg = plan.cfg
    model, ready_s = load_model(plan.source, cfg.device, cfg.dtype, seed=spec.seed)
    say(f"{plan.source.args.name} ready in {ready_s:.2f} s on {cfg.device}")
    ledger: list[tuple[str, int, str]] = []
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    ledger.append(("weights", weights, "parameters, numel x element size"))
    n_blocks, how = _pool_blocks(spec, plan, max_seq)
    before = torch.cuda.memory_allocated(cfg.device) if cfg.device.type == "cuda" else 0
    cache = PagedKVCache(plan.source.args, n_blocks, spec.block_size, cfg.dtype, cfg.device)
    grown = torch.cuda.memory_allocated(cfg.device) - before if cfg.device.type == "cuda" else cache.nbytes
    ledger.append(("kv_pool", cache.nbytes, f"{n_blocks} blocks of {spec.block_size} tokens ({how}); "
                                            f"allocator growth {grown} bytes"))
    ins = Instrument(spec.granularity, cfg.device, nvtx=plan.nvtx)
    options = EngineOptions(graphs=plan.graphs, kernels=plan.kernels)
    engine = ServedEngine(model, cache, ServeConfig(max_seq, spec.max_seqs, cfg.dtype, cfg.device), ins, options)
    sched = Scheduler(cache, spec.policy, spec.max_batch_tokens, spec.max_seqs, spec.preempt, max_seq)
    _warm_up(engine, sched, spec)
    graph_bytes, counted = engine.capture_graphs()
    if plan.graphs:
        ledger.append(("graph_pool", graph_bytes, f"decode graphs of batch {', '.join(map(str, engine.buckets))} "
                                                  f"({counted})"))
    return _Built(plan, engine, sched, ins, ledger)


def _warm_up(engine: ServedEngine, sched: Scheduler, spec: ServeSpec) -> None:
    """A few iterations before the load (instrument paused): kernels loaded, cuBLAS and SDPA plans made. Two
    sequences through the scheduler (prefill, a mixed iteration, decodes), then the pool is as before."""
    room = sched.pool.capacity * sched.bs // 2  # two sequences that fit the pool together
    n = max(1, min(WARMUP_PREFILL_TOKENS, spec.max_batch_tokens, sched.max_seq - 3, room - 3))
    seqs = [Sequence(RequestSpec(-1 - i, 0.0, n, 3), list(range(1, n + 1)), 0.0) for i in range(2)]
    with engine.ins.paused():
        for s in seqs:
            if not sched.add(s):
                raise KvscopeError(f"the KV pool cannot hold a warm-up sequence: {s.reason}")
        it = 0
        while not sched.idle:
            plan = sched.schedule(0.0)
            sampled = engine.forward(plan.batch, -1).tolist()  # named sync
            sched.complete(plan, sampled, 0.0, it)
            it += 1
    sched.finished.clear()


@dataclass
class Served:
    """A served engine built and warmed up, ready for a loop (`build_served`); `run_served` drives it."""

    spec: ServeSpec
    max_seq: int
    built: _Built
    nvml: NvmlSampler

    @property
    def plan(self) -> RunPlan:
        return self.built.plan


@contextlib.contextmanager
def _guard(nvml: NvmlSampler) -> Iterator[None]:
    """Out of memory on the device as one KvscopeError; any other failure with the NVML guard's reason first."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise_guard_reason(nvml)
            raise
        raise KvscopeError(f"out of memory during the served load: {exc}".splitlines()[0]
                           + " (a smaller --kv-pool-gb, --max-seqs or --max-batch-tokens)") from None
    except BaseException:
        raise_guard_reason(nvml)
        raise


def build_served(spec: ServeSpec, max_seq: int, say: Callable[[str], None]) -> Served:
    """The plan, the NVML sampler (its own process, started before the model loads), the model, the paged KV pool,
    the served engine and the scheduler, warmed up with the decode graphs captured: what the in-process load and the
    HTTP front share. KvscopeError for bad input (before any weights load) and for a device out of memory."""
    plan = plan_for(spec, max_seq)
    nvml = NvmlSampler(plan.cfg.device, spec.nvml_interval_ms)
    try:
        with _guard(nvml):
            built = _build(plan, spec, max_seq, say)
    except BaseException:
        nvml.stop()
        raise
    return Served(spec, max_seq, built, nvml)


def run_served(served: Served, loop: ServeLoop, drive: Callable[[], None]) -> ServeResult:
    """`drive()` runs `loop` (in this thread or another) between the instrument's clock start and the collection of
    its regions, inside `cudaProfilerStart`/`Stop` (the load alone in an nsys capture); then the ledger, the
    metadata and the records. The NVML sampler stops here, whatever happens."""
    built, cfg = served.built, served.plan.cfg
    try:
        with _guard(served.nvml):
            if cfg.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(cfg.device)
            built.ins.start_clock()
            if cfg.device.type == "cuda":  # the load alone in an nsys capture (`kvscope nsys -- serve`)
                torch.cuda.cudart().cudaProfilerStart()
            try:
                drive()  # each iteration ends in a sync: its GPU work is done before cudaProfilerStop
            finally:
                if cfg.device.type == "cuda":
                    torch.cuda.cudart().cudaProfilerStop()
            regions = built.ins.collect()  # one named sync, after the load
            _ledger_after(built, loop)
    finally:
        served.nvml.stop()
    meta = _meta(served.spec, built, served.max_seq, served.nvml)
    return ServeResult(loop.sequences, loop.rows, loop.batches, regions, built.ledger, meta, loop.cut_reason,
                       nvml=served.nvml.samples)


def serve(spec: ServeSpec, stop: Callable[[], bool] | None = None, say: Callable[[str], None] | None = None,
          progress: Callable[[int, int, int, float], None] | None = None) -> ServeResult:
    """Build, warm up and drive the load `spec` describes (see the module docstring). KvscopeError for bad input
    (before any weights load) and for a device that runs out of memory."""
    say = say or (lambda _m: None)
    source, max_seq = load_source(spec)
    served = build_served(spec, max_seq, say)
    rng = np.random.default_rng(spec.seed)
    vocab = served.plan.source.args.vocab_size
    closed = source if isinstance(source, ClosedLoop) else None
    loop = ServeLoop(served.built.engine, served.built.sched, lambda r: synthetic_prompt(rng, r.prompt_tokens, vocab),
                     () if closed is not None else source, closed, progress)
    return run_served(served, loop, lambda: loop.run(stop, stop_reason="stopped by a signal"))


def _ledger_after(built: _Built, loop: ServeLoop) -> None:
    cfg = built.plan.cfg
    if cfg.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(cfg.device)
        fixed = sum(b for item, b, _ in built.ledger if item in ("weights", "kv_pool"))
        built.ledger += [("activations_peak", peak - fixed, "peak allocated during the load - weights - KV pool"),
                         ("allocator_reserved", torch.cuda.memory_reserved(cfg.device), "at the end of the load"),
                         ("allocator_allocated", torch.cuda.memory_allocated(cfg.device), "at the end of the load")]
    per_slot = built.engine.cache.bytes_per_token
    used = max((r["token_slots_used"] for r in loop.rows), default=0)
    held = max((r["block_slots_held"] for r in loop.rows), default=0)
    built.ledger += [("kv_token_slots_used_peak", used * per_slot, f"{used} positions holding K/V at the peak"),
                     ("kv_block_slots_held_peak", held * per_slot, f"{held} positions in the blocks held at the peak")]


def _meta(spec: ServeSpec, built: _Built, max_seq: int, nvml: NvmlSampler) -> dict[str, Any]:
    """The run's metadata (JSON under the key `kvscope` of every Parquet file and in the trace): what every
    measurement's holds (`common_metadata`), and the served load's settings."""
    plan, engine = built.plan, built.engine
    cache = engine.cache
    return {
        **common_metadata(plan, built.ins, nvml, "kvscope-served"),
        "serve": {**spec.as_dict(), "max_seq": max_seq, "n_blocks": cache.n_blocks,
                  "kv_bytes_per_token": cache.bytes_per_token,
                  "weights_bytes": next(b for item, b, _ in built.ledger if item == "weights"), "graphs": plan.graphs,
                  "kernels": plan.kernels, "graph_buckets": list(engine.buckets) if engine.graphs else []},
    }
