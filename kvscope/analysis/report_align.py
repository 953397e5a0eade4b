"""`kvscope align`: read an export, project, label, align with a run's timings, write Parquet, print a summary.

Output folder (`--out`): written whole or not at all (`kvscope.io.AtomicFolder`): the tables go into a temporary
folder beside it, renamed into place when all five are written. The folder may be new, empty, or hold a previous
`kvscope align` output and nothing else (then it is replaced whole, so two analyses never mix); any other folder is
refused before the analysis starts.
"""

from __future__ import annotations

import math
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
from kvscope.analysis.inputs import ALIGN_TIMINGS_COLUMNS, TIMINGS_FILE
from kvscope.analysis.inputs import read_timings as read_timings_file
from kvscope.analysis.nsys import NsysExport, load_export
from kvscope.analysis.projection import project
from kvscope.analysis.schema import ALIGN_OUTPUT_FILES
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, write_parquet

US_PER_MS = 1e3
# a region's projected GPU span matches its CUDA-event time when within either bound
MATCH_ABS_MS = 0.010
MATCH_REL_PCT = 2.0
OUTPUT_FILES = ALIGN_OUTPUT_FILES  # in the order of AlignResult's tables


@dataclass
class AlignResult:
    export: NsysExport
    ranges: pd.DataFrame
    kernels: pd.DataFrame
    regions: pd.DataFrame
    steps: pd.DataFrame
    classes: pd.DataFrame


def read_timings(run_dir: Path) -> pd.DataFrame:
    if not (run_dir / TIMINGS_FILE).exists():
        raise KvscopeError(f"--timings {run_dir}: no {TIMINGS_FILE} there (expected a kvscope run folder)")
    return read_timings_file(run_dir, ALIGN_TIMINGS_COLUMNS)


def is_align_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but files `kvscope align` writes (so a new output may replace it)."""
    return all(p.name in OUTPUT_FILES and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def output_folder(out: Path) -> AtomicFolder:
    """The `--out` folder of `kvscope align`, checked now (before any analysis), written by `write` inside
    `with output_folder(out) as tmp:`."""
    return AtomicFolder(out, "--out", replaceable=is_align_output)


def analyse(export_path: Path, timings_dir: Path | None = None, nsys: str | None = None) -> AlignResult:
    timings = read_timings(timings_dir) if timings_dir is not None else None  # the cheaper input first
    exp = load_export(export_path, nsys=nsys)
    if not len(exp.ranges):
        raise KvscopeError(f"{export_path}: export has no NVTX ranges (was NVTX on while profiling?)")
    if not (exp.gpu_ops["kind"] == "kernel").any():
        raise KvscopeError(f"{export_path}: export has no GPU kernels")
    proj = project(exp)
    if (proj.op_call < 0).all():
        raise KvscopeError(f"{export_path}: none of the export's {len(exp.gpu_ops)} GPU operations has its launching "
                           "CUDA API call in CUPTI_ACTIVITY_KIND_RUNTIME (same process and correlation id): a "
                           "damaged or partial export")
    labeled = label_ranges(proj)
    if not len(labeled):
        raise KvscopeError(f"{export_path}: export has no ranges in the NVTX domain 'kvscope' (not a kvscope run)")
    if labeled["kind"].isna().all():
        raise KvscopeError(f"{export_path}: none of the {len(labeled)} ranges in the NVTX domain 'kvscope' has a "
                           "kvscope region name (such as 'prefill' or 'decode step 1')")
    regions = align_regions(labeled, timings)
    kernels = label_kernels(exp, proj, labeled)
    return AlignResult(exp, proj.ranges, kernels, regions, step_activity(labeled), class_breakdown(kernels))


def write(result: AlignResult, out: Path, meta: dict) -> None:
    """Write the five tables into the folder `out` (made if absent). Not atomic by itself: `kvscope align` calls it
    inside `output_folder`, `kvscope nsys` inside its own temporary output folder."""
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
        t.add_row(str(row.phase), str(row.kernel_class), f"{row.ops:,}", f"{row.time_ms:.3f}",
                  _fmt(row.share_pct, "{:.1f}%", "n/a (phase total 0 ms)"))
    tables.append(t)
    s = result.steps
    if len(s):
        t = Table(title="GPU activity inside prefill and decode steps (median over steps)")
        for col in ("phase", "steps", "GPU span (ms)", "busy (ms)", "idle share", "launch-bound steps"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for phase, g in s.groupby("phase"):
            t.add_row(str(phase), str(len(g)), _fmt(g["gpu_span_ms"].median(), "{:.3f}", "n/a (no GPU work)"),
                      _fmt(g["gpu_busy_ms"].median(), "{:.3f}", "n/a (no GPU work)"),
                      _fmt(g["gpu_idle_fraction"].median(), "{:.1%}", "n/a (no GPU span)"),
                      f"{int(g['launch_bound'].fillna(False).sum())}/{len(g)}")
        tables.append(t)
    r = result.regions.dropna(subset=["event_ms"])
    if len(r):
        t = Table(title="CUDA-event time vs projected GPU span, per region kind")
        for col in ("kind", "regions", "median diff", "max |diff|", "within 2% or 10 us"):
            t.add_column(col, justify="left" if col == "kind" else "right")
        for kind, g in r.groupby("kind"):
            diff = g["span_minus_event_ms"].astype(float)
            ok = (diff.abs() <= MATCH_ABS_MS) | (g["span_vs_event_pct"].astype(float).abs() <= MATCH_REL_PCT)
            t.add_row(str(kind), str(len(g)), _fmt(diff.median() * US_PER_MS, "{:+.1f} us", "n/a (no GPU span)"),
                      _fmt(diff.abs().max() * US_PER_MS, "{:.1f} us", "n/a (no GPU span)"), f"{int(ok.sum())}/{len(g)}")
        tables.append(t)
    return tables


def _fmt(value: object, fmt: str, missing: str) -> str:
    """`value` formatted, or `missing` (an "n/a (reason)") where it is NA, NaN or infinite."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return fmt.format(value)
