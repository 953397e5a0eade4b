"""`kvscope run --tp N`: the run of `kvscope.measure.run` with the model split over N ranks (kvscope.model.tp,
kvscope.engine.tp), started by torchrun or spawned (kvscope.measure.tp_launch). Every rank measures as a one-GPU run
does (its own instrument, NVML sampler and summary row, with its part of the model); rank 0 gathers the ranks'
results (`gather_object`) and writes one run folder:

- timings.parquet, nvml.parquet: every rank's rows, with a `rank` column (each rank's clock starts at its own
  origin: durations compare across ranks, start times only roughly);
- rank_summary.parquet: one summary row per rank (`rank` first; bytes and roofline are the rank's part);
- summary.parquet: the merged row (`merge_summary`): the slowest rank's row (largest TPOT), the slowest TTFT and
  prefill over the ranks, and the per-step skew between ranks.

Only rank 0 (or the launching process) prints.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from kvscope.engine.plan import RunPlan, RunSpec, prepare
from kvscope.engine.tp import TensorParallel, launched_by_torchrun
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, write_parquet
from kvscope.measure.memory import allocation_failure, allocation_message
from kvscope.measure.output import OUT_LABEL, RunResult, default_out_dir, write_run
from kvscope.measure.run import measure
from kvscope.measure.tp_launch import RankContext, check_plan, run_ranks
from kvscope.model.tp import ShardPlan
from kvscope.model.weights import load_model
from kvscope.profiler.nvml import NvmlSampler
from kvscope.schema import COLLECTIVE_OPS, RANK_SUMMARY_FILE

# merged summary columns besides those of the slowest rank's row
MERGED_COLUMNS = ("tp", "rank", "slowest_rank", "ttft_max_ms", "ttft_slowest_rank", "step_skew_p50_ms",
                  "step_skew_max_ms", "allreduce_share_pct")


def execute_tp(spec: RunSpec, tp: int, log: Callable[[str], None] | None = None) -> RunResult | None:
    """Validate, run over `tp` ranks and write one run folder; None in a torchrun rank other than 0."""
    plan = prepare(spec)
    check_plan(plan, tp)
    writer = not launched_by_torchrun() or os.environ.get("RANK") == "0"
    out = AtomicFolder(Path(spec.out) if spec.out else default_out_dir(plan), OUT_LABEL) if writer else None
    say = log or (lambda _msg: None)
    if writer and spec.model is None:
        say(f"no --model given: using the {plan.source.spec} preset (random weights) on {plan.cfg.device.type}")
    try:
        ranked = run_ranks(tp, plan.cfg.device, rank_run, plan, str(out.open()) if out else None,
                           out.final.name if out else "")
        if out is None:
            return None
        result: RunResult = ranked.value
        result.out_dir = out.commit()
        return result
    except BaseException:
        if out is not None:
            out.discard()
        raise


def rank_plan(plan: RunPlan, shard: ShardPlan, device: torch.device) -> RunPlan:
    """One rank's plan: its device, and its part of the model's numbers (what its summary row describes)."""
    return replace(plan, source=replace(plan.source, args=shard.local), cfg=replace(plan.cfg, device=device))


def rank_run(ctx: RankContext, plan: RunPlan, out_tmp: str | None, run_id: str) -> RunResult | None:
    """One rank's run; rank 0 gathers every rank's result, merges and writes them into `out_tmp`."""
    shard = ShardPlan(plan.source.args, ctx.tp, ctx.rank)
    rplan = rank_plan(plan, shard, ctx.device)
    nvml = NvmlSampler(ctx.device, plan.spec.nvml_interval_ms)  # before the model loads, as in a one-GPU run
    try:
        model, ready_s = load_model(plan.source, ctx.device, plan.cfg.dtype, seed=plan.spec.seed, shard=shard)
        if ctx.rank == 0:
            print(f"kvscope: {plan.source.args.name} ready in {ready_s:.2f} s on {ctx.tp} ranks "
                  f"({plan.cfg.device.type})", file=sys.stderr)
        result = measure(model, rplan, run_id, ready_s, nvml=nvml, tp=TensorParallel(shard))
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failure(exc):
            raise
        raise KvscopeError(f"rank {ctx.rank}: {allocation_message(exc, rplan)}") from None
    finally:
        nvml.stop()
    results: list[RunResult] | None = [] if ctx.rank == 0 else None
    if results is not None:
        results.extend([result] * ctx.tp)  # placeholders, replaced by the gather
    dist.gather_object(result, results, dst=0)
    if results is None:
        return None
    merged, ranks = merge_ranks(results, plan)
    if out_tmp is not None:
        try:
            write_run(merged, Path(out_tmp))
            write_parquet(ranks, Path(out_tmp) / RANK_SUMMARY_FILE, merged.metadata)
        except OSError as exc:
            raise KvscopeError(f"cannot write the run folder: {exc.strerror or exc}; nothing was kept") from None
    return merged


def with_rank(df: pd.DataFrame, rank: int, after: str | None = None) -> pd.DataFrame:
    """A copy of `df` with an int64 `rank` column (after column `after`, else first)."""
    out = df.copy()
    out.insert(out.columns.get_loc(after) + 1 if after in out.columns else 0, "rank",
               np.full(len(out), rank, dtype=np.int64))
    return out


def merge_ranks(results: list[RunResult], plan: RunPlan) -> tuple[RunResult, pd.DataFrame]:
    """The ranks' results as one (rows with their rank, the merged summary, rank 0's metadata with the split) and
    the summary rows of every rank."""
    tp = len(results)
    timings = pd.concat([with_rank(r.timings, i, "run_id") for i, r in enumerate(results)], ignore_index=True)
    nvml_parts = [with_rank(r.nvml, i) for i, r in enumerate(results) if r.nvml is not None]
    nvml = pd.concat(nvml_parts, ignore_index=True) if nvml_parts else None
    ranks = pd.concat([with_rank(r.summary, i) for i, r in enumerate(results)], ignore_index=True)
    summary = merge_summary(ranks, timings)
    meta = dict(results[0].metadata)
    meta["model"] = {**meta["model"], "args": plan.source.args.as_dict()}
    cuda = plan.cfg.device.type == "cuda"
    meta["tp"] = {"tp": tp, "backend": "nccl" if cuda else "gloo",
                  "nccl_version": _nccl_version() if cuda else None,
                  # the NCCL settings the ranks ran under (NCCL_NVLS_ENABLE=0 keeps NVLink multicast off)
                  "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
                  "rank_args": results[0].metadata["model"]["args"],
                  "kv_cache_bytes_per_rank": [int(r.summary["kv_cache_bytes"].iloc[0]) for r in results]}
    return RunResult(results[0].out_dir, summary, timings, nvml, meta), ranks


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()  # a tuple (major, minor, patch); an int in older torch
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def step_skew(timings: pd.DataFrame) -> pd.Series:
    """Per decode step (rep, step): the largest minus the smallest step time over the ranks (ms)."""
    steps = timings[(timings["level"] == "step") & timings["dur_ms"].notna()]
    if steps.empty:
        return pd.Series(dtype="float64")
    spread = steps.groupby(["rep", "step"])["dur_ms"].agg(["max", "min"])
    return (spread["max"] - spread["min"]).astype("float64")


def allreduce_share(timings: pd.DataFrame, rank: int) -> float:
    """Percentage of rank `rank`'s decode-step time spent in its layers' all-reduces (op granularity; else NaN)."""
    mine = timings[(timings["rank"] == rank) & (timings["phase"] == "decode")]
    steps = mine.loc[mine["level"] == "step", "dur_ms"].sum()
    comm = mine.loc[(mine["level"] == "op") & mine["op"].isin(COLLECTIVE_OPS), "dur_ms"]
    if comm.empty or not steps > 0:
        return math.nan
    return float(100.0 * comm.sum() / steps)


def merge_summary(ranks: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """The merged summary row: the row of the rank with the largest TPOT (`decode_p50_ms_per_tok`), as it is, then
    `MERGED_COLUMNS`: tp, rank and slowest_rank (the rank whose row it is), the largest TTFT over the ranks and its
    rank, the per-step skew's median and maximum (ms), and the slowest rank's all-reduce share of its decode steps
    (%)."""
    slow = int(ranks["decode_p50_ms_per_tok"].to_numpy().argmax())
    slow_ttft = int(ranks["ttft_ms"].to_numpy().argmax())
    row = ranks.iloc[[slow]].drop(columns="rank").reset_index(drop=True)
    skew = step_skew(timings)
    extra = {"tp": len(ranks), "rank": slow, "slowest_rank": slow, "ttft_max_ms": float(ranks["ttft_ms"].max()),
             "ttft_slowest_rank": slow_ttft,
             "step_skew_p50_ms": float(skew.median()) if len(skew) else math.nan,
             "step_skew_max_ms": float(skew.max()) if len(skew) else math.nan,
             "allreduce_share_pct": allreduce_share(timings, slow)}
    for name in MERGED_COLUMNS:
        row[name] = extra[name]
    return row
