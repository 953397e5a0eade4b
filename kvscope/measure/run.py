"""The measured run behind `kvscope run`: an instrumented prefill + decode run, written as a run folder.

A run loads the model once, warms up (regions paused), then times `reps` repetitions of one prefill of `seq` tokens
per sequence followed by `gen_tokens - 1` decode steps (the prefill yields the first new token). The measured
repetitions sit between `cudaProfilerStart` and `cudaProfilerStop`, so an nsys capture with
`--capture-range=cudaProfilerApi` holds them alone.

Host syncs, all outside the timed regions' device work: one before the first repetition (the time origin), one at the
prefill/decode boundary (the copy of the first token to the host: it ends the host-clock TTFT and starts the host
clock of the decode phase), one at the end of every repetition (ends that clock), and one in `Instrument.collect()`
after the measured region.

NVML is sampled by a child process (`kvscope.profiler.nvml`) started before the model loads: nothing of it runs in
this process while the repetitions are timed. The run folder and its files: `kvscope.measure.output`; the
summary's maths: `kvscope.analysis.summary`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvscope.analysis.summary import HostClock, RunFacts, summary_row
from kvscope.engine.hf import HfEngine, load_hf_model
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunPlan, RunSpec, prepare
from kvscope.engine.tp import TensorParallel
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, os_reason
from kvscope.measure.memory import allocation_failure, allocation_message
from kvscope.measure.output import (
    OUT_LABEL,
    RunResult,
    default_out_dir,
    kv_cache_meta,
    run_metadata,
    timings_frame,
    write_run,
)
from kvscope.model.dtypes import dtype_name, itemsize
from kvscope.model.weights import load_model
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.nvml import NvmlSampler
from kvscope.schema import (
    COLLECTIVE_OPS,
    CUDA_CLOCK,
    HF_COMPILED_ENGINE,
    HOST_CLOCK,
    KVSCOPE_ENGINE,
    MIB_BYTES,
    NAMED_LAYERS,
    NS_PER_MS,
    OPS,
    PHASES,
    rep_name,
    run_name,
)

ProgressFn = Callable[[str, int, int], None]
Prompt = tuple[torch.Tensor, list[int]]  # the tokens (B, S) on the device, and each sequence's length


def execute(spec: RunSpec, progress: ProgressFn | None = None, log: Callable[[str], None] | None = None
            ) -> RunResult:
    """Validate, run and write one configuration. Raises KvscopeError for bad input before any file is made."""
    plan = prepare(spec)
    out = AtomicFolder(Path(spec.out) if spec.out else default_out_dir(plan), OUT_LABEL)  # checked now
    say = log or (lambda _msg: None)
    if spec.model is None:
        say(f"no --model given: using the {plan.source.spec} preset (random weights) on {plan.cfg.device.type}")
    try:
        out.open()
        result = _load_and_measure(plan, out, progress, say)
        result.out_dir = out.commit()
        return result
    except BaseException:
        out.discard()
        raise


def _load_and_measure(plan: RunPlan, out: AtomicFolder, progress: ProgressFn | None, say: Callable[[str], None]
                      ) -> RunResult:
    cfg = plan.cfg
    nvml = NvmlSampler(cfg.device, plan.spec.nvml_interval_ms)  # its own process, started before the model loads
    try:
        model, ready_s = load_for(plan)
        say(f"{plan.source.args.name} ready in {ready_s:.2f} s on {cfg.device} ({dtype_name(cfg.dtype)})")
        result = measure(model, plan, out.final.name, ready_s, progress, nvml=nvml)
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise_guard_reason(nvml)
            raise
        raise KvscopeError(allocation_message(exc, plan)) from None
    except BaseException:
        raise_guard_reason(nvml)  # a SIGTERM from the NVML child's memory guard (the load can fill the host too)
        raise
    finally:
        nvml.stop()
    try:
        write_run(result, out.tmp)
    except OSError as exc:  # a full disk, a quota, a folder removed under the run
        where = f" ({exc.filename})" if exc.filename else ""
        raise KvscopeError(f"cannot write the run folder {out.final}: {os_reason(exc)}{where}; nothing was kept"
                           ) from None
    return result


def load_for(plan: RunPlan) -> tuple[torch.nn.Module, float]:
    """The model the plan's engine runs (kvscope's, or transformers': kvscope.engine.hf) and its seconds to load."""
    cfg, spec = plan.cfg, plan.spec
    if spec.engine == KVSCOPE_ENGINE:
        return load_model(plan.source, cfg.device, cfg.dtype, seed=spec.seed)
    return load_hf_model(plan.source, cfg.device, cfg.dtype, seed=spec.seed, attn=spec.attn)


