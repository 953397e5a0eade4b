"""The alignment of a capture of several processes (the ranks of `kvscope run --tp N`, or any multi-process
program) split per rank: per step, the GPU time of each rank in compute, in communication (kernels of the class
`communication`: NCCL) and idle, and the straggler named.

A process's rank is its place in the order of the GPUs it ran on (rank r of `kvscope run --tp` runs on cuda:r), then
of its process id (several processes on one GPU). The alignment itself is `kvscope align`'s (analysis.report_align):
once over every process without timings (a run's region names repeat in every rank), then, with a run folder, once
per rank (`--pid`) against that rank's timings rows, so align.parquet gets a `rank` column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from kvscope.analysis.align.phase_map import PhaseMap
from kvscope.analysis.align.pipeline import AlignResult, analyse
from kvscope.analysis.inputs import ALIGN_TIMINGS_COLUMNS, read_timings
from kvscope.analysis.nsys.export import NsysExport, load_export
from kvscope.errors import KvscopeError
from kvscope.io import write_parquet
from kvscope.schema import NS_PER_MS

RANKS_FILE = "ranks.parquet"
RANK_STEPS_FILE = "rank_steps.parquet"
COMMUNICATION = "communication"  # analysis.kernel_classes' class of NCCL and other collective kernels
_KEYS = ("rep", "phase", "step")


def process_ranks(kernels: pd.DataFrame) -> pd.DataFrame:
    """pid -> rank: processes ordered by the lowest GPU they ran kernels on, then by pid. Columns pid, device, rank."""
    k = kernels.dropna(subset=["pid"])
    if k.empty:
        return pd.DataFrame({"pid": pd.Series(dtype="int64"), "device": pd.Series(dtype="Int64"),
                             "rank": pd.Series(dtype="int64")})
    per = k.groupby("pid", sort=True)["device"].min().reset_index()
    per = per.sort_values(["device", "pid"], kind="stable", na_position="last").reset_index(drop=True)
    per["rank"] = np.arange(len(per), dtype=np.int64)
    return per[["pid", "device", "rank"]]


def _key_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The step keys (pid, rep, phase, step) with NA as -1 / "" so that they join and group."""
    return pd.DataFrame({"pid": df["pid"].astype("int64"), "rep": df["rep"].astype("Int64").fillna(-1).astype("int64"),
                         "phase": df["phase"].astype("string").fillna(""),
                         "step": df["step"].astype("Int64").fillna(-1).astype("int64")})


