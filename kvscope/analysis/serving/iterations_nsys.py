"""A served load's scheduler iterations as Nsight Systems saw them (`kvscope nsys --out X -- serve ...`): the GPU work
of every `iter N` range (NVTX domain `kvscope`, `schema.iteration_name`), from the GPU's own timestamps.

Two tables, written by `kvscope nsys` beside the alignment when it profiled a served load:
- `iteration_kernels.parquet` (ITERATION_KERNEL_COLUMNS): one row per (iteration, kernel class): `kernels` (GPU
  operations of the class: kernels, and the memcpy/memset rows of class `copy/memset`), `ms` (their summed duration;
  two streams that overlap are both counted). The classes are `kvscope.analysis.align.kernel_classes`'s. This is the
  frame `kvscope.analysis.serving.request_cost.request_gpu_cost(batches, iterations, kernel_classes)` takes
  (`nsys_kernel_classes` reads it back).
- `iteration_gpu.parquet` (ITERATION_GPU_COLUMNS): one row per captured iteration: `span_ms` (first GPU start to last
  GPU end of its operations), `busy_ms` (the union of their intervals), `idle_ms` (span - busy), `idle_pct`,
  `gap_ms` (GPU idle from the previous iteration's last operation to this one's first; NaN for the first captured
  and after an iteration not captured), `gpu_ops` (distinct launches: a CUDA-graph replay is one), `kernels` (GPU
  operation rows), `cpu_ms` (the range on the host), and from the run folder's iterations.parquet the iteration's
  `kind` and its CUDA-event time `event_ms` (`dur_ms` there), with `span_minus_event_ms`.

An operation belongs to an iteration when the API call that launched it lies inside the `iter N` range on its thread
(`kvscope.analysis.nsys.projection`, nsys's `nvtx_gpu_proj_trace` semantics): kernels replayed from a CUDA graph
(`--cuda-graph-trace=node`) count under the range around the `cudaGraphLaunch`. The source is an export (SQLite,
parquetdir, .nsys-rep: projected here) or the folder `kvscope align` / `kvscope nsys` wrote (ranges.parquet and
kernels.parquet: each operation's innermost range, and the `iter N` range that encloses it on its thread). Names
other than `iter N` with N >= 0 (the warm-up's `iter -1`, any other range) are not iterations. An iteration named by
two ranges (two loads in one capture) is a one-line KvscopeError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.align.kernel_classes import Rules, classify, resolve_rules
from kvscope.analysis.inputs import read_parquet
from kvscope.analysis.nsys.export import NsysExport, load_export
from kvscope.analysis.nsys.projection import project
from kvscope.analysis.serving.records import checked_iterations
from kvscope.errors import KvscopeError
from kvscope.schema import (
    ITERATIONS_FILE,
    KERNELS_FILE,
    NS_PER_MS,
    NSYS_RUN_SUBFOLDER,
    NVTX_DOMAIN,
    RANGES_FILE,
    iteration_name,
)

ITERATION_KERNELS_FILE = "iteration_kernels.parquet"
ITERATION_GPU_FILE = "iteration_gpu.parquet"
ITERATION_KERNEL_COLUMNS = ("iteration", "class", "kernels", "ms")
ITERATION_GPU_COLUMNS = ("iteration", "kind", "pid", "cpu_ms", "gpu_start_ns", "gpu_end_ns", "span_ms", "busy_ms",
                         "idle_ms", "idle_pct", "gap_ms", "gpu_ops", "kernels", "event_ms", "span_minus_event_ms")
# `iter N` (schema.iteration_name) read back; N >= 0 (the warm-up's iterations are numbered -1)
ITERATION_RE = re.compile(r"^iter (\d+)$")

Source = str | Path | NsysExport


@dataclass(frozen=True)
class Captured:
    """What the tables are computed from: the projected ranges (ranges.parquet's columns), the GPU operations
    (`range_id`: the innermost enclosing range, NA where none; `dur_ns`; `kernel_class`) and where they came from."""

    ranges: pd.DataFrame
    kernels: pd.DataFrame
    source: str


def is_align_folder(path: Path) -> bool:
    """Whether `path` is a folder holding the ranges and kernels `kvscope align` (or `kvscope nsys`) wrote."""
    return path.is_dir() and (path / RANGES_FILE).is_file() and (path / KERNELS_FILE).is_file()


def captured(source: Source, *, nsys: str | None = None, classes: str | Path | Rules | None = None) -> Captured:
    """The ranges and operations of `source`: an align or nsys output folder (read), or an export (projected here).
    `classes`: kernel-class rules tried before the built-in ones (an align folder's classes are then redone)."""
    rules = resolve_rules(classes)
    if not isinstance(source, NsysExport) and is_align_folder(Path(source)):
        folder = Path(source)
        ranges = read_parquet(folder / RANGES_FILE)
        kernels = read_parquet(folder / KERNELS_FILE)
        for path, df, cols in ((folder / RANGES_FILE, ranges, ("range_id", "name", "domain", "global_tid", "pid",
                                                               "level", "start_ns", "end_ns", "gpu_start_ns",
                                                               "gpu_end_ns", "gpu_busy_ns", "gpu_ops",
                                                               "gpu_op_rows")),
                               (folder / KERNELS_FILE, kernels, ("range_id", "dur_ns", "name", "kernel_class"))):
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise KvscopeError(f"{path} lacks column(s) {', '.join(missing)} (not written by kvscope align)")
        if rules is not None:
            kernels = kernels.assign(kernel_class=classify(kernels["name"], rules))
        return Captured(ranges, kernels, str(folder))
    exp = source if isinstance(source, NsysExport) else load_export(source, nsys=nsys)
    proj = project(exp)
    inner = proj.innermost(np.ones(len(proj.ranges), dtype=bool))
    ops = exp.gpu_ops
    kernels = pd.DataFrame({"range_id": pd.array(np.where(inner >= 0, inner, 0), dtype="Int64"),
                            "dur_ns": (ops["end_ns"] - ops["start_ns"]).to_numpy(np.int64), "name": ops["name"],
                            "kernel_class": classify(ops["name"], rules).to_numpy()})
    kernels.loc[inner < 0, "range_id"] = pd.NA
    return Captured(proj.ranges, kernels, str(exp.source))


def iteration_ranges(ranges: pd.DataFrame, source: str = "the export") -> pd.DataFrame:
    """The projected `iter N` ranges of the NVTX domain `kvscope`, with their `iteration` (N), by iteration. An
    iteration named twice is a KvscopeError."""
    mine = (ranges["domain"] == NVTX_DOMAIN).fillna(False).to_numpy(bool) & (ranges["level"].to_numpy() >= 0)
    number = ranges["name"].where(mine).astype("string").str.extract(ITERATION_RE, expand=False)
    its = ranges.loc[number.notna().to_numpy(bool)].copy()
    its["iteration"] = number.dropna().astype("int64").to_numpy()
    twice = its["iteration"].duplicated(keep=False)
    if twice.any():
        n = int(its["iteration"][twice].iloc[0])
        raise KvscopeError(f"{source}: {int((its['iteration'] == n).sum())} ranges named {iteration_name(n)!r} in "
                           f"the NVTX domain '{NVTX_DOMAIN}': one served load per capture (`kvscope nsys -- serve` "
                           "with one --rps, --concurrency or --policy value)")
    return its.sort_values("iteration", kind="stable").reset_index(drop=True)


def op_iterations(ranges: pd.DataFrame, kernels: pd.DataFrame, its: pd.DataFrame) -> np.ndarray:
    """Per row of `kernels`, the iteration whose range encloses the operation's innermost range on its thread (-1:
    none). `its`: iteration_ranges(ranges)."""
    out = np.full(len(kernels), -1, dtype=np.int64)
    rid = pd.array(kernels["range_id"], dtype="Int64")
    pos = pd.Index(ranges["range_id"].to_numpy(np.int64)).get_indexer(rid.to_numpy(np.int64, na_value=-1))
    pos = np.where(rid.isna(), -1, pos)
    at = np.flatnonzero(pos >= 0)
    if not len(at) or not len(its):
        return out
    inner = pd.DataFrame({"op": at, "global_tid": ranges["global_tid"].to_numpy(np.int64)[pos[at]],
                          "start_ns": ranges["start_ns"].to_numpy(np.int64)[pos[at]],
                          "end_ns": ranges["end_ns"].to_numpy(np.int64)[pos[at]]}).sort_values("start_ns")
    outer = pd.DataFrame({"global_tid": its["global_tid"].to_numpy(np.int64),
                          "start_ns": its["start_ns"].to_numpy(np.int64), "it_end_ns": its["end_ns"].to_numpy(np.int64),
                          "iteration": its["iteration"].to_numpy(np.int64)}).sort_values("start_ns")
    m = pd.merge_asof(inner, outer, on="start_ns", by="global_tid", direction="backward")
    inside = (m["it_end_ns"] >= m["end_ns"]).to_numpy(bool)  # NaN (no iteration started before) compares false
    out[m["op"].to_numpy(np.int64)[inside]] = m["iteration"].to_numpy()[inside].astype(np.int64)
    return out


def kernel_table(cap: Captured, its: pd.DataFrame | None = None) -> pd.DataFrame:
    """iteration_kernels.parquet's table (see the module docstring), by iteration and class."""
    its = iteration_ranges(cap.ranges, cap.source) if its is None else its
    it = op_iterations(cap.ranges, cap.kernels, its)
    k = pd.DataFrame({"iteration": it, "class": cap.kernels["kernel_class"].astype(str).to_numpy(),
                      "dur_ns": cap.kernels["dur_ns"].to_numpy(np.int64)})[it >= 0]
    g = k.groupby(["iteration", "class"], sort=True).agg(kernels=("dur_ns", "size"), ns=("dur_ns", "sum"))
    g = g.reset_index()
    g["ms"] = g["ns"] / NS_PER_MS
    return g[list(ITERATION_KERNEL_COLUMNS)].astype({"iteration": "int64", "kernels": "int64", "ms": "float64"})


def gpu_table(its: pd.DataFrame, iterations: pd.DataFrame | None = None) -> pd.DataFrame:
    """iteration_gpu.parquet's table (see the module docstring) from iteration_ranges(...); `iterations`: the run's
    iterations.parquet (checked), for `kind` and `event_ms`."""
    start = pd.array(its["gpu_start_ns"], dtype="Int64")
    end = pd.array(its["gpu_end_ns"], dtype="Int64")
    span_ns = (end - start).to_numpy(np.float64, na_value=np.nan)
    busy_ns = its["gpu_busy_ns"].to_numpy(np.float64)
    span, busy, idle = span_ns / NS_PER_MS, busy_ns / NS_PER_MS, (span_ns - busy_ns) / NS_PER_MS
    number = its["iteration"].to_numpy(np.int64)
    gap = np.full(len(its), np.nan)
    if len(its) > 1:
        after = np.flatnonzero(np.diff(number) == 1) + 1
        gap[after] = (start[after].to_numpy(np.float64, na_value=np.nan)
                      - end[after - 1].to_numpy(np.float64, na_value=np.nan)) / NS_PER_MS
    out = pd.DataFrame({
        "iteration": number, "pid": its["pid"].to_numpy(np.int64),
        "cpu_ms": (its["end_ns"] - its["start_ns"]).to_numpy(np.float64) / NS_PER_MS,
        "gpu_start_ns": start, "gpu_end_ns": end, "span_ms": span, "busy_ms": busy, "idle_ms": idle,
        "gap_ms": gap, "gpu_ops": its["gpu_ops"].to_numpy(np.int64), "kernels": its["gpu_op_rows"].to_numpy(np.int64),
    })
    with np.errstate(invalid="ignore", divide="ignore"):
        out["idle_pct"] = np.where(span_ns > 0, 100 * (span_ns - busy_ns) / np.where(span_ns > 0, span_ns, 1), np.nan)
    if iterations is not None and len(iterations):
        by_it = iterations.set_index("iteration")
        out["kind"] = by_it["kind"].reindex(number).astype("string").to_numpy()
        out["event_ms"] = pd.to_numeric(by_it["dur_ms"].reindex(number), errors="coerce").to_numpy(np.float64)
    else:
        out["kind"] = pd.array([pd.NA] * len(out), dtype="string")
        out["event_ms"] = np.nan
    out["kind"] = out["kind"].astype("string")
    out["span_minus_event_ms"] = out["span_ms"] - out["event_ms"]
    return out[list(ITERATION_GPU_COLUMNS)]


def read_iterations(run: Path) -> pd.DataFrame:
    """A serve run folder's iterations.parquet, checked (`kvscope.analysis.serving.records`)."""
    path = run / ITERATIONS_FILE
    return checked_iterations(read_parquet(path), path)


def _run_folder(source: Source, run: str | Path | pd.DataFrame | None) -> str | Path | pd.DataFrame | None:
    """The run folder (or iterations table) to join: `run` when given, else `source/run` of a `kvscope nsys` folder
    when it holds iterations.parquet, else the folder itself when it does."""
    if run is not None or isinstance(source, NsysExport):
        return run
    for folder in (Path(source) / NSYS_RUN_SUBFOLDER, Path(source)):
        if (folder / ITERATIONS_FILE).is_file():
            return folder
    return None


def serve_tables(cap: Captured, run: str | Path | pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Both tables by file name (ITERATION_KERNELS_FILE, ITERATION_GPU_FILE); `run`: the serve run folder (or its
    iterations table) whose iterations.parquet gives `kind` and `event_ms`."""
    its = iteration_ranges(cap.ranges, cap.source)
    iterations = read_iterations(Path(run)) if isinstance(run, (str, Path)) else run
    return {ITERATION_KERNELS_FILE: kernel_table(cap, its), ITERATION_GPU_FILE: gpu_table(its, iterations)}


def iteration_kernels(source: Source, *, nsys: str | None = None,
                      classes: str | Path | Rules | None = None) -> pd.DataFrame:
    """One row per (iteration, kernel class) of a served load's capture (ITERATION_KERNEL_COLUMNS). `source`: an
    export, or the folder `kvscope nsys` / `kvscope align` wrote."""
    return kernel_table(captured(source, nsys=nsys, classes=classes))


def iteration_gpu(source: Source, run: str | Path | pd.DataFrame | None = None, *,
                  nsys: str | None = None) -> pd.DataFrame:
    """One row per captured iteration (ITERATION_GPU_COLUMNS). `run`: the serve run folder or its iterations table
    (default: `source/run` of a `kvscope nsys` folder, or `source` itself, when it holds iterations.parquet)."""
    cap = captured(source, nsys=nsys)
    return serve_tables(cap, _run_folder(source, run))[ITERATION_GPU_FILE]


def nsys_kernel_classes(folder: str | Path) -> pd.DataFrame | None:
    """The per-iteration kernel classes of a `kvscope nsys -- serve` capture, for `request_gpu_cost(batches,
    iterations, kernel_classes)`: `folder` the `kvscope nsys` output folder or its run folder (`run/`); None where no
    iteration_kernels.parquet was written (a serve run not profiled)."""
    folder = Path(folder)
    for candidate in (folder, folder.parent if folder.name == NSYS_RUN_SUBFOLDER else None):
        if candidate is not None and (candidate / ITERATION_KERNELS_FILE).is_file():
            return read_parquet(candidate / ITERATION_KERNELS_FILE)
    return None


def iteration_summary(tables: dict[str, pd.DataFrame]) -> dict[str, float | int | dict[str, float]]:
    """The captured iterations in a few numbers (serve_tables' result): how many, their summed GPU span, busy and
    idle ms (idle_pct: idle over span), the GPU idle between them (gap_ms), the median span minus CUDA-event time,
    and the kernel ms by class (summed over the iterations)."""
    gpu, k = tables[ITERATION_GPU_FILE], tables[ITERATION_KERNELS_FILE]
    span, idle = float(gpu["span_ms"].sum()), float(gpu["idle_ms"].sum())
    diff = gpu["span_minus_event_ms"].dropna()
    by_class = k.groupby("class")["ms"].sum().sort_values(ascending=False)
    return {"iterations": len(gpu), "span_ms": span, "busy_ms": float(gpu["busy_ms"].sum()), "idle_ms": idle,
            "idle_pct": 100 * idle / span if span > 0 else float("nan"), "gap_ms": float(gpu["gap_ms"].sum()),
            "span_minus_event_p50_ms": float(diff.median()) if len(diff) else float("nan"),
            "ms_by_class": {str(c): float(v) for c, v in by_class.items()}}