def make_engine(model: torch.nn.Module, plan: RunPlan, ins: Instrument | None = None,
                tp: TensorParallel | None = None) -> Engine | HfEngine:
    """The loop `plan.spec.engine` names over `model` (from `load_for`); `tp`: a tensor-parallel rank's (kvscope's
    engine only, kvscope.measure.tp_run)."""
    if plan.spec.engine == KVSCOPE_ENGINE:
        return Engine(model, plan.cfg, ins, options=EngineOptions(graphs=plan.graphs, kernels=plan.kernels), tp=tp)
    return HfEngine(model, plan.cfg, ins, compiled=plan.spec.engine == HF_COMPILED_ENGINE, graphs=plan.graphs)


def measure(model: torch.nn.Module, plan: RunPlan, run_id: str, ready_s: float = math.nan,
            progress: ProgressFn | None = None, nvml: NvmlSampler | None = None,
            tp: TensorParallel | None = None) -> RunResult:
    """Warm up, then time `plan.spec.reps` repetitions of prefill + decode on an already loaded model. `nvml`: a
    sampler started earlier (before the model loaded); without one, one is started here, before the warm-up.
    `model`: from `load_for(plan)`; a transformers engine's hooks are removed from it on return."""
    spec, cfg = plan.spec, plan.cfg
    if nvml is None:
        nvml = NvmlSampler(cfg.device, spec.nvml_interval_ms)
    engine: Engine | HfEngine | None = None
    try:
        ins = Instrument(spec.granularity, cfg.device, nvtx=plan.nvtx)
        engine = make_engine(model, plan, ins, tp)
        gen = torch.Generator().manual_seed(spec.seed)
        vocab = tp.vocab_size if tp is not None else plan.source.args.vocab_size  # with tp, args are a rank's
        ids = torch.randint(0, vocab, (spec.batch_size, spec.seq), generator=gen)  # (B, S)
        prompt: Prompt = (ids.to(cfg.device), [spec.seq] * spec.batch_size)
        with ins.paused():
            for w in range(spec.warmup):
                engine.prefill(*prompt)
                engine.decode_n(spec.gen_tokens - 1)
                _sync(engine)  # named sync: between warm-up repetitions
                if progress:
                    progress("warm-up", w + 1, spec.warmup)
        if cfg.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(cfg.device)
        n_ops = len(OPS) + (len(COLLECTIVE_OPS) if tp is not None else 0)
        ins.reserve(regions_per_rep(ins, plan.source.args.n_layers, spec.gen_tokens, engine.graphs, n_ops) + 2)
        host, records = _timed_repetitions(engine, ins, nvml, plan, prompt, progress)
        timings = timings_frame(records, run_id, spec)
        summary = summary_row(timings, _facts(plan, engine, run_id, host, ready_s))
        summary.insert(summary.columns.get_loc("kernels") + 1, "engine", spec.engine)
        meta = run_metadata(plan, ins, nvml, ready_s, host, engine)
        return RunResult(Path(run_id), summary, timings, nvml.samples, meta)
    except BaseException:
        raise_guard_reason(nvml)
        raise
    finally:
        nvml.stop()  # idempotent: also when the warm-up fails (a sweep's out-of-memory point)
        if isinstance(engine, HfEngine):
            engine.remove_hooks()  # a sweep measures the same model again


def raise_guard_reason(nvml: NvmlSampler) -> None:
    """After an error or a signal: when the NVML child stopped this run because host memory ran out (SIGTERM, its
    reason written; `kvscope.profiler.host_memory`), that reason is the run's error, in one line. Else nothing."""
    nvml.stop()
    if nvml.stopped_run:
        raise KvscopeError(nvml.stopped_run) from None


def _repetition(engine: Engine | HfEngine, prompt: Prompt, steps: int) -> tuple[float, float]:
    """One measured prefill and `steps` decode steps; (host TTFT, host decode phase) in ms."""
    t0 = time.perf_counter_ns()
    first = engine.prefill(*prompt)
    # named sync: the first tokens copied to the host (what a user waits for) ends the host TTFT; it is also the
    # prefill/decode boundary that starts the host clock of the decode phase
    first.to("cpu")
    t1 = time.perf_counter_ns()
    engine.decode_n(steps)
    _sync(engine)  # named sync: end of the repetition, stops the host clock of the decode phase
    return (t1 - t0) / NS_PER_MS, (time.perf_counter_ns() - t1) / NS_PER_MS


