"""`kvscope run`: an instrumented prefill + decode run, written as a run folder.

A run loads the model once, warms up (regions paused), then times `reps` repetitions of one prefill of `seq` tokens
per sequence followed by `gen_tokens - 1` decode steps (the prefill yields the first new token). The measured
repetitions sit between `cudaProfilerStart` and `cudaProfilerStop`, so an nsys capture with
`--capture-range=cudaProfilerApi` holds them alone.

Host syncs, all outside the timed regions' device work: one before the first repetition (the time origin), one at the
prefill/decode boundary (the copy of the first token to the host: it ends the host-clock TTFT and starts the host
clock of the decode phase), one at the end of every repetition (ends that clock), and one in `Instrument.collect()`
after the measured region.

NVML is sampled by a child process (`kvscope.profiler.nvml`) started before the model loads: nothing of it runs in
this process while the repetitions are timed.

Files, written into a temporary folder that is renamed into place only when everything is written:
`timings.parquet`, `summary.parquet`, `nvml.parquet` (when NVML is present), `trace.json`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvscope.analysis.kvmath import kv_bytes_per_token
from kvscope.argtypes import INT64_MAX, NVML_INTERVAL_MAX_MS, UINT64_MAX
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig, parse_dtype, resolve_device
from kvscope.errors import KvscopeError
from kvscope.io import write_json, write_parquet
from kvscope.model.weights import ModelSource, load_model, resolve_model
from kvscope.profiler.instrument import GRANULARITIES, Instrument
from kvscope.profiler.nvml import NvmlSampler

DEFAULT_MODEL_CUDA = "qwen2.5-3b"
DEFAULT_MODEL_CPU = "tiny"
MB = 2**20
# fewest samples for a percentile to be reported (else NaN): a p99 of 5 samples is their maximum, not a p99
PERCENTILE_MIN_SAMPLES = {90: 10, 99: 100}
# interquartile range over median (%) above which a phase is flagged as spread (host-bound: launches, drift)
SPREAD_FLAG_PCT = 10.0

# columns of summary.parquet that every sweep shares, in this order (../shared/design.md)
CLASSIC_COLUMNS = ("seq_len", "batch", "prefill_p50_ms", "prefill_ms_per_tok", "prefill_tok_s",
                   "decode_p50_ms_per_tok", "decode_tok_s", "total_tok_s", "vram_reserved_mb", "flag")


@dataclass(frozen=True)
class RunSpec:
    model: str | None = None
    batch_size: int = 1
    seq: int = 512
    gen_tokens: int = 32
    warmup: int = 2
    reps: int = 5
    granularity: str = "phase"
    attn: str = "sdpa"
    dtype: str | None = None
    device: str | None = None
    out: str | None = None
    nvtx: bool | None = None  # None: KVSCOPE_NVTX decides
    nvml_interval_ms: float = 20.0
    seed: int = 0
    graphs: bool | None = None  # decode steps replayed from a CUDA graph; None: on for CUDA
    kernels: bool | None = None  # kvscope's CUDA kernels (RMSNorm, SiLU*up, RoPE + cache write); None: on for CUDA


@dataclass
class RunResult:
    out_dir: Path
    summary: pd.DataFrame
    timings: pd.DataFrame
    nvml: pd.DataFrame | None
    metadata: dict[str, Any]


ProgressFn = Callable[[str, int, int], None]


def _check_spec(spec: RunSpec) -> None:
    for name, value, low in (("--batch-size", spec.batch_size, 1), ("--seq", spec.seq, 1),
                             ("--gen-tokens", spec.gen_tokens, 1), ("--reps", spec.reps, 1),
                             ("--warmup", spec.warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise KvscopeError(f"{name} must be an integer >= {low}, got {value!r}")
        if value > INT64_MAX:
            raise KvscopeError(f"{name} must fit in 64 bits (at most {INT64_MAX}), got {value}")
    if not isinstance(spec.seed, int) or not 0 <= spec.seed <= UINT64_MAX:
        raise KvscopeError(f"--seed must be an integer from 0 to {UINT64_MAX}, got {spec.seed!r}")
    if spec.granularity not in GRANULARITIES:
        raise KvscopeError(f"unknown granularity {spec.granularity!r}; choose from {', '.join(GRANULARITIES)}")
    if not spec.nvml_interval_ms > 0:
        raise KvscopeError(f"--nvml-interval-ms must be positive, got {spec.nvml_interval_ms}")
    if not spec.nvml_interval_ms <= NVML_INTERVAL_MAX_MS:  # also inf; nan failed above
        raise KvscopeError(f"--nvml-interval-ms must be at most {NVML_INTERVAL_MAX_MS:,.0f} ms, got "
                           f"{spec.nvml_interval_ms}")
    if spec.out is not None and not str(spec.out).strip():
        raise KvscopeError(f"--out must not be empty, got {spec.out!r} (leave it out for the default folder)")


def check_warmup(spec: RunSpec, device: torch.device) -> None:
    """On CUDA the first repetition would hold the kernels' compilation and the decode graph's capture: at least one
    warm-up repetition is required there."""
    if device.type == "cuda" and spec.warmup < 1:
        raise KvscopeError("--warmup 0 on CUDA would time the kernels' compilation and the CUDA-graph capture in the "
                           "first repetition; use --warmup 1 or more")


def use_graphs(graphs: bool | None, device: torch.device) -> bool:
    """Whether decode steps replay a CUDA graph: `--graphs on|off` (True/False), by default (None) on for CUDA. At
    layer or op granularity the graph carries marks for those regions: timestamps the kernels write, or event-record
    nodes with kernels off (see Engine._capture)."""
    if graphs is None:
        return device.type == "cuda"
    if graphs and device.type != "cuda":
        raise KvscopeError("--graphs on needs a CUDA device")
    return graphs


def use_kernels(kernels: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the engine runs kvscope's hand-written CUDA kernels (RMSNorm, SiLU*up, RoPE fused with the cache
    write) instead of the same maths in torch operations: `--kernels on|off`, by default (None) on for CUDA."""
    from kvscope.kernels.launch import nvrtc_compiler
    from kvscope.kernels.ops import supported

    on = device.type == "cuda" if kernels is None else kernels
    if on and not supported(device, dtype):
        raise KvscopeError(f"--kernels on needs a CUDA device and float32/bfloat16/float16, got {device} "
                           f"{str(dtype).removeprefix('torch.')}")
    if on:
        nvrtc_compiler()  # a torch without it stops here, before the run
    return on


