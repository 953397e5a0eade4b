"""kvscope from Python (notebooks): the commands as functions that return DataFrames.

    run(...)          `kvscope run`: measure, write the run folder, return it as a `Run`
    load_run(dir)     a run folder's timings, summary and NVML samples as DataFrames, its metadata as a dict
    load_export(path) an Nsight Systems export (SQLite, parquetdir, .nsys-rep) read into ranges, calls and GPU ops
    project(export)   every NVTX range projected onto the GPU (nsys's `nvtx_gpu_proj_trace`), one row per range
    align(export)     `kvscope align`'s tables (ranges, kernels, range summary, regions, steps, classes, overlap),
                      unwritten
    class_roofline(result, model)  each kernel class of an aligned export's steps against its roofline
    kv_math(model)    `kvscope kv-math --json`'s numbers as a dict
    serve(...)        `kvscope serve`: a served load measured and written, returned as a `Serve`
    load_serve(dir)   a serve folder's requests, iterations, batches, summary and memory ledger as DataFrames

The values of `run` and `kv_math` go through the command line's own parser (`kvscope.cli.parse_args`) and then the
commands' own code, so they have the same defaults, the same checks and the same one-line `KvscopeError` messages
as the commands (`run: argument --seq: invalid int value: 'x'`, `--batch-size must be an integer >= 1, got 0`); a
value is its flag's type or the flag's text, anything else (bytes, a list, None for a flag with a default) is refused
by its argument's name. The files and tables the other functions take get the checks of the commands that read them
(`kvscope report` for a run folder, `kvscope align` for timings, exports, filters, phase maps and class rules).
Bad input raises `KvscopeError`; nothing is printed.

Torch is imported only by `run`: everything else here reads files and works where torch is not installed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.align.class_roofline import class_roofline as _class_roofline
from kvscope.analysis.align.class_roofline import roofline_facts, roofline_request
from kvscope.analysis.align.kernel_classes import Rules
from kvscope.analysis.align.phase_map import PhaseMap
from kvscope.analysis.align.pipeline import AlignResult, analyse
from kvscope.analysis.align.ranks import analyse_ranks, refuse_rank_filters
from kvscope.analysis.diff.compare import DiffResult, check_threshold
from kvscope.analysis.diff.compare import diff as _diff
from kvscope.analysis.diff.gate import parse_gate
from kvscope.analysis.inputs import ALIGN_TIMINGS_COLUMNS, checked_timings, read_run, read_timings
from kvscope.analysis.nsys.export import NsysExport
from kvscope.analysis.nsys.export import load_export as _load_export
from kvscope.analysis.nsys.projection import project as _project
from kvscope.argtypes import TextArg
from kvscope.cli import parse_args
from kvscope.errors import KvscopeError
from kvscope.io import check_path
from kvscope.schema import NVML_FILE, SUMMARY_FILE, TIMINGS_FILE

__all__ = ["AlignResult", "NsysExport", "Run", "Serve", "align", "class_roofline", "diff", "kv_math", "load_export",
           "load_run", "load_serve", "project", "run", "serve"]

PathLike = str | os.PathLike[str]
# what a flag's argument may be, by the name messages give it: a value whose str() is its flag's text, which the
# command's parser reads (a number of either kind for a number, so that 1.5 for an integer gets the parser's message)
_PATH, _INT, _NUMBER, _TEXT = "a path (str or os.PathLike)", "an integer", "a number", "a str"
_NUMBERS = (int, float, np.integer, np.floating, str)
_TYPES: dict[str, tuple[type, ...]] = {_PATH: (str, os.PathLike), _INT: _NUMBERS, _NUMBER: _NUMBERS, _TEXT: (str,)}
_RUN_FLAGS = {"model": (_PATH, True), "batch_size": (_INT, False), "seq": (_INT, False), "gen_tokens": (_INT, False),
              "warmup": (_INT, False), "reps": (_INT, False), "granularity": (_TEXT, False), "attn": (_TEXT, True),
              "dtype": (_TEXT, True), "device": (_TEXT, True), "seed": (_INT, False), "engine": (_TEXT, False),
              "nvml_interval_ms": (_NUMBER, False), "out": (_PATH, True)}  # name: (type, None allowed)
_KV_MATH_FLAGS = {"model": (_PATH, False), "batch_size": (_INT, False), "seq": (_INT, False), "dtype": (_TEXT, True),
                  "kv_dtype": (_TEXT, True), "gpu_mem_gb": (_NUMBER, True), "reserve_gb": (_NUMBER, False),
                  "rps": (_NUMBER, True), "latency_s": (_NUMBER, True), "page_size": (_INT, True)}
# the tables of a loaded export (kvscope.analysis.nsys.export.NsysExport), and those of their columns that hold ids
# and times (integers without gaps)
_EXPORT_COLUMNS = {
    "ranges": ("range_id", "name", "domain", "style", "global_tid", "end_global_tid", "pid", "tid", "start_ns",
               "end_ns", "closed", "category", "payload"),
    "calls": ("corr", "pid", "global_tid", "start_ns", "end_ns", "name"),
    "gpu_ops": ("kind", "start_ns", "end_ns", "device", "stream", "corr", "pid", "name", "short_name",
                "demangled_name", "graph_node_id", "bytes"),
}
_EXPORT_INTS = frozenset({"range_id", "global_tid", "end_global_tid", "pid", "tid", "start_ns", "end_ns", "corr",
                          "device", "stream"})


@dataclass(frozen=True, eq=False)
class Run:
    """A kvscope run folder, read.

    path: the run folder (for a `kvscope nsys` output folder, its `run/` subfolder).
    timings: `timings.parquet`, one row per timed region, as on disk.
    summary: `summary.parquet`, one row, as on disk (columns: docs/architecture.md).
    nvml: `nvml.parquet`, the GPU's samples; None where the run had no NVML (a CPU run).
    metadata: the run's metadata (device, versions, the run's options, host clocks...), the JSON every file carries.
    """

    path: Path
    timings: pd.DataFrame
    summary: pd.DataFrame
    nvml: pd.DataFrame | None
    metadata: dict[str, Any]

    def __repr__(self) -> str:
        nvml = "None" if self.nvml is None else f"<{len(self.nvml)} rows>"
        return (f"Run(path={str(self.path)!r}, timings=<{len(self.timings)} rows>, "
                f"summary=<{len(self.summary)} rows>, nvml={nvml}, metadata=<{len(self.metadata)} keys>)")


def run(model: PathLike | None = None, *, batch_size: int = 1, seq: int = 512, gen_tokens: int = 32, warmup: int = 2,
        reps: int = 5, granularity: str = "phase", attn: str | None = None, dtype: str | None = None,
        device: str | None = None, seed: int = 0, graphs: bool | None = None, kernels: bool | None = None,
        prefill_graphs: bool | None = None, engine: str = "kvscope", nvtx: bool | None = None,
        nvml_interval_ms: float = 20.0, out: PathLike | None = None) -> Run:
    """`kvscope run`: warm up, time `reps` repetitions of a prefill of `seq` tokens per sequence and `gen_tokens - 1`
    decode steps, write the run folder, and return it read back (`load_run`).

    Every argument is the flag of the same name (`batch_size` is `--batch-size`), with the same default; None leaves
    the choice to the device as the command does (model: `qwen2.5-3b` on CUDA, `tiny` on a CPU; dtype: bfloat16 on
    CUDA, float32 on a CPU; graphs, prefill graphs and kernels: on for CUDA; attn: kvscope's split-KV decode
    attention where kvscope's kernels run, else sdpa). `engine`: "kvscope", "transformers" or
    "transformers-compiled" (`--engine`). `nvtx`: False is `--no-nvtx`, None lets
    `KVSCOPE_NVTX` decide, True turns NVTX ranges on whatever it says. `out`: the run folder, new or empty (default
    `traces/<time>-<model>-bs<B>-seq<L>/` under the current folder). Raises KvscopeError for bad input before
    anything is loaded or written; a run that fails leaves no folder behind.
    """
    for name, value in (("graphs", graphs), ("kernels", kernels), ("prefill_graphs", prefill_graphs), ("nvtx", nvtx)):
        if value is not None and not isinstance(value, bool):
            raise KvscopeError(f"run: {name} must be True, False or None, got {value!r}")
    flags = _flags("run", _RUN_FLAGS, model=model, batch_size=batch_size, seq=seq, gen_tokens=gen_tokens,
                   warmup=warmup, reps=reps, granularity=granularity, attn=attn, dtype=dtype, device=device, seed=seed,
                   engine=engine, nvml_interval_ms=nvml_interval_ms, out=out)
    argv = _argv("run", **flags, graphs=_on_off(graphs), kernels=_on_off(kernels),
                 prefill_graphs=_on_off(prefill_graphs))
    if nvtx is False:
        argv.append("--no-nvtx")
    ns = parse_args(argv)
    # the measuring side imports torch: only here
    from kvscope.measure.options import run_spec
    from kvscope.measure.run import execute

    spec = run_spec(ns)
    if nvtx is True:
        spec = replace(spec, nvtx=True)
    return load_run(execute(spec).out_dir)


def load_run(path: PathLike) -> Run:
    """A run folder written by `kvscope run` (or `kvscope.run`), or a `kvscope nsys` output folder (its `run/`
    subfolder is read). The tables are returned as they are on disk, after `kvscope report`'s checks: each file is
    the one its name says, the timings are physical (finite start times, durations finite and >= 0, each region
    once), and every file (summary, timings, nvml, rank_summary) is of the same run (its `run_id` and metadata).
    Raises KvscopeError for a folder that is not a run folder, a file that cannot be read or fails those checks, or a
    summary without kvscope's metadata."""
    run = read_run(_path(path, "load_run", "path"))
    if run.metadata is None:
        raise KvscopeError(f"{run.path / SUMMARY_FILE} has no kvscope metadata (not written by kvscope run)")
    files = run.files
    return Run(run.path, files[TIMINGS_FILE], files[SUMMARY_FILE], files.get(NVML_FILE), run.metadata)


def load_export(path: PathLike, *, nsys: str | None = None) -> NsysExport:
    """An Nsight Systems export: a `.sqlite` (`nsys export --type sqlite`), a parquetdir folder, or an `.nsys-rep`
    (exported through nsys: `nsys`, or $NSYS, PATH and the usual install folders). The result holds three DataFrames,
    `ranges` (every NVTX range of every domain), `calls` (CUDA API calls) and `gpu_ops` (kernels, copies, memsets),
    and the export's metadata (`nsys_version`, `schema_version`)."""
    return _load_export(_path(path, "load_export", "path"), nsys=_nsys(nsys, "load_export"))


def project(export: NsysExport | PathLike, *, nsys: str | None = None) -> pd.DataFrame:
    """Every NVTX range of `export` (a loaded export, or a path as `load_export` takes) projected onto the GPU with
    the semantics of nsys's `nvtx_gpu_proj_trace`: one row per range, with `gpu_start_ns`, `gpu_end_ns` (NA where
    the range launched no GPU work), `gpu_busy_ns` (the union of its operations' intervals), `gpu_ops`, its nesting
    (`level`, `parent_id`, `range_stack`), thread, domain and name. The same table as `ranges.parquet` of
    `kvscope align`."""
    exp, exe = _export(export, "project"), _nsys(nsys, "project")
    return _project(exp if isinstance(exp, NsysExport) else _load_export(exp, nsys=exe)).ranges


def align(export: NsysExport | PathLike, timings: PathLike | Run | pd.DataFrame | None = None, *,
          phase_map: str | Mapping[str, str] | PhaseMap | None = None, domain: str | None = None,
          range_re: str | None = None, start_ns: int | None = None, end_ns: int | None = None, pid: int | None = None,
          classes: PathLike | Rules | None = None, nsys: str | None = None) -> AlignResult:
    """`kvscope align EXPORT [--timings RUN] [filters]` without writing anything, on any export (a path as
    `load_export` takes, or a loaded export).

    timings: the kvscope run profiled in the export (a run folder, a `Run`, or its timings table, checked as
    `--timings` is), joined with the ranges in the NVTX domain `kvscope`; a tensor-parallel run's (a `rank` column)
    rank by rank, as the command does (the filters are refused with them). A loaded export must still have the
    tables and columns `load_export` gave it. Filters (`--domain`, `--range`, `--start`/`--end`, `--pid`): `domain`
    keeps one NVTX domain ("" the default one), `range_re` the ranges whose name matches (re.search),
    `start_ns`/`end_ns` a window on the export's clock, `pid` one process. `phase_map` (`--phase-map`:
    "prefill=RE,decode=RE,step=RE,layer=RE" or a dict of those keys) labels another engine's ranges so the step
    table and the class breakdown work on them; `classes` (`--classes`): a TOML/JSON file of kernel-class rules
    tried before the built-in ones.

    The result's DataFrames are the tables the command writes: always `ranges` (ranges.parquet: every kept range
    projected onto the GPU), `kernels` (kernels.parquet) and `range_summary` (range_summary.parquet); `regions`
    (align.parquet: CUDA-event time vs projected GPU span per region), `steps` (steps.parquet: GPU busy and idle per
    prefill and decode step) and `classes` (kernel_classes.parquet), each None when skipped, `skipped` saying why;
    `tables()` maps file names to the tables; `export` is the loaded export. Raises KvscopeError with the command's
    messages."""
    exp, exe = _export(export, "align"), _nsys(nsys, "align")
    # the filters, the phase map and the classes are checked by the analysis (types too), with the command's messages
    table = _timings(timings)
    if table is not None and "rank" in table:  # a tensor-parallel run: each rank on its own, as the command does
        used = [f for f, v in (("--domain", domain), ("--range", range_re), ("--start", start_ns), ("--end", end_ns),
                               ("--pid", pid), ("--classes", classes)) if v is not None]
        refuse_rank_filters(used, timings.path if isinstance(timings, Run) else
                            "the timings DataFrame" if isinstance(timings, pd.DataFrame) else timings)
        return analyse_ranks(exp, table, nsys=exe, phase_map=phase_map)[0]
    return analyse(exp, table, nsys=exe, domain=domain, range_re=range_re, start_ns=start_ns, end_ns=end_ns, pid=pid,
                   phase_map=phase_map, classes=classes)


def class_roofline(result: AlignResult, model: PathLike | None = None, *, timings: PathLike | Run | None = None,
                   dtype: str | None = None, batch: int | None = None, seq: int | None = None, ctx: int | None = None,
                   ceilings: str | None = None) -> pd.DataFrame:
    """`kvscope align`'s class_roofline.parquet for an `align` result: each kernel class of its prefill and decode
    steps with its modelled bytes and FLOPs, achieved rates and share of `ceilings` ("GB_S,TFLOP_S", as
    `--ceilings`). The model: `model` (a preset, a checkpoint folder or a config.json), else the run folder
    `timings` (its metadata); the shape from the export's kvscope run range, else `batch` and `seq` (a foreign
    export needs them; `ctx` the decode context). Raises KvscopeError with the command's messages, and where the
    command would skip the table (no model, no labelled step) says why."""
    if not isinstance(result, AlignResult):
        raise KvscopeError(f"class_roofline: result must be an AlignResult (from kvscope.align), got "
                           f"{_type_name(result)}")
    run_dir = timings.path if isinstance(timings, Run) else (_path(timings, "class_roofline", "timings")
                                                              if timings is not None else None)
    request = roofline_request(str(model) if model is not None else None, dtype, batch, seq, ctx, ceilings,
                               run_dir=run_dir)
    facts, note = roofline_facts(result, request)
    if facts is None or result.steps is None:
        raise KvscopeError(note or "class_roofline: no model (pass model, or timings with the run folder)")
    return _class_roofline(result.steps, result.kernels, facts)


def kv_math(model: PathLike, batch_size: int = 1, seq: int = 0, dtype: str | None = None, kv_dtype: str | None = None,
            gpu_mem_gb: float | None = None, reserve_gb: float = 1.0, rps: float | None = None,
            latency_s: float | None = None, page_size: int | None = None) -> dict[str, Any]:
    """`kvscope kv-math --json`: KV-cache bytes per token, per request and in total, weights, logits, the decode
    workspace; with `gpu_mem_gb` the budget and the largest batch and context that fit it; with `rps` and
    `latency_s` Little's-law concurrency; with `page_size` paged-cache waste. Exact integers (formulas:
    `kvscope/analysis/kv_math.py`). `seq` 0 is the model's maximum context; `dtype` None the model's (bf16 for
    presets); `kv_dtype` (bf16, fp16, fp8, fp32) None the same as `dtype`. Torch-free."""
    ns = parse_args(_argv("kv-math", **_flags("kv_math", _KV_MATH_FLAGS, model=model, batch_size=batch_size, seq=seq,
                                              dtype=dtype, kv_dtype=kv_dtype, gpu_mem_gb=gpu_mem_gb,
                                              reserve_gb=reserve_gb, rps=rps, latency_s=latency_s,
                                              page_size=page_size)))
    from kvscope.measure.kv_math import compute

    return compute(ns)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _argv(command: str, **flags: object) -> list[str]:
    """The command line of `command` with `--flag=value` for every flag that is not None (`batch_size` ->
    `--batch-size`). `=` keeps a value that starts with "-" a value; `str` of an int or a float reads back as the
    same number, so the parser sees exactly what was passed."""
    argv = [command]
    for name, value in flags.items():
        if value is not None:
            argv.append(f"--{name.replace('_', '-')}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
    return argv


def _on_off(value: bool | None) -> str | None:
    return None if value is None else ("on" if value else "off")


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _flags(function: str, kinds: dict[str, tuple[str, bool]], **values: object) -> dict[str, object]:
    """`values` checked against `kinds` (name: (type, None allowed)): each its flag's type or its text (a str, which
    the command's parser reads as it reads the command line); anything else is a KvscopeError naming the argument."""
    for name, value in values.items():
        kind, optional = kinds[name]
        if value is None and optional:
            continue
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if value is None or not isinstance(text, _TYPES[kind]) or isinstance(text, bytes):
            raise KvscopeError(f"{function}: {name} must be {kind}{' or None' if optional else ''}, got "
                               f"{_type_name(text if isinstance(text, bytes) else value)}")
    return values


def _path(value: object, function: str, name: str, also: str = "") -> Path:
    """A path argument: a str or os.PathLike, not empty, no NUL (what the command line's paths must be); `also` names
    what else the argument may be, for the message."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise KvscopeError(f"{function}: {name} must be a path (str or os.PathLike){' ' + also if also else ''}, got "
                           f"{_type_name(value)}")
    try:
        path = Path(TextArg()(value))
    except argparse.ArgumentTypeError as exc:
        raise KvscopeError(f"{function}: {name} {exc}") from None
    check_path(path, f"{function}: {name}")  # a name too long, a loop of links...: one line, as the command's
    return path


def _nsys(value: object, function: str) -> str | None:
    """The `nsys` argument (`--nsys`): None, or the nsys executable's path or name, as given (`./nsys` is not
    `nsys` on PATH)."""
    if value is None:
        return None
    _path(value, function, "nsys", "or None")
    return str(os.fspath(value) if isinstance(value, os.PathLike) else value)


def _export(value: object, function: str) -> NsysExport | Path:
    """An export argument: a path (as `load_export` takes it), or a loaded export whose tables still have the columns
    `load_export` gave them, ids and times as integers without gaps (a table changed after loading is refused)."""
    if not isinstance(value, NsysExport):
        return _path(value, function, "export", "or a loaded export (kvscope.load_export)")
    for table, columns in _EXPORT_COLUMNS.items():
        df = getattr(value, table)
        if not isinstance(df, pd.DataFrame):
            raise KvscopeError(f"{function}: export.{table} must be a DataFrame (as load_export made it), got "
                               f"{_type_name(df)}")
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise KvscopeError(f"{function}: export.{table} lacks column(s) {', '.join(missing)} (changed after "
                               "load_export?)")
        for col in (c for c in columns if c in _EXPORT_INTS):
            if not pd.api.types.is_integer_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]) or df[col].hasnans:
                raise KvscopeError(f"{function}: export.{table} column {col} holds {df[col].dtype} values"
                                   f"{' with gaps' if df[col].hasnans else ''}, not whole numbers (changed after "
                                   "load_export?)")
    return value


def _timings(value: object) -> pd.DataFrame | None:
    """The `timings` argument read and checked as `kvscope align --timings` reads a run folder: a folder (or a Run,
    read from its folder) or a timings table (checked alike, named "the timings DataFrame")."""
    if value is None:
        return None
    if isinstance(value, pd.DataFrame):
        return checked_timings(value, "the timings DataFrame", ALIGN_TIMINGS_COLUMNS)
    folder = value.path if isinstance(value, Run) else _path(value, "align", "timings",
                                                             "or a Run, a DataFrame or None")
    return read_timings(folder, ALIGN_TIMINGS_COLUMNS)


# ---- a served load ----------------------------------------------------------------------------------------------
_SERVE_FLAGS = {"model": (_PATH, True), "rps": (_NUMBER, True), "concurrency": (_INT, True),
                "request_file": (_PATH, True), "prompt_len": (_TEXT, False), "output_len": (_TEXT, False),
                "requests": (_INT, True), "duration": (_NUMBER, True), "policy": (_TEXT, False),
                "preempt": (_TEXT, False), "max_batch_tokens": (_INT, False), "max_seqs": (_INT, False),
                "max_seq": (_INT, True), "block_size": (_INT, False), "kv_pool_gb": (_NUMBER, True),
                "kv_pool_frac": (_NUMBER, False), "slo_ttft_ms": (_NUMBER, True), "slo_tpot_ms": (_NUMBER, True),
                "granularity": (_TEXT, False), "dtype": (_TEXT, True), "device": (_TEXT, True), "seed": (_INT, False),
                "nvml_interval_ms": (_NUMBER, False), "out": (_PATH, True)}


@dataclass
class Serve:
    """A serve folder read back: one row per request, per iteration, per (iteration, request), the one-row summary,
    the memory ledger, and the metadata (`meta["serve"]` holds the load's settings)."""

    path: Path
    requests: pd.DataFrame
    iterations: pd.DataFrame
    batches: pd.DataFrame
    summary: pd.DataFrame
    memory: pd.DataFrame
    metadata: dict[str, Any]


def serve(model: PathLike | None = None, *, rps: float | None = None, concurrency: int | None = None,
          request_file: PathLike | None = None, prompt_len: str = "512", output_len: str = "128",
          requests: int | None = None, duration: float | None = None, policy: str = "chunked",
          preempt: str = "recompute", max_batch_tokens: int = 2048, max_seqs: int = 64, max_seq: int | None = None,
          block_size: int = 16, kv_pool_gb: float | None = None, kv_pool_frac: float = 0.5,
          slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None, granularity: str = "phase",
          dtype: str | None = None, device: str | None = None, seed: int = 0, graphs: bool | None = None,
          kernels: bool | None = None, nvml_interval_ms: float = 20.0, out: PathLike | None = None) -> Serve:
    """`kvscope serve` for one point (one rate or concurrency, one policy): build, warm up, drive the load, write the
    serve folder and return it read back (`load_serve`). Every argument is the flag of the same name
    (`duration` is `--duration` in seconds). Raises KvscopeError for bad input before anything loads."""
    for name, value in (("graphs", graphs), ("kernels", kernels)):
        if value is not None and not isinstance(value, bool):
            raise KvscopeError(f"serve: {name} must be True, False or None, got {value!r}")
    flags = _flags("serve", _SERVE_FLAGS, model=model, rps=rps, concurrency=concurrency, request_file=request_file,
                   prompt_len=prompt_len, output_len=output_len, requests=requests, duration=duration, policy=policy,
                   preempt=preempt, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, max_seq=max_seq,
                   block_size=block_size, kv_pool_gb=kv_pool_gb, kv_pool_frac=kv_pool_frac, slo_ttft_ms=slo_ttft_ms,
                   slo_tpot_ms=slo_tpot_ms, granularity=granularity, dtype=dtype, device=device, seed=seed,
                   nvml_interval_ms=nvml_interval_ms, out=out)
    ns = parse_args(_argv("serve", **flags, graphs=_on_off(graphs), kernels=_on_off(kernels)))
    from kvscope.measure.serve.execute import execute_serve  # imports torch: only here
    from kvscope.measure.serve.spec import serve_points

    points = serve_points(ns)
    if len(points) != 1:
        raise KvscopeError("serve: one rate, concurrency and policy at a time (a sweep is `kvscope serve` with lists)")
    return load_serve(execute_serve(points[0]).out_dir)


def load_serve(path: PathLike) -> Serve:
    """A serve folder written by `kvscope serve` (or `kvscope.serve`), after the report's checks."""
    from kvscope.analysis.serving.records import read_serve_run

    run = read_serve_run(_path(path, "load_serve", "path"))
    summary = pd.read_parquet(run.path / SUMMARY_FILE) if (run.path / SUMMARY_FILE).is_file() else pd.DataFrame()
    return Serve(run.path, run.requests, run.iterations, run.batches, summary, run.ledger, run.metadata)


# ---- two measurements compared ---------------------------------------------------------------------------------
def diff(a: PathLike, b: PathLike, *, threshold: float = 2.0, fail_if: str | list[str] | None = None,
         allow_different: bool = False) -> DiffResult:
    """`kvscope diff A B` without writing anything: two run folders, two captures (align or nsys folders, nsys
    exports), two sweep files or two served loads (`kvscope serve` run folders) compared row by row (docs/diff.md).

    The result's `table` is diff.parquet's: one row per quantity both sides may hold (regions by level and name,
    steps by index, kernel classes and names with their launches, sweep points by their keys), with `a`, `b`, `diff`,
    `diff_pct`, the 95% interval of B / A (`ci_low_pct`, `ci_high_pct`), `verdict` (faster, slower, same, cannot tell)
    and `reason`, the largest changes first; `waterfall` says where the step's time moved. `threshold`: the band of
    `same` in % (`--threshold`). `fail_if`: gates as `--fail-if` takes them ("slower:3%", "slower:5%:decode class
    gemm"): their answers are in `result.gates` (code, row, message), their exit code in `result.exit_code`.
    `allow_different`: compare different models, dtypes or shapes, every verdict "cannot tell" (refused otherwise).
    Raises KvscopeError with the command's messages."""
    if not isinstance(allow_different, bool):
        raise KvscopeError(f"diff: allow_different must be True or False, got {_type_name(allow_different)}")
    texts = [fail_if] if isinstance(fail_if, str) else fail_if or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise KvscopeError(f"diff: fail_if must be a str, a list of str or None, got {_type_name(fail_if)}")
    gates = [parse_gate(t) for t in texts]
    pa, pb = _path(a, "diff", "a"), _path(b, "diff", "b")
    result = _diff(pa, pb, check_threshold(threshold, "diff: threshold"), allow_different)
    return result.with_gates(gates)