def rank_steps(steps: pd.DataFrame, kernels: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """Per step of every rank (align's steps table, which carries the pid): GPU span, compute, communication and
    idle time (ms) and shares of the span, and whether the rank was that step's straggler (the longest compute of the
    ranks that ran the same rep, phase and step; a step one rank alone ran has no straggler)."""
    s = pd.concat([_key_frame(steps), steps[["name", "gpu_span_ms", "gpu_busy_ms", "gpu_idle_ms"]].reset_index(
        drop=True).astype({"gpu_span_ms": "float64", "gpu_busy_ms": "float64", "gpu_idle_ms": "float64"})], axis=1)
    comm = kernels[kernels["kernel_class"] == COMMUNICATION].dropna(subset=["phase"])
    if len(comm):
        ck = _key_frame(comm.reset_index(drop=True))
        ck["comm_ns"] = comm["dur_ns"].to_numpy(np.int64)
        per = ck.groupby(["pid", "rep", "phase", "step"], as_index=False)["comm_ns"].sum()
        s = s.merge(per, on=["pid", "rep", "phase", "step"], how="left")
    else:
        s["comm_ns"] = 0
    s["comm_ms"] = s["comm_ns"].fillna(0).astype("float64") / NS_PER_MS
    s["compute_ms"] = (s["gpu_busy_ms"] - s["comm_ms"]).clip(lower=0.0)
    s = s.drop(columns="comm_ns").merge(ranks[["pid", "rank"]], on="pid", how="left")
    for part in ("compute", "comm", "idle"):
        col = "gpu_idle_ms" if part == "idle" else f"{part}_ms"
        s[f"{part}_share"] = np.where(s["gpu_span_ms"] > 0, s[col] / s["gpu_span_ms"].where(s["gpu_span_ms"] > 0),
                                      np.nan)
    group = s.groupby(["rep", "phase", "step"])
    shared = group["rank"].transform("size") > 1
    s["straggler"] = shared & (s["compute_ms"] == group["compute_ms"].transform("max"))
    cols = ["rank", "pid", "rep", "phase", "step", "name", "gpu_span_ms", "compute_ms", "comm_ms", "gpu_idle_ms",
            "compute_share", "comm_share", "idle_share", "straggler"]
    out = s[cols].rename(columns={"gpu_idle_ms": "idle_ms"})
    for col in ("rep", "step"):
        out[col] = out[col].astype("Int64").where(out[col] >= 0, pd.NA)
    out["phase"] = out["phase"].where(out["phase"] != "", pd.NA)
    return out.sort_values(["rep", "phase", "step", "rank"], kind="stable").reset_index(drop=True)


def rank_table(per_step: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """Per rank: its steps, median compute / communication / idle per step (ms), the shares of its summed step
    spans, the steps it was the straggler of, and `straggler` True for the one rank named (most straggler steps,
    then the longest median compute); decode steps when there are any, else all steps."""
    decode = per_step[per_step["phase"] == "decode"]
    s = decode if len(decode) else per_step
    g = s.groupby("rank")
    out = pd.DataFrame({
        "steps": g.size(),
        "compute_p50_ms": g["compute_ms"].median(), "comm_p50_ms": g["comm_ms"].median(),
        "idle_p50_ms": g["idle_ms"].median(),
        "compute_share": g["compute_ms"].sum() / g["gpu_span_ms"].sum(),
        "comm_share": g["comm_ms"].sum() / g["gpu_span_ms"].sum(),
        "idle_share": g["idle_ms"].sum() / g["gpu_span_ms"].sum(),
        "straggler_steps": g["straggler"].sum().astype("int64"),
    }).reset_index()
    out = ranks.merge(out, on="rank", how="left")
    out["straggler"] = False
    if len(out) > 1 and out["steps"].notna().any():
        order = out.sort_values(["straggler_steps", "compute_p50_ms"], ascending=False, kind="stable")
        out.loc[order.index[0], "straggler"] = True
    return out


def rank_alignment(result: AlignResult) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(ranks, rank_steps) of an alignment: every process that ran kernels is a rank (a straggler is named among
    two or more); None without such a process or without steps."""
    ranks = process_ranks(result.kernels)
    if not len(ranks) or result.steps is None or not len(result.steps) or "pid" not in result.steps:
        return None
    per_step = rank_steps(result.steps, result.kernels, ranks)
    return rank_table(per_step, ranks), per_step


def refuse_rank_filters(used: list[str], timings: object) -> None:
    """The filters (`--domain`, `--range`, `--start`, `--end`, `--pid`, `--classes`: those `used`) cut a
    tensor-parallel run's capture apart: with its timings (`timings` names them) they are a one-line error."""
    if used:
        raise KvscopeError(f"align: {', '.join(used)} cannot be combined with the timings of a tensor-parallel run "
                           f"({timings}: one process per rank, each aligned whole)")


def analyse_ranks(export: str | Path | NsysExport, timings: str | Path | pd.DataFrame | None = None,
                  nsys: str | None = None, phase_map: str | Mapping[str, str] | PhaseMap | None = None
                  ) -> tuple[AlignResult, tuple[pd.DataFrame, pd.DataFrame] | None]:
    """`kvscope align` over every process (no timings: the ranks' region names repeat), then with timings (a run
    folder or its table, as `read_timings(folder, ALIGN_TIMINGS_COLUMNS)` gives it) that have a `rank` column, each
    rank's regions against its own rows (align.parquet with `rank`)."""
    exp = export if isinstance(export, NsysExport) else load_export(export, nsys=nsys)
    result = analyse(exp, None, phase_map=phase_map)
    split = rank_alignment(result)
    if timings is not None and split is not None:
        if isinstance(timings, (str, Path)):
            timings = read_timings(Path(timings), ALIGN_TIMINGS_COLUMNS)
        if "rank" in timings:
            parts = []
            for row in split[0].itertuples(index=False):
                mine = timings[timings["rank"] == row.rank].drop(columns="rank")
                regions = analyse(exp, mine, pid=int(row.pid)).regions
                if regions is not None:
                    parts.append(regions.assign(rank=row.rank))
            if parts:
                result.regions = pd.concat(parts, ignore_index=True)
    return result, split


def write_ranks(split: tuple[pd.DataFrame, pd.DataFrame], out: Path, meta: dict) -> None:
    write_parquet(split[0], out / RANKS_FILE, meta)
    write_parquet(split[1], out / RANK_STEPS_FILE, meta)


def ranks_table(ranks: pd.DataFrame) -> Table:
    """The per-rank table that `kvscope nsys --tp` prints."""
    t = Table(title="GPU time per rank and step: compute, communication, idle (median per step; shares of the "
                    "steps' spans)")
    for col in ("rank", "pid", "GPU", "steps", "compute (ms)", "comm (ms)", "idle (ms)", "comm share",
                "idle share", "straggler steps", ""):
        t.add_column(col, justify="right")
    for r in ranks.itertuples(index=False):
        t.add_row(str(r.rank), str(r.pid), str(r.device), _num(r.steps, "{:.0f}"), _num(r.compute_p50_ms, "{:.3f}"),
                  _num(r.comm_p50_ms, "{:.3f}"), _num(r.idle_p50_ms, "{:.3f}"), _num(r.comm_share, "{:.1%}"),
                  _num(r.idle_share, "{:.1%}"), _num(r.straggler_steps, "{:.0f}"), "straggler" if r.straggler else "")
    return t


def _num(value: object, fmt: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)
