"""`kvscope align`: read an export, project, label, align with a run's timings, write Parquet, print a summary.

Output folder (`--out`): written whole or not at all (`kvscope.io.AtomicFolder`): the tables go into a temporary
folder beside it, renamed into place when all are written. The folder may be new, empty, or hold a previous
`kvscope align` output and nothing else (then it is replaced whole, so two analyses never mix); any other folder is
refused before the analysis starts, as is a folder that is or holds one of the command's inputs. Two `kvscope align`s
into one `--out` at once: the second to finish is refused (its output discarded), never the first's output lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.table import Table

from kvscope.analysis.align.join import (
    KVSCOPE_DOMAIN,
    align_regions,
    class_breakdown,
    label_kernels,
    label_ranges,
    step_activity,
)
from kvscope.analysis.align.kernel_classes import Rules, resolve_rules
from kvscope.analysis.align.overlap import overlap_summary
from kvscope.analysis.align.phase_map import PhaseMap, parse_phase_map
from kvscope.analysis.align.trace_export import write_trace
from kvscope.analysis.inputs import ALIGN_TIMINGS_COLUMNS, read_timings
from kvscope.analysis.nsys.export import NsysExport, load_export
from kvscope.analysis.nsys.filters import RangeFilter
from kvscope.analysis.nsys.projection import project
from kvscope.analysis.nsys.range_summary import range_summary
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, Inputs, write_parquet
from kvscope.schema import (
    ALIGN_FILE,
    ALIGN_OUTPUT_FILES,
    KERNEL_CLASSES_FILE,
    KERNELS_FILE,
    NS_PER_MS,
    OVERLAP_FILE,
    RANGE_SUMMARY_FILE,
    RANGES_FILE,
    STEPS_FILE,
    TRACE_FILE,
    US_PER_MS,
)

TOP_RANGES = 10  # range names printed
# a region's projected GPU span matches its CUDA-event time when within either bound
MATCH_ABS_MS = 0.010
MATCH_REL_PCT = 2.0
OUTPUT_FILES = ALIGN_OUTPUT_FILES  # in the order of AlignResult.tables


@dataclass
class AlignResult:
    """What `kvscope align` computes. Always: `ranges` (every range of the kept domains, projected), `kernels` (every
    kept GPU operation), `range_summary` (per process and range name). The kvscope tables are None when skipped
    (`skipped` says which and why): `regions` (align.parquet) needs ranges in the NVTX domain `kvscope`; `steps` and
    `classes` need labelled ranges (the `kvscope` domain, or a phase map that matches)."""

    export: NsysExport
    ranges: pd.DataFrame
    kernels: pd.DataFrame
    regions: pd.DataFrame | None
    steps: pd.DataFrame | None
    classes: pd.DataFrame | None
    range_summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped: str | None = None
    overlap: pd.DataFrame | None = None  # overlap.parquet: consecutive kernels of one stream per step (overlap.py)
    overlap_finding: str | None = None  # one line: did they overlap (programmatic dependent launch)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables to write, by file name (skipped ones left out)."""
        frames = {RANGES_FILE: self.ranges, KERNELS_FILE: self.kernels, RANGE_SUMMARY_FILE: self.range_summary,
                  ALIGN_FILE: self.regions, STEPS_FILE: self.steps, KERNEL_CLASSES_FILE: self.classes,
                  OVERLAP_FILE: self.overlap}
        return {name: df for name, df in frames.items() if df is not None}


