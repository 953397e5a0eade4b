"""A run's folder: its files (timings.parquet, summary.parquet, nvml.parquet when NVML is present, trace.json) and
the metadata they carry. (The folder is written whole or not at all by `kvscope.io.AtomicFolder`.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvscope.analysis.summary import HostClock
from kvscope.engine.hf import HfEngine
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunPlan, RunSpec
from kvscope.io import write_json, write_parquet
from kvscope.model.dtypes import dtype_name
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.nvml import NvmlSampler
from kvscope.schema import CUDA_CLOCK, NVML_FILE, SUMMARY_FILE, TIMING_COLUMNS, TIMINGS_FILE, TRACE_FILE

OUT_LABEL = "output folder"  # how messages name the folder of a run (its AtomicFolder label)
_TRACE_TIDS = {"run": 0, "rep": 0, "phase": 1, "step": 2, "layer": 3, "op": 4}


@dataclass
class RunResult:
    out_dir: Path
    summary: pd.DataFrame
    timings: pd.DataFrame
    nvml: pd.DataFrame | None
    metadata: dict[str, Any]


def default_out_dir(plan: RunPlan) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = plan.source.args.name.replace("/", "_")
    return Path("traces") / f"{stamp}-{name}-bs{plan.spec.batch_size}-seq{plan.spec.seq}"


def write_run(result: RunResult, folder: Path) -> None:
    """The run folder's files: timings, summary, NVML samples (when present) and the Chrome trace."""
    write_parquet(result.timings, folder / TIMINGS_FILE, result.metadata)
    write_parquet(result.summary, folder / SUMMARY_FILE, result.metadata)
    if result.nvml is not None:
        write_parquet(result.nvml, folder / NVML_FILE, result.metadata)
    write_json(chrome_trace(result.timings, result.nvml, result.metadata), folder / TRACE_FILE)


def timings_frame(records: list[dict[str, Any]], run_id: str, spec: RunSpec) -> pd.DataFrame:
    """timings.parquet: one row per timed region (the instrument's records), in start order, with the run's keys;
    layer and op rows carry the context length and token count of the phase or step they belong to."""
    df = pd.DataFrame.from_records(records, columns=[c for c in TIMING_COLUMNS if c not in
                                                     ("run_id", "batch", "seq_len", "gen_tokens")])
    df = df.sort_values("start_ms", kind="stable").reset_index(drop=True)
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
    return df[list(TIMING_COLUMNS)]


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def kv_cache_meta(engine: Engine | HfEngine) -> dict[str, Any]:
    """The run's KV cache as measured: bytes, allocated bytes, shape (a transformers engine adds its cache class)."""
    if isinstance(engine, HfEngine):
        return engine.kv_cache_meta()
    return {"bytes": engine.cache.nbytes, "alloc_bytes": engine.kv_alloc_bytes, "shape": list(engine.cache.data.shape)}


def common_metadata(plan: RunPlan, ins: Instrument, nvml: NvmlSampler, engine: str) -> dict[str, Any]:
    """What every kvscope measurement's metadata holds (a run's and a served load's): versions, command, device,
    driver, model, dtype, the engine's name, the clock, NVTX and NVML."""
    from kvscope import __version__

    source = plan.source
    return {
        "kvscope_version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": _git_revision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": plan.device_name,
        "driver": nvml.driver or None,
        "model": {"source": source.kind, "spec": source.spec, "random_weights": source.random_weights,
                  "args": source.args.as_dict()},
        "dtype": dtype_name(plan.cfg.dtype),
        "engine": engine,
        "clock": ins.clock if ins.timing else "none",
        "nvtx": {"requested": ins.nvtx_requested, "active": ins.nvtx_active},
        "nvml": nvml.metadata(),
    }


def run_metadata(plan: RunPlan, ins: Instrument, nvml: NvmlSampler, ready_s: float, host: HostClock,
                 engine: Engine | HfEngine) -> dict[str, Any]:
    """The run's metadata, JSON under the key `kvscope` of every Parquet file and in the trace."""
    cfg = plan.cfg
    return {
        **common_metadata(plan, ins, nvml, plan.spec.engine),
        "run": asdict(plan.spec),
        "max_seq": cfg.max_seq,
        "ready_s": ready_s,
        "host_ttft_ms": host.ttft_ms,
        "host_decode_ms": host.decode_ms,
        "kv_cache": kv_cache_meta(engine),
        "cuda_graphs": engine.graphs,
        "prefill_graphs": cfg.prefill_graphs,
        "kernels": engine.kernels,
        # how regions inside a captured decode step are timed: global-timer stamps written by kernels, or
        # event-record nodes (None: nothing is timed inside the graph)
        "graph_region_timing": (("stamps" if engine.kernels else "events")
                                if engine.graphs and ins.graph_timed() else None),
    }


def chrome_trace(t: pd.DataFrame, nvml: pd.DataFrame | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Chrome trace-event JSON of the timed regions (opens in Perfetto / chrome://tracing), NVML as counters."""
    clock = meta.get("clock", CUDA_CLOCK)
    title = "kvscope CUDA events (device clock)" if clock == CUDA_CLOCK else "kvscope host clock"
    # a tensor-parallel run (a `rank` column): one process per rank, rank r as pid 100 + r
    ranks = [int(x) for x in sorted(t["rank"].unique())] if "rank" in t.columns else [None]
    events: list[dict[str, Any]] = []
    for rank in ranks:
        pid = 1 if rank is None else 100 + rank
        events.append({"ph": "M", "pid": pid, "name": "process_name",
                       "args": {"name": title if rank is None else f"{title}, rank {rank}"}})
        for lvl, tid in (("run / rep", 0), ("phase", 1), ("decode step", 2), ("layer", 3), ("op", 4)):
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": lvl}})
    pids = t["rank"].to_numpy() + 100 if "rank" in t.columns else np.ones(len(t), dtype=np.int64)
    for pid, r in zip(pids, t.itertuples(index=False), strict=True):
        args = {k: (None if pd.isna(v) else (int(v) if isinstance(v, (int, np.integer)) else v))
                for k, v in (("rep", r.rep), ("step", r.step), ("layer", r.layer), ("op", r.op),
                             ("host_enqueue_ms", r.host_enqueue_ms))}
        events.append({"ph": "X", "pid": int(pid), "tid": _TRACE_TIDS[r.level], "name": r.name, "cat": r.level,
                       "ts": r.start_ms * 1e3, "dur": r.dur_ms * 1e3, "args": args})
    if nvml is not None and len(nvml):
        events.append({"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "NVML (host clock)"}})
        for row in nvml.itertuples(index=False):
            values = {"util_pct": row.gpu_util_pct, "power_w": row.power_w, "sm_clock_mhz": row.sm_clock_mhz}
            name = "gpu" if "rank" not in nvml.columns else f"gpu rank {int(row.rank)}"
            events.append({"ph": "C", "pid": 2, "name": name, "ts": row.t_ms * 1e3,
                           "args": {k: float(v) for k, v in values.items() if pd.notna(v)}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"kvscope": json.dumps(meta, default=str)}}
