"""`kvscope align`: read an export, project, label, align with a run's timings, write Parquet, print a summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.table import Table

from kvscope.analysis.align import (
    align_regions,
    class_breakdown,
    label_kernels,
    label_ranges,
    step_activity,
)
from kvscope.analysis.nsys import NsysExport, load_export
from kvscope.analysis.projection import project
from kvscope.errors import KvscopeError
from kvscope.io import write_parquet

OUTPUT_FILES = ("ranges.parquet", "kernels.parquet", "align.parquet", "steps.parquet", "kernel_classes.parquet")


@dataclass
class AlignResult:
    export: NsysExport
    ranges: pd.DataFrame
    kernels: pd.DataFrame
    regions: pd.DataFrame
    steps: pd.DataFrame
    classes: pd.DataFrame


def read_timings(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "timings.parquet"
    if not path.is_file():
        raise KvscopeError(f"--timings {run_dir}: no timings.parquet there (expected a kvscope run folder)")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise KvscopeError(f"cannot read {path}: {exc}") from None


def analyse(export_path: Path, timings_dir: Path | None = None, nsys: str | None = None) -> AlignResult:
    exp = load_export(export_path, nsys=nsys)
    if not len(exp.ranges):
        raise KvscopeError(f"{export_path}: export has no NVTX ranges (was NVTX on while profiling?)")
    if not (exp.gpu_ops["kind"] == "kernel").any():
        raise KvscopeError(f"{export_path}: export has no GPU kernels")
    proj = project(exp)
    labeled = label_ranges(proj)
    if not len(labeled):
        raise KvscopeError(f"{export_path}: export has no ranges in the NVTX domain 'kvscope' (not a kvscope run)")
    timings = read_timings(timings_dir) if timings_dir is not None else None
    regions = align_regions(labeled, timings)
    kernels = label_kernels(exp, proj, labeled)
    return AlignResult(exp, proj.ranges, kernels, regions, step_activity(labeled), class_breakdown(kernels))


def write(result: AlignResult, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "nsys_version": result.export.nsys_version, "schema_version": result.export.schema_version,
            "export": str(result.export.source)}
    frames = (result.ranges, result.kernels, result.regions, result.steps, result.classes)
    for name, df in zip(OUTPUT_FILES, frames, strict=True):
        write_parquet(df, out / name, meta)


def summary_tables(result: AlignResult) -> list[Table]:
    tables = []
    t = Table(title="GPU kernel time by class and phase")
    for col in ("phase", "class", "kernels", "time (ms)", "share of phase"):
        t.add_column(col, justify="right" if col not in ("phase", "class") else "left")
    for row in result.classes.itertuples(index=False):
        t.add_row(str(row.phase), str(row.kernel_class), f"{row.ops:,}", f"{row.time_ms:.3f}", f"{row.share_pct:.1f}%")
    tables.append(t)
    s = result.steps
    if len(s):
        t = Table(title="GPU activity inside prefill and decode steps (median over steps)")
        for col in ("phase", "steps", "GPU span (ms)", "busy (ms)", "idle share", "launch-bound steps"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for phase, g in s.groupby("phase"):
            t.add_row(str(phase), str(len(g)), f"{g['gpu_span_ms'].median():.3f}", f"{g['gpu_busy_ms'].median():.3f}",
                      f"{g['gpu_idle_fraction'].median():.1%}", f"{int(g['launch_bound'].sum())}/{len(g)}")
        tables.append(t)
    r = result.regions.dropna(subset=["event_ms"])
    if len(r):
        t = Table(title="CUDA-event time vs projected GPU span, per region kind")
        for col in ("kind", "regions", "median diff", "max |diff|", "within 2% or 10 us"):
            t.add_column(col, justify="left" if col == "kind" else "right")
        for kind, g in r.groupby("kind"):
            diff = g["span_minus_event_ms"].astype(float)
            ok = (diff.abs() <= 0.010) | (g["span_vs_event_pct"].astype(float).abs() <= 2.0)
            t.add_row(str(kind), str(len(g)), f"{diff.median() * 1e3:+.1f} us", f"{diff.abs().max() * 1e3:.1f} us",
                      f"{int(ok.sum())}/{len(g)}")
        tables.append(t)
    return tables
