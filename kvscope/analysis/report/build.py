"""`kvscope report`: a Markdown report with PNG plots, for a run folder or a sweep file.

Three steps, so that bad input never leaves a half-written folder:
1. read and check the input (`kvscope.analysis.inputs`): a missing, empty, truncated or foreign file, missing
   columns, or text where a key column needs numbers is a one-line `KvscopeError` naming the path the user gave;
2. build the report in memory (`Report`: Markdown lines, figures, notes), one function per section: a run folder's
   in `kvscope.analysis.report.run`, a sweep file's in `kvscope.analysis.report.sweep`;
3. write it into a temporary folder renamed into place at the end (`kvscope.io.AtomicFolder`); a failed write (a
   full disk) is a one-line error and leaves nothing.

Numbers: a metric column holding text that is not a number is left out, with a note at the end of the report (never
plotted as categories); missing values and infinities are left out of plots, and a section with no data is not
written. A sweep file is read by `kvscope.analysis.sweep_file`, which refuses text, infinities and negative values in
its number columns (and the rows of two models) in one line, as `sweep --resume` and `capacity` do. Percentages
whose base is missing, zero or negative are printed as "n/a (reason)", never inf or nan.

The output folder (`--out`, default `<source>-report` beside the source) may be new, empty, or an earlier report
(only `report.md` and `.png` files), which is replaced whole; any other folder is refused before anything is read.

A sweep file with the attribution columns of `kvscope sweep --nsys` also gets its time by kernel class, idle share,
prefill and roofline plots and a "why" section computed by `kvscope.analysis.explain`; `--compare B.csv` adds the
points both files hold side by side (mismatched models or no common point: a one-line error).

A `kvscope serve` run folder (or a `kvscope nsys -- serve` folder, its run/ inside) or serve sweep folder gets the
served load's report (`kvscope.analysis.report.serve`); for a serve sweep, `--compare` (or `plan`) may name a
`kvscope capacity --out` table, set against the measured load.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

from pathlib import Path

from kvscope.analysis.report.markdown import (
    FIGURE_DPI,
    FIGURE_SIZE_IN,
    FIGURE_SUFFIX,
    REPORT_FILE,
    Report,
    md_table,
    percent_change,
    percent_of_total,
)
from kvscope.analysis.report.run import run_report
from kvscope.analysis.report.serve import serve_run_report, serve_sweep_report
from kvscope.analysis.report.sweep import sweep_report
from kvscope.analysis.serving.planner import is_plan_file
from kvscope.analysis.serving.records import find_serve_run, is_serve_sweep
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder

# the report's pieces, importable from here as before the split
__all__ = ["FIGURE_DPI", "FIGURE_SIZE_IN", "FIGURE_SUFFIX", "REPORT_FILE", "Report", "default_out",
           "is_report_output", "make_report", "md_table", "percent_change", "percent_of_total", "run_report",
           "sweep_report"]


def is_report_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but files `kvscope report` writes (so a new report may replace it)."""
    return all(p.is_file() and not p.is_symlink() and (p.name == REPORT_FILE or p.suffix == FIGURE_SUFFIX)
               for p in folder.iterdir())


def default_out(source: Path) -> Path:
    """`<source>-report` beside the source (a file's name without its suffix)."""
    named = source if source.name else source.resolve()
    if not named.name:
        raise KvscopeError(f"{source} has no name to derive a report folder from; give --out")
    return named.with_name((named.name if named.is_dir() else named.stem) + "-report")


def make_report(source: Path, out: Path | None, compare: Path | None = None, plan: Path | None = None) -> Path:
    """Read `source` (a run folder, a `kvscope nsys` folder, a sweep .csv/.parquet, a `kvscope serve` run or sweep
    folder), build the report, and write it into `out` (default `default_out(source)`); returns the path of
    report.md. `compare`: a second sweep file whose common points are set side by side with the first's; for a serve
    sweep folder, a `kvscope capacity --out` table (as `plan`) set against the measured load."""
    if not source.exists():
        raise KvscopeError(f"not found: {source}")
    serve_run = find_serve_run(source) if source.is_dir() else None
    if is_serve_sweep(source) or serve_run is not None:
        plan = _serve_plan(source, compare, plan)
    elif compare is not None:
        if not compare.exists():
            raise KvscopeError(f"--compare: not found: {compare}")
        if source.is_dir() or compare.is_dir():
            raise KvscopeError("--compare sets two sweep files side by side; "
                               f"{source if source.is_dir() else compare} is a folder")
    target = out if out is not None else default_out(source)
    inputs = [("source", source)] + ([("--compare file", compare)] if compare is not None else [])
    if plan is not None and plan != compare:
        inputs.append(("capacity plan", plan))
    folder = AtomicFolder(target, "--out" if out is not None else "report folder", replaceable=is_report_output,
                          inputs=inputs)
    if is_serve_sweep(source):
        report = serve_sweep_report(source, plan)
    elif serve_run is not None:
        report = serve_run_report(source)
    else:
        report = run_report(source) if source.is_dir() else sweep_report(source, compare)
    with folder as tmp:
        report.write(tmp)
    return target / REPORT_FILE


def _serve_plan(source: Path, compare: Path | None, plan: Path | None) -> Path | None:
    """The capacity plan of a serve sweep's report: `plan`, or `--compare` when it names a capacity table; a serve
    run folder takes neither."""
    given = [p for p in (compare, plan) if p is not None]
    if not given:
        return None
    if not is_serve_sweep(source):
        raise KvscopeError(f"{source} is a serve run folder: --compare (a capacity plan) goes with a serve sweep "
                           "folder")
    for p in given:
        if not p.exists():
            raise KvscopeError(f"--compare: not found: {p}")
        if not is_plan_file(p):
            raise KvscopeError(f"--compare {p} is not a kvscope capacity table: a serve sweep is set against a "
                               "capacity plan (`kvscope capacity --out`)")
    return given[-1]