def _sync(engine: Engine | HfEngine) -> None:
    if engine.cfg.device.type == "cuda":
        torch.cuda.synchronize()


def _timed_repetitions(engine: Engine | HfEngine, ins: Instrument, nvml: NvmlSampler, plan: RunPlan, prompt: Prompt,
                       progress: ProgressFn | None) -> tuple[HostClock, list[dict[str, Any]]]:
    """The measured repetitions, between cudaProfilerStart and cudaProfilerStop, with NVML's window open: their host
    clock and the instrument's records."""
    spec, cuda = plan.spec, plan.cfg.device.type == "cuda"
    host = HostClock(ttft_ms=[], decode_ms=[])
    records: list[dict[str, Any]] = []
    tp = getattr(engine, "tp", None)
    if tp is not None:
        tp.barrier()  # named sync: the ranks start their clocks and the capture range together
    ins.start_clock()
    nvml.start(ins.origin_host_ns)
    if cuda:
        torch.cuda.cudart().cudaProfilerStart()
    try:
        with ins.region(run_name(spec.batch_size, spec.seq, spec.gen_tokens), "run",
                        tokens=spec.batch_size * (spec.seq + spec.gen_tokens)):
            for r in range(spec.reps):
                with ins.region(rep_name(r), "rep", rep=r):
                    ttft_ms, decode_ms = _repetition(engine, prompt, spec.gen_tokens - 1)
                host.ttft_ms.append(ttft_ms)
                host.decode_ms.append(decode_ms)
                records += ins.collect()  # the rep is synchronised: resolve it, its events return to the pool
                if progress:
                    progress("measure", r + 1, spec.reps)
        if tp is not None:
            tp.barrier()  # named sync: no rank ends the capture range (cudaProfilerStop) while another still works
    finally:
        if cuda:
            torch.cuda.cudart().cudaProfilerStop()
        nvml.stop()  # closes the window, ends the child, reads its samples
    records += ins.collect()
    return host, records


def _facts(plan: RunPlan, engine: Engine | HfEngine, run_id: str, host: HostClock, ready_s: float) -> RunFacts:
    """What the summary needs besides the timings; the allocator's peaks are read here, after the repetitions."""
    spec, cfg = plan.spec, plan.cfg
    cuda = cfg.device.type == "cuda"
    kv = kv_cache_meta(engine)
    return RunFacts(
        run_id=run_id, model=plan.source.args.name, args=plan.source.args,
        dtype=dtype_name(cfg.dtype), itemsize=itemsize(cfg.dtype), attn=spec.attn,
        granularity=spec.granularity, device=plan.device_name, events_clock=CUDA_CLOCK if cuda else HOST_CLOCK,
        cuda_graphs=engine.graphs, kernels=engine.kernels, batch=spec.batch_size, seq_len=spec.seq,
        gen_tokens=spec.gen_tokens, reps=spec.reps, warmup=spec.warmup, host=host,
        peak_allocated_mib=torch.cuda.max_memory_allocated(cfg.device) / MIB_BYTES if cuda else math.nan,
        peak_reserved_mib=torch.cuda.max_memory_reserved(cfg.device) / MIB_BYTES if cuda else math.nan,
        kv_cache_bytes=kv["bytes"], kv_alloc_bytes=kv["alloc_bytes"], ready_s=ready_s,
        ceilings=plan.ceilings)


def regions_per_rep(ins: Instrument, n_layers: int, gen_tokens: int, graphs: bool = False,
                    n_ops: int = len(OPS)) -> int:
    """Timed regions one repetition opens at the instrument's granularity (to create their events ahead). With
    graphs, a decode step's layer and op regions are event nodes of the graph and take no pooled events."""
    timed = ins.timed_levels()
    units = 1 if graphs else gen_tokens  # the prefill, and gen_tokens - 1 decode steps when they run eagerly
    count = 0
    if "phase" in timed:
        count += 1 + len(PHASES) + (gen_tokens - 1)  # the rep, its phases, its decode steps
    if "layer" in timed:
        count += units * (n_layers + len(NAMED_LAYERS))  # the layers, and embed, lm_head, sample
    if "op" in timed:
        count += units * n_layers * n_ops  # with tensor parallelism, OPS and the COLLECTIVE_OPS
    return count