def is_align_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but files `kvscope align` writes (so a new output may replace it)."""
    return all(p.name in (*OUTPUT_FILES, TRACE_FILE) and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def output_folder(out: Path, inputs: Inputs = ()) -> AtomicFolder:
    """The `--out` folder of `kvscope align`, checked now (before any analysis), written by `write` inside
    `with output_folder(out, inputs) as tmp:`; `inputs`: (name, path) of what the command reads, which `out` must
    neither be nor hold."""
    return AtomicFolder(out, "--out", replaceable=is_align_output, inputs=inputs)


def analyse(export: str | Path | NsysExport, timings: str | Path | pd.DataFrame | None = None, *,
            nsys: str | None = None, domain: str | None = None, range_re: str | None = None,
            start_ns: int | None = None, end_ns: int | None = None, pid: int | None = None,
            phase_map: str | Mapping[str, str] | PhaseMap | None = None, classes: str | Path | Rules | None = None
            ) -> AlignResult:
    """`kvscope align` on any export: `export` a path (SQLite, parquetdir, .nsys-rep) or a loaded export;
    `timings` a kvscope run folder or its timings table (as `read_timings(folder, ALIGN_TIMINGS_COLUMNS)` reads
    it); the filters of range_filters.RangeFilter; `phase_map` (phase_map.parse_phase_map); `classes` a
    kernel-class rules file or loaded rules (kernel_classes.resolve_rules).
    Bad values (of any type) are a KvscopeError before the export is read; so, once it is read, are filters that
    keep none of its ranges (RangeFilter.kept_ranges: which filter, and what the export holds)."""
    flt = RangeFilter(domain, range_re, start_ns, end_ns, pid)
    pm = parse_phase_map(phase_map) if phase_map is not None else None
    rules = resolve_rules(classes)
    if isinstance(timings, (str, Path)):
        timings = read_timings(Path(timings), ALIGN_TIMINGS_COLUMNS)  # the cheaper input first
    exp = export if isinstance(export, NsysExport) else load_export(export, nsys=nsys)
    if not len(exp.ranges):
        raise KvscopeError(f"{exp.source}: export has no NVTX ranges (was NVTX on while profiling?)")
    proj = project(exp)
    if len(exp.gpu_ops) and (proj.op_call < 0).all():
        raise KvscopeError(f"{exp.source}: none of the export's {len(exp.gpu_ops)} GPU operations has its launching "
                           "CUDA API call in CUPTI_ACTIVITY_KIND_RUNTIME (same process and correlation id): a "
                           "damaged or partial export")
    keep = flt.kept_ranges(proj.ranges, exp.source)  # filters that keep no range are an error
    ranges = proj.ranges.loc[keep].reset_index(drop=True)
    labeled = label_ranges(ranges, pm)
    kernels = label_kernels(exp, proj, labeled, keep, flt.ops(exp.gpu_ops), rules)
    regions, note = _kvscope_regions(exp, ranges, labeled, timings, pm)
    steps = classes_t = overlap = finding = None
    if len(labeled):
        steps, classes_t = step_activity(labeled), class_breakdown(kernels)
        overlap, finding = overlap_summary(kernels)
    elif pm is not None:
        note = "; ".join(n for n in (note, "--phase-map matched no range") if n)
    skipped = None
    if note is not None:
        names = [n for n, df in ((ALIGN_FILE, regions), (STEPS_FILE, steps), (KERNEL_CLASSES_FILE, classes_t))
                 if df is None]
        skipped = f"skipped {', '.join(names)}: {note}"
    return AlignResult(exp, ranges, kernels, regions, steps, classes_t, range_summary(ranges), skipped, overlap,
                       finding)


def _kvscope_regions(exp: NsysExport, ranges: pd.DataFrame, labeled: pd.DataFrame,
                     timings: pd.DataFrame | None, pm: PhaseMap | None) -> tuple[pd.DataFrame | None, str | None]:
    """align.parquet's table, or None and why it is skipped."""
    mine = labeled[(labeled["domain"] == KVSCOPE_DOMAIN).fillna(False).to_numpy(bool)]
    in_domain = int((ranges["domain"] == KVSCOPE_DOMAIN).fillna(False).sum())
    if in_domain and not len(mine) and pm is None:
        raise KvscopeError(f"{exp.source}: none of the {in_domain} ranges in the NVTX domain '{KVSCOPE_DOMAIN}' has a "
                           "kvscope region name (such as 'prefill' or 'decode step 1')")
    if not len(mine):
        if timings is not None:
            raise KvscopeError(f"{exp.source}: --timings needs ranges in the NVTX domain '{KVSCOPE_DOMAIN}' (a kvscope "
                               "run), and the export (as filtered) has none")
        why = f"no ranges in the NVTX domain '{KVSCOPE_DOMAIN}' (not a kvscope run)"
        return None, why + ("" if pm is not None else "; --phase-map labels another engine's ranges")
    return align_regions(mine, timings), None