def prepare(spec: RunSpec) -> tuple[ModelSource, RunConfig]:
    """Every check of a run's input that needs no model weights: sizes, granularity, device, model, context."""
    _check_spec(spec)
    device = resolve_device(spec.device)
    check_warmup(spec, device)
    use_graphs(spec.graphs, device)  # checks --graphs against the device
    model_spec = spec.model or (DEFAULT_MODEL_CUDA if device.type == "cuda" else DEFAULT_MODEL_CPU)
    source = resolve_model(model_spec)
    dtype = parse_dtype(spec.dtype, device)
    cfg = RunConfig(spec.batch_size, spec.seq + spec.gen_tokens, dtype, device, spec.attn)
    use_kernels(spec.kernels, device, dtype)  # checks --kernels against the device and dtype
    if spec.seq > source.args.max_position_embeddings:
        raise KvscopeError(f"--seq {spec.seq} exceeds {source.args.name}'s maximum context of "
                           f"{source.args.max_position_embeddings}")
    cfg.check(source.args)
    if device.type == "cuda":
        from kvscope.profiler.calibrate import load_ceilings

        load_ceilings(_device_name(device))  # an unusable calibration cache stops the run here, not after it
    return source, cfg


def default_out_dir(source: ModelSource, spec: RunSpec) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = source.args.name.replace("/", "_")
    return Path("traces") / f"{stamp}-{name}-bs{spec.batch_size}-seq{spec.seq}"


