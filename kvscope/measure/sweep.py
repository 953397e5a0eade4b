"""The sweep behind `kvscope sweep`: every (seq, batch) pair as one run, one model load for the whole sweep.

Every configuration is planned (`kvscope.engine.plan.prepare`) and `--out` checked before the model loads; each
finished configuration is appended to the sweep file at once and atomically (`kvscope.measure.sweep_file`, which
also says which settings every row records and when `--resume` refuses a file), by one sweep at a time
(`kvscope.measure.sweep_out`). Repeated values in `--seq` or `--batch-sizes` are measured once (a note says so).

Out of memory. A configuration whose allocation fails (`kvscope.measure.memory`) is recorded with `flag=oom`, its
memory is freed, and the sweep goes on; any other error stops the sweep. A configuration whose KV cache, with the
weights (and on the CPU the prompt), needs more bytes than the device has in all (on the CPU: physical memory, or the
cgroup limit when lower) is recorded as `oom` without being tried, so an absurd batch never makes the host swap or
wakes the OOM killer.

`flag` also marks collapse (with `collapse_factor` F): `latency-collapse` when the decode ms per token is more than
F times the best earlier configuration with the same batch (the sequence axis), `throughput-collapse` when decode
tokens/s is below the best earlier configuration with the same sequence length (the batch axis) divided by F. A
row's flag is set once, when it is appended, against the rows before it that ran (not `oom`) and measured a finite
positive value (a resumed file's rows are checked by the reader first: one it refuses is never compared with).

Under Nsight Systems (`--nsys [PATH]`, `kvscope.measure.sweep_nsys`): the same sweep runs as one program inside one
`nsys profile`, one report per configuration, and each row gains the attribution columns afterwards.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvscope.analysis.sweep_file import read_sweep
from kvscope.argtypes import INT64_MAX
from kvscope.engine.plan import RunPlan, RunSpec, prepare
from kvscope.errors import KvscopeError
from kvscope.measure.memory import allocation_failure, allocation_reason, bytes_needed, device_memory
from kvscope.measure.run import load_for, measure
from kvscope.measure.sweep_file import SweepFile, sweep_settings
from kvscope.measure.sweep_out import OutputLock, check_out
from kvscope.model.weights import load_model
from kvscope.schema import CLASSIC_COLUMNS, KVSCOPE_ENGINE, OOM_FLAG, is_oom

DEFAULT_COLLAPSE_FACTOR = 2.0
Say = Callable[[str], None]


@dataclass(frozen=True)
class SweepSpec:
    base: RunSpec  # model, gen_tokens, warmup, reps, granularity, attn, dtype, device, seed, graphs, kernels
    seqs: tuple[int, ...]
    batches: tuple[int, ...]
    out: Path
    collapse_factor: float = DEFAULT_COLLAPSE_FACTOR
    resume: bool = False
    nsys: NsysCapture | None = None  # --nsys: the sweep under Nsight Systems (kvscope.measure.sweep_nsys)


@dataclass(frozen=True)
class NsysCapture:
    """`--nsys [PATH]`, `--nsys-flag`, `--keep-reports` of `kvscope sweep`."""

    exe: str | None = None  # the nsys executable given; None: $NSYS, PATH, the usual install folders
    flags: tuple[str, ...] = ()  # extra `nsys profile` flags (kvscope.measure.nsys.extra_flags)
    keep_reports: bool = True  # keep each point's .nsys-rep and SQLite export beside its Parquet tables


def collapse_flags(df: pd.DataFrame, factor: float) -> list[str]:
    """The collapse flag of every row against the rows before it (see the module docstring)."""
    flags = []
    for i, row in enumerate(df.itertuples(index=False)):
        earlier = df.iloc[:i]
        earlier = earlier[~earlier["flag"].map(is_oom).to_numpy(bool)]
        marks = [f for f in str(row.flag or "").split(";") if f and "collapse" not in f]
        same_batch = _measured(earlier[earlier["batch"] == row.batch]["decode_p50_ms_per_tok"])
        if len(same_batch) and row.decode_p50_ms_per_tok > factor * same_batch.min():
            marks.append("latency-collapse")
        same_seq = _measured(earlier[earlier["seq_len"] == row.seq_len]["decode_tok_s"])
        if len(same_seq) and row.decode_tok_s < same_seq.max() / factor:
            marks.append("throughput-collapse")
        flags.append(";".join(marks))
    return flags


def _measured(values: pd.Series) -> pd.Series:
    """The finite positive values: a row's missing, zero, negative or infinite time or rate is no measure to compare
    a new point with (the reader refuses negative and infinite ones; a zero stays out here)."""
    v = pd.to_numeric(values, errors="coerce").astype("float64")
    return v[np.isfinite(v) & (v > 0)]


def run_sweep(sw: SweepSpec, progress: Callable[[int, int, str], None] | None = None, log: Say | None = None
              ) -> pd.DataFrame:
    """Run every configuration the sweep file does not hold yet, appending each as it finishes; the file's rows.
    In this process: `sw.nsys` is not looked at (`kvscope.measure.sweep_nsys.run_under_nsys` runs this function
    inside nsys)."""
    say = log or (lambda _m: None)
    fmt, path = check_out(sw.out)
    if not sw.collapse_factor > 1:
        raise KvscopeError(f"--collapse-factor must be > 1, got {sw.collapse_factor}")
    seqs = _unique(sw.seqs, "--seq", say)
    batches = _unique(sw.batches, "--batch-sizes", say)
    # every configuration is checked before the model is loaded
    plans = {(s, b): prepare(replace(sw.base, seq=s, batch_size=b, out=None)) for s in seqs for b in batches}
    first = next(iter(plans.values()))
    settings = sweep_settings(first, sw.collapse_factor)
    with OutputLock(path, sw.out, say):
        table = _open(sw, fmt, path, settings, say)
        finished = set(table.configs())
        todo = [c for c in plans if c not in finished]
        if not todo:
            say("every configuration is already in the file")
            return read_sweep(path)
        meta = {"sweep": {**settings, "seqs": _union(table.meta.get("seqs"), seqs),
                          "batches": _union(table.meta.get("batches"), batches),
                          "model_args": first.source.args.as_dict()}}
        model, ready_s = _load(first)
        say(f"{first.source.args.name} ready in {ready_s:.2f} s; {len(todo)} configuration(s) to run")
        memory = device_memory(first.cfg.device)
        for i, (s, b) in enumerate(todo):
            if progress:
                progress(i, len(todo), f"seq {s} batch {b}")
            row = _one(model, plans[(s, b)], ready_s, memory, say)
            _append(table, row, settings, sw, path, meta)
            if progress:
                progress(i + 1, len(todo), f"seq {s} batch {b}")
        return read_sweep(path)


def _open(sw: SweepSpec, fmt: str, path: Path, settings: dict[str, Any], say: Say) -> SweepFile:
    """The sweep file to append to: the one on disk when resuming (its settings checked), else a new one."""
    if path.exists():
        if not sw.resume:
            raise KvscopeError(f"{sw.out} exists; pass --resume to continue that sweep, or choose another file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise KvscopeError(f"--resume: {sw.out} is not readable and writable")
        table = SweepFile.read(path, sw.out)
        table.check_settings(settings)
        return table
    if sw.resume:
        say(f"--resume: {sw.out} does not exist yet, starting a new sweep")
    return SweepFile.new(fmt, sw.out)


def _load(plan: RunPlan) -> tuple[torch.nn.Module, float]:
    """The model, once for the whole sweep; out of memory here ends the sweep in one line."""
    try:
        if plan.spec.engine == KVSCOPE_ENGINE:
            return load_model(plan.source, plan.cfg.device, plan.cfg.dtype, seed=plan.spec.seed)
        return load_for(plan)  # transformers' model (--engine transformers*)
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise
        raise KvscopeError(f"cannot load {plan.source.args.name} on {plan.cfg.device}: out of memory "
                           f"({allocation_reason(exc)})") from None


def _append(table: SweepFile, row: pd.DataFrame, settings: dict[str, Any], sw: SweepSpec, path: Path,
            meta: dict[str, Any]) -> None:
    """Add one finished configuration, with the settings and its flag, and write the file before the next one
    starts."""
    for key, value in settings.items():
        row[key] = value
    row["flag"] = collapse_flags(pd.concat([table.numbers, row[table.numbers.columns]], ignore_index=True),
                                 sw.collapse_factor)[-1]
    kept = len(table.numbers)
    table.append(row)
    existed = path.exists()
    try:
        table.write(path, meta)
    except OSError as exc:
        after = f"the file is as it was, with {kept} configuration(s)" if existed else "no file was made"
        raise KvscopeError(f"cannot write {sw.out}: {exc.strerror or exc}; {after}") from None


def _unique(values: Sequence[int], flag: str, say: Say) -> tuple[int, ...]:
    if not values:
        raise KvscopeError(f"{flag}: empty list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= INT64_MAX:
            raise KvscopeError(f"{flag}: sizes must be positive 64-bit integers, got {v!r}")
    unique = tuple(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = [v for v in unique if values.count(v) > 1]
        say(f"{flag}: {', '.join(map(str, repeated))} given more than once; each configuration is measured once")
    return unique


def _union(saved: Any, values: Sequence[int]) -> list[int]:
    """The sizes of the file's metadata, then this sweep's new ones (first-seen order)."""
    earlier = [v for v in saved if isinstance(v, int)] if isinstance(saved, list) else []
    return list(dict.fromkeys([*earlier, *values]))


def _one(model: torch.nn.Module, plan: RunPlan, ready_s: float, memory: int | None, say: Say) -> pd.DataFrame:
    """The summary row of one configuration, or its `oom` row."""
    spec = plan.spec
    run_id = point_id(plan)
    what = f"seq {spec.seq} batch {spec.batch_size}"
    need = bytes_needed(plan)
    if need > (memory if memory is not None else INT64_MAX):
        has = f"{memory / 2**30:,.1f} GiB" if memory is not None else "any device"
        say(f"{what}: needs at least {need / 2**30:,.1f} GiB, more than {has}; recorded as oom without running")
        return _oom_row(spec, run_id)
    try:
        return measure(model, plan, run_id, ready_s).summary
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise
        say(f"{what}: out of memory ({allocation_reason(exc)}); recorded as oom")
        return _oom_row(spec, run_id)
    finally:
        gc.collect()
        if plan.cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def point_id(plan: RunPlan) -> str:
    """The `run_id` of a configuration's row: `<model>-bs<B>-seq<S>`."""
    return f"{plan.source.args.name}-bs{plan.spec.batch_size}-seq{plan.spec.seq}"


def _oom_row(spec: RunSpec, run_id: str) -> pd.DataFrame:
    row: dict[str, Any] = {c: math.nan for c in CLASSIC_COLUMNS}
    row.update({"seq_len": spec.seq, "batch": spec.batch_size, "flag": OOM_FLAG, "run_id": run_id,
                "engine": spec.engine})
    return pd.DataFrame([row])