def write(result: AlignResult, out: Path, meta: dict) -> None:
    """Write the tables into the folder `out` (made if absent). Not atomic by itself: `kvscope align` calls it
    inside `output_folder`, `kvscope nsys` inside its own temporary output folder."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "nsys_version": result.export.nsys_version, "schema_version": result.export.schema_version,
            "export": str(result.export.source)}
    for name, df in result.tables().items():
        write_parquet(df, out / name, meta)
    write_trace(out / TRACE_FILE, result.ranges, result.kernels, result.export.calls, meta)  # Perfetto / HTA


def summary_tables(result: AlignResult) -> list[Table]:
    """The tables `kvscope align` prints: the busiest range names, then the kvscope tables that were computed."""
    tables = [_ranges_table(result.range_summary)]
    if result.classes is not None:
        tables.append(_classes_table(result.classes))
    if result.steps is not None and len(result.steps):
        tables.append(_steps_table(result.steps))
    if result.regions is not None:
        r = result.regions.dropna(subset=["event_ms"])
        if len(r):
            tables.append(_regions_table(r))
    return tables


def _ranges_table(summary: pd.DataFrame) -> Table:
    t = Table(title=f"NVTX ranges by projected GPU time (top {TOP_RANGES} names; all in range_summary.parquet)")
    for col in ("pid", "range", "count", "with GPU work", "projected total (ms)", "median (ms)", "GPU ops"):
        t.add_column(col, justify="left" if col == "range" else "right")
    for row in summary.head(TOP_RANGES).itertuples(index=False):
        t.add_row(str(row.pid), f"{row.domain}:{row.name}", f"{row.ranges:,}", f"{row.gpu_ranges:,}",
                  f"{row.proj_total_ns / NS_PER_MS:.3f}",
                  _fmt(row.proj_median_ns / NS_PER_MS, "{:.3f}", "n/a (no GPU work)"), f"{row.gpu_ops:,}")
    return t


def _classes_table(classes: pd.DataFrame) -> Table:
    t = Table(title="GPU kernel time by class and phase")
    for col in ("phase", "class", "kernels", "time (ms)", "share of phase"):
        t.add_column(col, justify="right" if col not in ("phase", "class") else "left")
    for row in classes.itertuples(index=False):
        t.add_row(str(row.phase), str(row.kernel_class), f"{row.ops:,}", f"{row.time_ms:.3f}",
                  _fmt(row.share_pct, "{:.1f}%", "n/a (phase total 0 ms)"))
    return t


def _steps_table(s: pd.DataFrame) -> Table:
    t = Table(title="GPU activity inside prefill and decode steps (median over steps)")
    for col in ("phase", "steps", "GPU span (ms)", "busy (ms)", "idle share", "launch-bound steps"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for phase, g in s.groupby("phase"):
        t.add_row(str(phase), str(len(g)), _fmt(g["gpu_span_ms"].median(), "{:.3f}", "n/a (no GPU work)"),
                  _fmt(g["gpu_busy_ms"].median(), "{:.3f}", "n/a (no GPU work)"),
                  _fmt(g["gpu_idle_fraction"].median(), "{:.1%}", "n/a (no GPU span)"),
                  f"{int(g['launch_bound'].fillna(False).sum())}/{len(g)}")
    return t


def _regions_table(r: pd.DataFrame) -> Table:
    t = Table(title="CUDA-event time vs projected GPU span, per region kind")
    for col in ("kind", "regions", "median diff", "max |diff|", "within 2% or 10 us"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for kind, g in r.groupby("kind"):
        diff = g["span_minus_event_ms"].astype(float)
        ok = (diff.abs() <= MATCH_ABS_MS) | (g["span_vs_event_pct"].astype(float).abs() <= MATCH_REL_PCT)
        t.add_row(str(kind), str(len(g)), _fmt(diff.median() * US_PER_MS, "{:+.1f} us", "n/a (no GPU span)"),
                  _fmt(diff.abs().max() * US_PER_MS, "{:.1f} us", "n/a (no GPU span)"), f"{int(ok.sum())}/{len(g)}")
    return t


def _fmt(value: object, fmt: str, missing: str) -> str:
    """`value` formatted, or `missing` (an "n/a (reason)") where it is NA, NaN or infinite."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return fmt.format(value)