class OutputFolder:
    """A temporary sibling folder that becomes `final` on `commit()`, and is removed (with any parent folders it
    created) otherwise, so a failed run leaves nothing behind."""

    def __init__(self, final: Path) -> None:
        self.final = final
        if final.is_symlink():  # the final rename would replace the link, not fill the folder it points to
            raise KvscopeError(f"output folder {final} is a symbolic link; give the folder's own path")
        if final.exists() and not final.is_dir():
            what = "a file" if final.is_file() else "not a folder"
            raise KvscopeError(f"output folder {final} already exists and is {what}; give a new or empty folder")
        try:
            filled = final.exists() and any(final.iterdir())
        except OSError as exc:
            raise KvscopeError(f"output folder {final} cannot be read: {exc.strerror or exc}") from None
        if filled:
            raise KvscopeError(f"output folder {final} already exists and is not empty")
        ancestor = final.parent
        self.created: list[Path] = []
        while not ancestor.exists():
            self.created.append(ancestor)
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise KvscopeError(f"output folder {final} cannot be written ({ancestor} is not a writable folder)")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            # unique per folder object, not only per process: two runs (or two OutputFolders) never share one
            self.tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            self.tmp.mkdir()
        except OSError as exc:
            self.discard()
            raise KvscopeError(f"output folder {final} cannot be written: {exc.strerror or exc}") from None

    def commit(self) -> Path:
        """Rename the temporary folder to `final`. rename(2) replaces an empty folder and refuses any other, so when
        another run filled `final` meanwhile (two `kvscope run --out SAME` at once) its folder stays as it is, this
        run's temporary folder is removed, and a KvscopeError says so."""
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.discard()
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise KvscopeError(f"output folder {self.final} was filled by another run while this one ran; "
                                   "that folder is kept and this run's files were discarded") from None
            raise KvscopeError(f"output folder {self.final} cannot be written: {exc.strerror or exc}; this run's "
                               "files were discarded") from None
        return self.final

    def discard(self) -> None:
        tmp = getattr(self, "tmp", None)
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in self.created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def execute(spec: RunSpec, progress: ProgressFn | None = None, log: Callable[[str], None] | None = None
            ) -> RunResult:
    """Validate, run and write one configuration. Raises KvscopeError for bad input before any file is made."""
    source, cfg = prepare(spec)
    out = OutputFolder(Path(spec.out) if spec.out else default_out_dir(source, spec))
    say = log or (lambda _msg: None)
    if spec.model is None:
        say(f"no --model given: using the {source.spec} preset (random weights) on {cfg.device.type}")
    try:
        result = _measure(spec, source, cfg, out, progress, say)
        result.out_dir = out.commit()
        return result
    except BaseException:
        out.discard()
        raise


def _measure(spec: RunSpec, source: ModelSource, cfg: RunConfig, out: OutputFolder, progress: ProgressFn | None,
             say: Callable[[str], None]) -> RunResult:
    nvml = NvmlSampler(cfg.device, spec.nvml_interval_ms)  # its own process, started before the model loads
    try:
        model, ready_s = load_model(source, cfg.device, cfg.dtype, seed=spec.seed)
        say(f"{source.args.name} ready in {ready_s:.2f} s on {cfg.device} ({str(cfg.dtype).removeprefix('torch.')})")
        result = measure(model, spec, source, cfg, out.final.name, ready_s, progress, nvml=nvml)
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise
        raise KvscopeError(_allocation_message(exc, spec, source, cfg)) from None
    finally:
        nvml.stop()
    try:
        write_run(result, out.tmp)
    except OSError as exc:  # a full disk, a quota, a folder removed under the run
        reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise KvscopeError(f"cannot write the run folder {out.final}: {reason}{where}; nothing was kept") from None
    return result


_ALLOCATION_MARKS = ("can't allocate memory", "out of memory", "storage size calculation overflowed")
_ASKED = re.compile(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ [KMGTP]?i?B)", re.IGNORECASE)


def allocation_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: CUDA out of memory, the CPU allocator refusing ("can't allocate
    memory"), a tensor size beyond 64 bits ("Storage size calculation overflowed"), or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(mark in text for mark in _ALLOCATION_MARKS)


def _allocation_message(exc: BaseException, spec: RunSpec, source: ModelSource, cfg: RunConfig) -> str:
    """One line: the batch and sequence, the bytes the failed allocation asked for, what the KV cache needs."""
    found = _ASKED.search(str(exc))
    if found and found.group(1):
        asked = f"an allocation of {int(found.group(1)):,} bytes failed"
    elif found:
        asked = f"an allocation of {found.group(2)} failed"
    elif "overflow" in str(exc).lower():
        asked = "a tensor size beyond 64 bits was asked for"
    else:
        asked = "an allocation failed"
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    kv = kv_bytes_per_token(source.args, itemsize) * spec.batch_size * cfg.max_seq
    return (f"out of memory on {cfg.device} for --batch-size {spec.batch_size} --seq {spec.seq} (--gen-tokens "
            f"{spec.gen_tokens}): {asked}; the KV cache alone takes {kv:,} bytes")


def write_run(result: RunResult, folder: Path) -> None:
    """The run folder's files: timings, summary, NVML samples (when present) and the Chrome trace."""
    write_parquet(result.timings, folder / "timings.parquet", result.metadata)
    write_parquet(result.summary, folder / "summary.parquet", result.metadata)
    if result.nvml is not None:
        write_parquet(result.nvml, folder / "nvml.parquet", result.metadata)
    write_json(chrome_trace(result.timings, result.nvml, result.metadata), folder / "trace.json")


def measure(model: torch.nn.Module, spec: RunSpec, source: ModelSource, cfg: RunConfig, run_id: str,
            ready_s: float = math.nan, progress: ProgressFn | None = None, nvml: NvmlSampler | None = None
            ) -> RunResult:
    """Warm up, then time `spec.reps` repetitions of prefill + decode on an already loaded model. `nvml`: a
    sampler started earlier (before the model loaded); without one, one is started here, before the warm-up."""
    if nvml is None:
        nvml = NvmlSampler(cfg.device, spec.nvml_interval_ms)
    try:
        device, cuda = cfg.device, cfg.device.type == "cuda"
        ins = Instrument(spec.granularity, device, nvtx=spec.nvtx)
        engine = Engine(model, cfg, ins, graphs=use_graphs(spec.graphs, device),
                        kernels=use_kernels(spec.kernels, device, cfg.dtype))
        gen = torch.Generator().manual_seed(spec.seed)
        prompt = torch.randint(0, source.args.vocab_size, (spec.batch_size, spec.seq), generator=gen)  # (B, S)
        tokens, lengths = prompt.to(device), [spec.seq] * spec.batch_size
        steps = spec.gen_tokens - 1
        sync = torch.cuda.synchronize if cuda else (lambda *_: None)

        with ins.paused():
            for w in range(spec.warmup):
                engine.prefill(tokens, lengths)
                engine.decode_n(steps)
                sync()  # named sync: between warm-up repetitions
                if progress:
                    progress("warm-up", w + 1, spec.warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        ins.reserve(regions_per_rep(ins, source.args.n_layers, spec.gen_tokens, engine.graphs) + 2)
        host_decode_ms: list[float] = []
        host_ttft_ms: list[float] = []
        records: list[dict[str, Any]] = []
        run_name = f"run bs={spec.batch_size} seq={spec.seq} gen={spec.gen_tokens}"
        ins.start_clock()
        nvml.start(ins.origin_host_ns)
        if cuda:
            torch.cuda.cudart().cudaProfilerStart()
        try:
            with ins.region(run_name, "run", tokens=spec.batch_size * (spec.seq + spec.gen_tokens)):
                for r in range(spec.reps):
                    with ins.region(f"rep {r}", "rep", rep=r):
                        t0 = time.perf_counter_ns()
                        first = engine.prefill(tokens, lengths)
                        # named sync: the first tokens copied to the host (what a user waits for) ends the host TTFT; it
                        # is also the prefill/decode boundary that starts the host clock of the decode phase
                        first.to("cpu")
                        t1 = time.perf_counter_ns()
                        host_ttft_ms.append((t1 - t0) / 1e6)
                        t0 = t1
                        engine.decode_n(steps)
                        sync()  # named sync: end of the repetition, stops the host clock of the decode phase
                        host_decode_ms.append((time.perf_counter_ns() - t0) / 1e6)
                    records += ins.collect()  # the rep is synchronised: resolve it, its events return to the pool
                    if progress:
                        progress("measure", r + 1, spec.reps)
        finally:
            if cuda:
                torch.cuda.cudart().cudaProfilerStop()
            nvml.stop()  # closes the window, ends the child, reads its samples
        records += ins.collect()

        timings = _timings_frame(records, run_id, spec)
        mem = _memory(device, cuda)
        weights_bytes = source.args.param_count() * torch.empty((), dtype=cfg.dtype).element_size()
        host = HostClock(ttft_ms=host_ttft_ms, decode_ms=host_decode_ms)
        summary = _summary(timings, spec, run_id, source, cfg, engine, mem, host, ready_s, weights_bytes)
        meta = _metadata(spec, source, cfg, ins, nvml, ready_s, host, engine)
        nvml_df = nvml.samples
        return RunResult(Path(run_id), summary, timings, nvml_df, meta)
    finally:
        nvml.stop()  # idempotent: also when the warm-up fails (a sweep's out-of-memory point)


def regions_per_rep(ins: Instrument, n_layers: int, gen_tokens: int, graphs: bool = False) -> int:
    """Timed regions one repetition opens at the instrument's granularity (to create their events ahead). With
    graphs, a decode step's layer and op regions are event nodes of the graph and take no pooled events."""
    timed = ins.timed_levels()
    units = 1 if graphs else gen_tokens  # the prefill, and gen_tokens - 1 decode steps when they run eagerly
    count = 0
    if "phase" in timed:
        count += 1 + 2 + (gen_tokens - 1)  # rep, prefill, decode, steps
    if "layer" in timed:
        count += units * (n_layers + 3)  # layers, embed, lm_head, sample
    if "op" in timed:
        count += units * n_layers * 7
    return count


_TIMING_COLUMNS = ("run_id", "rep", "level", "phase", "step", "layer", "op", "name", "start_ms", "dur_ms",
                   "host_enqueue_ms", "clock", "batch", "seq_len", "gen_tokens", "context_len", "tokens")


def _timings_frame(records: list[dict[str, Any]], run_id: str, spec: RunSpec) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=[c for c in _TIMING_COLUMNS if c not in
                                                     ("run_id", "batch", "seq_len", "gen_tokens")])
    df = df.sort_values("start_ms", kind="stable").reset_index(drop=True)
    # layer and op rows carry the context length and token count of the phase or step they belong to
    owner = df["level"].isin(["phase", "step"]) & ~((df["level"] == "phase") & (df["phase"] == "decode"))
    keys = ["rep", "phase", "step"]
    fill = df.loc[owner, [*keys, "context_len", "tokens"]].rename(
        columns={"context_len": "_ctx", "tokens": "_tok"})
    inner = df["level"].isin(["layer", "op"])
    merged = df.loc[inner, keys].merge(fill, on=keys, how="left")
    df.loc[inner, "context_len"] = merged["_ctx"].to_numpy()
    df.loc[inner, "tokens"] = merged["_tok"].to_numpy()
    df.insert(0, "run_id", run_id)
    df["batch"] = spec.batch_size
    df["seq_len"] = spec.seq
    df["gen_tokens"] = spec.gen_tokens
    for col in ("rep", "step", "layer", "context_len", "tokens"):
        df[col] = df[col].astype("Int64")
    for col in ("level", "phase", "op", "name", "clock", "run_id"):
        df[col] = df[col].astype("string")
    for col in ("start_ms", "dur_ms", "host_enqueue_ms"):
        df[col] = df[col].astype("float64")
    return df[list(_TIMING_COLUMNS)]


def _memory(device: torch.device, cuda: bool) -> dict[str, float]:
    if not cuda:
        return {"peak_allocated_mb": math.nan, "peak_reserved_mb": math.nan}
    return {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / MB,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MB}


@dataclass(frozen=True)
class HostClock:
    """Per-repetition host-clock times: `ttft_ms` from the call that starts the prefill to its first tokens on the
    host, `decode_ms` of the decode phase (synchronised at both ends)."""

    ttft_ms: list[float]
    decode_ms: list[float]


def percentile(values: pd.Series | list[float] | np.ndarray, q: float) -> float:
    """The q-th percentile of the finite values, or NaN when there are too few of them for it (p90 needs 10
    samples, p99 100: PERCENTILE_MIN_SAMPLES); medians and quartiles need one."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    need = max((n for p, n in PERCENTILE_MIN_SAMPLES.items() if q >= p), default=1)
    return float(np.percentile(arr, q)) if arr.size >= need else math.nan


def spread(values: pd.Series | list[float] | np.ndarray) -> dict[str, float | bool]:
    """Quartiles, interquartile range over the median (%), and whether that exceeds SPREAD_FLAG_PCT."""
    q1, q2, q3 = (percentile(values, q) for q in (25, 50, 75))
    iqr_pct = (q3 - q1) / q2 * 100 if q2 > 0 else math.nan
    return {"q1": q1, "median": q2, "q3": q3, "iqr_pct": iqr_pct, "wide": bool(iqr_pct > SPREAD_FLAG_PCT)}


def _dispersion(prefix: str, values: pd.Series | list[float] | np.ndarray) -> dict[str, Any]:
    """`<prefix>_q1_ms`, `_q3_ms`, `_p90_ms`, `_p99_ms`, `_iqr_pct`, `_samples` of one set of samples."""
    arr = np.asarray(values, dtype=np.float64)
    sp = spread(arr)
    return {f"{prefix}_q1_ms": sp["q1"], f"{prefix}_q3_ms": sp["q3"], f"{prefix}_p90_ms": percentile(arr, 90),
            f"{prefix}_p99_ms": percentile(arr, 99), f"{prefix}_iqr_pct": sp["iqr_pct"],
            f"{prefix}_samples": int(np.isfinite(arr).sum())}


def _summary(t: pd.DataFrame, spec: RunSpec, run_id: str, source: ModelSource, cfg: RunConfig, engine: Engine,
             mem: dict[str, float], host: HostClock, ready_s: float, weights_bytes: int) -> pd.DataFrame:
    """One row; every column with its unit and clock is documented in docs/architecture.md ("summary.parquet")."""
    b, s, g = spec.batch_size, spec.seq, spec.gen_tokens
    prefill_ev = t.loc[t["level"] == "phase"].loc[lambda d: d["phase"] == "prefill", "dur_ms"].to_numpy()
    steps_ev = t.loc[t["level"] == "step", "dur_ms"].to_numpy()
    reps_ev = t.loc[t["level"] == "rep", "dur_ms"].to_numpy()
    step_sums = t.loc[t["level"] == "step"].groupby("rep")["dur_ms"].sum()
    host_ttft = np.asarray(host.ttft_ms, dtype=np.float64)
    host_decode = np.asarray(host.decode_ms, dtype=np.float64)
    host_steps = host_decode / (g - 1) if g > 1 else np.array([], dtype=np.float64)
    timed = spec.granularity != "none"
    # the clock of the classic prefill / decode / TPOT columns: the timed regions (CUDA events, or the host clock
    # around each region on a CPU), or with --granularity none the host clock synchronised per phase
    clock = ("cuda" if cfg.device.type == "cuda" else "host") if timed else "host"
    prefill = prefill_ev if timed else host_ttft
    steps = steps_ev if timed else host_steps
    rep_ms = reps_ev if timed else host_ttft + host_decode
    prefill_p50, decode_p50, rep_p50 = percentile(prefill, 50), percentile(steps, 50), percentile(rep_ms, 50)
    host_s = pd.Series(host.decode_ms, index=range(len(host.decode_ms)), dtype="float64")
    if len(step_sums):
        gap = ((host_s - step_sums.reindex(host_s.index).astype("float64")).abs() / host_s * 100).max()
    else:
        gap = math.nan
    ttft_sp, tpot_sp = spread(host_ttft), spread(steps)
    spread_flag = ",".join(name for name, sp in (("ttft", ttft_sp), ("tpot", tpot_sp)) if sp["wide"])
    row: dict[str, Any] = {
        "seq_len": s, "batch": b,
        "prefill_p50_ms": prefill_p50,
        "prefill_ms_per_tok": prefill_p50 / (b * s),
        "prefill_tok_s": b * s / (prefill_p50 / 1e3),
        "decode_p50_ms_per_tok": decode_p50,
        "decode_tok_s": b / (decode_p50 / 1e3),
        "total_tok_s": b * (s + g) / (rep_p50 / 1e3),
        "vram_reserved_mb": mem["peak_reserved_mb"],
        "flag": "",
        "run_id": run_id, "model": source.args.name, "dtype": str(cfg.dtype).removeprefix("torch."),
        "attn": spec.attn, "granularity": spec.granularity, "device": _device_name(cfg.device),
        "cuda_graphs": engine.graphs, "kernels": engine.kernels,
        "gen_tokens": g, "decode_steps": g - 1, "reps": spec.reps, "warmup": spec.warmup,
        "clock": clock,
        "ttft_ms": ttft_sp["median"], **_dispersion("ttft", host_ttft),
        "prefill_gpu_ms": percentile(prefill_ev, 50), **_dispersion("prefill_gpu", prefill_ev),
        "tpot_p50_ms": decode_p50, **_dispersion("tpot", steps),
        "spread_flag": spread_flag,
        "rep_p50_ms": rep_p50,
        "decode_host_p50_ms": percentile(host_decode, 50),
        "decode_events_p50_ms": percentile(step_sums, 50),
        "decode_host_vs_events_max_pct": gap,
        "peak_allocated_mb": mem["peak_allocated_mb"], "peak_reserved_mb": mem["peak_reserved_mb"],
        "kv_cache_bytes": engine.cache.nbytes, "kv_alloc_bytes": engine.kv_alloc_bytes,
        "kv_predicted_bytes": kv_bytes_per_token(source.args, engine.cache.data.element_size()) * b * (s + g),
        "weights_bytes": weights_bytes, "ready_s": ready_s,
    }
    row.update(_roofline_columns(t, source, cfg))
    df = pd.DataFrame([row])
    for col in ("seq_len", "batch", "gen_tokens", "decode_steps", "reps", "warmup", "kv_cache_bytes",
                "kv_alloc_bytes", "kv_predicted_bytes", "weights_bytes", "ttft_samples", "prefill_gpu_samples",
                "tpot_samples"):
        df[col] = df[col].astype("int64")
    return df


def _roofline_columns(t: pd.DataFrame, source: ModelSource, cfg: RunConfig) -> dict[str, float]:
    """decode_mbu / prefill_mfu: medians against the cached ceilings of this GPU (NaN when not calibrated)."""
    from kvscope.analysis.roofline import roofline
    from kvscope.profiler.calibrate import load_ceilings

    nan = {"decode_mbu": math.nan, "prefill_mfu": math.nan, "decode_gb_s": math.nan, "prefill_tflop_s": math.nan}
    timed = t[t["level"].isin(["phase", "step"])]
    if not len(timed):
        return nan
    ceilings = load_ceilings(_device_name(cfg.device)) if cfg.device.type == "cuda" else None
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    r = roofline(timed, source.args, itemsize, itemsize, ceilings)
    dec, pre = r[r["phase"] == "decode"], r[r["phase"] == "prefill"]
    return {"decode_mbu": percentile(dec["mbu"], 50) if ceilings else math.nan,
            "prefill_mfu": percentile(pre["mfu"], 50) if ceilings else math.nan,
            "decode_gb_s": percentile(dec["achieved_gb_s"], 50),
            "prefill_tflop_s": percentile(pre["achieved_tflop_s"], 50)}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _metadata(spec: RunSpec, source: ModelSource, cfg: RunConfig, ins: Instrument, nvml: NvmlSampler,
              ready_s: float, host: HostClock, engine: Engine) -> dict[str, Any]:
    from kvscope import __version__

    return {
        "kvscope_version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": _git_revision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": _device_name(cfg.device),
        "driver": nvml.driver or None,
        "model": {"source": source.kind, "spec": source.spec, "random_weights": source.random_weights,
                  "args": source.args.as_dict()},
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "run": asdict(spec),
        "max_seq": cfg.max_seq,
        "clock": ins.clock if ins.timing else "none",
        "nvtx": {"requested": ins.nvtx_requested, "active": ins.nvtx_active},
        "nvml": nvml.metadata(),
        "ready_s": ready_s,
        "host_ttft_ms": host.ttft_ms,
        "host_decode_ms": host.decode_ms,
        "kv_cache": {"bytes": engine.cache.nbytes, "alloc_bytes": engine.kv_alloc_bytes,
                     "shape": list(engine.cache.data.shape)},
        "cuda_graphs": engine.graphs,
        "kernels": engine.kernels,
        # how regions inside a captured decode step are timed: global-timer stamps written by kernels, or
        # event-record nodes (None: nothing is timed inside the graph)
        "graph_region_timing": (("stamps" if engine.kernels else "events")
                                if engine.graphs and ins.graph_timed() else None),
    }


_TRACE_TIDS = {"run": 0, "rep": 0, "phase": 1, "step": 2, "layer": 3, "op": 4}


def chrome_trace(t: pd.DataFrame, nvml: pd.DataFrame | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Chrome trace-event JSON of the timed regions (opens in Perfetto / chrome://tracing), NVML as counters."""
    clock = meta.get("clock", "cuda")
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "name": "process_name",
         "args": {"name": "kvscope CUDA events (device clock)" if clock == "cuda" else "kvscope host clock"}},
    ]
    for lvl, tid in (("run / rep", 0), ("phase", 1), ("decode step", 2), ("layer", 3), ("op", 4)):
        events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": lvl}})
    for r in t.itertuples(index=False):
        args = {k: (None if pd.isna(v) else (int(v) if isinstance(v, (int, np.integer)) else v))
                for k, v in (("rep", r.rep), ("step", r.step), ("layer", r.layer), ("op", r.op),
                             ("host_enqueue_ms", r.host_enqueue_ms))}
        events.append({"ph": "X", "pid": 1, "tid": _TRACE_TIDS[r.level], "name": r.name, "cat": r.level,
                       "ts": r.start_ms * 1e3, "dur": r.dur_ms * 1e3, "args": args})
    if nvml is not None and len(nvml):
        events.append({"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "NVML (host clock)"}})
        for row in nvml.itertuples(index=False):
            values = {"util_pct": row.gpu_util_pct, "power_w": row.power_w, "sm_clock_mhz": row.sm_clock_mhz}
            events.append({"ph": "C", "pid": 2, "name": "gpu", "ts": row.t_ms * 1e3,
                           "args": {k: float(v) for k, v in values.items() if pd.notna(v)}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"kvscope": json.dumps(meta, default=str)}}
