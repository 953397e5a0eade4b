"""The two sides of `kvscope diff`, each recognised by what it is and read with the readers of the commands that made
it: a run folder (`kvscope run`; `inputs.read_run`) or a folder of run folders (repeats of one run), a capture (a
`kvscope align` or `kvscope nsys` output folder, its steps.parquet and kernels.parquet, with the run folder beside it
where there is one; or an nsys export, `.sqlite`, `.nsys-rep` or a parquetdir folder, aligned in memory as `kvscope
align` would), a sweep file (`.csv`/`.parquet`; `sweep_file.read_sweep`), or a served load (a `kvscope serve` run
folder, or the `run/` of a `kvscope nsys -- serve` folder; `serving.records.read_serve_run`).

Kinds compare like with like: two runs, two captures, two sweeps, two served loads. A capture that holds its run
folder (`kvscope nsys`) also compares with a run folder, through that run. Anything else is one line
(`KvscopeError`).

What each side is (its model, dtype and shape; its device; the settings worth showing) is read here too, and what
makes a capture unusable for timing: no GPU operation at all (an empty capture), or fewer repetitions or decode steps
than the run it captured (a truncated capture). Those are not errors: the rows that need them say "cannot tell".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.align.pipeline import analyse
from kvscope.analysis.inputs import RunFiles, read_parquet, read_run, require_columns, require_numbers
from kvscope.analysis.serving.records import ServeRun, find_serve_run, is_serve_sweep, read_serve_run
from kvscope.analysis.sweep_file import SWEEP_FORMATS, read_sweep
from kvscope.errors import KvscopeError
from kvscope.schema import KERNELS_FILE, NSYS_RUN_SUBFOLDER, STEPS_FILE, SUMMARY_FILE

RUN, CAPTURE, SWEEP, SERVE = "run folder", "capture", "sweep file", "served load"
EXPORT_SUFFIXES = (".sqlite", ".nsys-rep")
PARQUETDIR_MARKER = "NVTX_EVENTS.parquet"  # a folder of `nsys export --type parquetdir`
# what a side is (a difference in any of them makes every row "cannot tell", or is refused)
IDENTITY_KEYS = ("model", "dtype", "batch", "seq_len", "gen_tokens")
# settings shown beside the table when they differ (a run's summary columns; what a change usually is)
SETTING_KEYS = ("engine", "attn", "granularity", "cuda_graphs", "kernels", "clock")
# a served load's identity: the model and the load offered (a difference: refused, or every row "cannot tell")
SERVE_IDENTITY_KEYS = ("model", "dtype", "rps", "concurrency", "prompt_len", "output_len", "requests", "duration_s",
                       "request_file", "max_seq")
# a served load's settings shown when they differ: the scheduler and engine (what a change to a server usually is)
SERVE_SETTING_KEYS = ("policy", "preempt", "block_size", "max_batch_tokens", "max_seqs", "kv_pool_gb", "kv_pool_frac",
                      "graphs", "kernels", "granularity", "seed", "slo_ttft_ms", "slo_tpot_ms", "clock")
STEPS_COLUMNS = ("rep", "phase", "step", "gpu_span_ms", "gpu_busy_ms")
KERNELS_COLUMNS = ("kind", "name", "dur_ns", "kernel_class", "rep", "phase", "step")
_RUN_RANGE = re.compile(r"^run bs=(\d+) seq=(\d+) gen=(\d+)$")


@dataclass(frozen=True)
class Side:
    """One side of a diff, read and checked. `kind`: RUN, CAPTURE or SWEEP. `identity`: IDENTITY_KEYS (None where
    the side does not say, as an export does not name its model). `run`: the run folder (a run, or a capture's own
    run). `steps`, `kernels`: a capture's tables. `sweep`: a sweep's rows. `problem`: why a capture cannot be timed
    (empty, truncated), None when it can."""

    label: str  # "A" or "B"
    path: Path
    kind: str
    identity: dict[str, Any]
    device: str | None
    settings: dict[str, str] = field(default_factory=dict)
    run: RunFiles | None = None
    runs: tuple[RunFiles, ...] = ()  # a set of run folders (the unit of replication then the run), else empty
    steps: pd.DataFrame | None = None
    kernels: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    serve: ServeRun | None = None  # a served load's records
    problem: str | None = None


def read_side(path: Path, label: str) -> Side:
    """The side at `path` (see the module docstring); anything that is none of the kinds is a one-line error."""
    if not path.exists():
        raise KvscopeError(f"{label} {path} is missing")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in SWEEP_FORMATS:
            return _sweep_side(path, label)
        if suffix in EXPORT_SUFFIXES:
            return _export_side(path, label)
        raise KvscopeError(f"{label} {path} is not a run folder, an align or nsys folder, an nsys export (.sqlite, "
                           ".nsys-rep) or a sweep file (.csv, .parquet)")
    if not path.is_dir():
        raise KvscopeError(f"{label} {path} is neither a file nor a folder")
    if is_serve_sweep(path):
        raise KvscopeError(f"{label} {path} is a kvscope serve sweep folder: kvscope diff compares two served loads; "
                           f"pass two points' run folders (such as {path / '<point>'}) instead")
    served = find_serve_run(path)
    if served is not None:
        return _serve_side(read_serve_run(served), path, label)
    if (path / PARQUETDIR_MARKER).is_file():
        return _export_side(path, label)
    if (path / STEPS_FILE).exists() or (path / KERNELS_FILE).exists():
        return _capture_folder_side(path, label)
    if (path / SUMMARY_FILE).exists() or (path / NSYS_RUN_SUBFOLDER / SUMMARY_FILE).exists():
        return _run_side(read_run(path), path, label)
    members = run_set_members(path)
    if members:
        return _run_set_side(path, label, members)
    raise KvscopeError(f"{label} {path} is not a run folder (no {SUMMARY_FILE}), a folder of run folders, an align "
                       f"or nsys folder (no {STEPS_FILE}) or an nsys export")


def run_set_members(path: Path) -> list[Path]:
    """The run folders directly inside `path` (each with its summary.parquet, or a `kvscope nsys` folder's run/), by
    name; empty when there are none."""
    try:
        entries = sorted(p for p in path.iterdir() if p.is_dir())
    except OSError as exc:
        raise KvscopeError(f"{path} cannot be read: {exc.strerror or exc}") from None
    return [p for p in entries if (p / SUMMARY_FILE).exists() or (p / NSYS_RUN_SUBFOLDER / SUMMARY_FILE).exists()]


def _run_set_side(path: Path, label: str, members: list[Path]) -> Side:
    """A folder of run folders of one model, dtype, shape and device: each run one sample of every row (the runs are
    the unit of replication, which takes in what differs from one process to the next)."""
    sides = [_run_side(read_run(m), m, label) for m in members]
    first = sides[0]
    for other in sides[1:]:
        pairs = [(k, first.identity.get(k), other.identity.get(k)) for k in IDENTITY_KEYS]
        differs = [f"{k} ({x} vs {y})" for k, x, y in (*pairs, ("device", first.device, other.device))
                   if str(x) != str(y)]
        if differs:
            raise KvscopeError(f"{label} {path} holds runs of different measurements: {first.path.name} and "
                               f"{other.path.name} differ in {', '.join(differs)}; a folder of runs holds repeats of "
                               "one run")
    return replace(first, path=path, run=sides[0].run, runs=tuple(s.run for s in sides if s.run is not None))


def comparable(a: Side, b: Side) -> tuple[Side, Side]:
    """The two sides as they compare: of one kind, or a capture holding its run against a run folder (both then
    compared as runs). Other pairs are a one-line error."""
    if a.kind == b.kind:
        return a, b
    if SERVE in (a.kind, b.kind):
        raise KvscopeError(f"mismatched kinds: A {a.path} is a {_kind_text(a)} and B {b.path} a {_kind_text(b)}; "
                           "kvscope diff compares a served load (kvscope serve) only with another served load")
    for x, y in ((a, b), (b, a)):
        if x.kind == CAPTURE and y.kind == RUN and x.run is not None:
            as_run = replace(x, kind=RUN, steps=None, kernels=None, problem=None, runs=(x.run,))
            return (as_run, y) if x is a else (y, as_run)
    raise KvscopeError(f"A {a.path} is a {_kind_text(a)} and B {b.path} a {_kind_text(b)}: kvscope diff compares "
                       "two run folders, two captures or two sweep files")


def _kind_text(side: Side) -> str:
    if side.kind == CAPTURE and side.run is None:
        return "capture without its run folder"
    return f"folder of {len(side.runs)} run folders" if len(side.runs) > 1 else side.kind


# ---- run folders --------------------------------------------------------------------------------------------
def _run_side(run: RunFiles, path: Path, label: str) -> Side:
    if "rank" in run.timings.columns:
        raise KvscopeError(f"{label} {path} is a tensor-parallel run (timings per rank): kvscope diff compares "
                           "single-process runs")
    row = run.summary.iloc[0]
    identity = {k: _plain(row[k]) for k in IDENTITY_KEYS if k in row.index}
    meta = run.metadata or {}
    settings = {k: str(_plain(row[k])) for k in SETTING_KEYS if k in row.index}
    settings.setdefault("engine", str(meta.get("engine", "kvscope")))
    return Side(label, path, RUN, identity, str(row["device"]), settings, run=run, runs=(run,))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


# ---- served loads -------------------------------------------------------------------------------------------
def _serve_side(serve: ServeRun, path: Path, label: str) -> Side:
    """A served load: its identity (the model and the load offered), its device and its scheduler settings, from
    the run's metadata (`meta["serve"]` for the load and the scheduler)."""
    meta, settings = serve.metadata, serve.serve
    model = meta.get("model")
    spec = model.get("spec") if isinstance(model, dict) else model
    identity = {k: _plain(settings.get(k)) for k in SERVE_IDENTITY_KEYS}
    identity.update(model=spec if spec is not None else settings.get("model"), dtype=meta.get("dtype"))
    shown = {k: str(_plain(settings.get(k))) for k in SERVE_SETTING_KEYS if k in settings}
    if "clock" in meta:
        shown["clock"] = str(meta["clock"])
    device = meta.get("device")
    return Side(label, path, SERVE, identity, str(device) if device is not None else None, shown, serve=serve)


# ---- captures -----------------------------------------------------------------------------------------------
def _capture_folder_side(path: Path, label: str) -> Side:
    """An align or nsys output folder: its steps and kernels, and its run folder where it holds one (DIR/run/ of
    `kvscope nsys`, or the run folder itself when `kvscope align` wrote into it)."""
    for name in (STEPS_FILE, KERNELS_FILE):
        if not (path / name).exists():
            raise KvscopeError(f"{label} {path} holds no {name}: not a whole align or nsys output folder")
    steps = _checked(read_parquet(path / STEPS_FILE), path / STEPS_FILE, STEPS_COLUMNS, "kvscope align steps",
                     ("gpu_span_ms", "gpu_busy_ms"))
    kernels = _checked(read_parquet(path / KERNELS_FILE), path / KERNELS_FILE, KERNELS_COLUMNS,
                       "kvscope align kernels", ("dur_ns",))
    run = None
    if (path / SUMMARY_FILE).exists() or (path / NSYS_RUN_SUBFOLDER / SUMMARY_FILE).exists():
        run = read_run(path)
    return _capture_side(path, label, steps, kernels, run)


def _export_side(path: Path, label: str) -> Side:
    """An nsys export aligned in memory as `kvscope align EXPORT` would (no run folder to join)."""
    result = analyse(path)
    if result.steps is None:
        why = (result.skipped or "").split(": ", 1)[-1] or "no kvscope steps"
        raise KvscopeError(f"{label} {path} holds no kvscope steps ({why}): kvscope diff compares captures of kvscope "
                           "runs")
    return _capture_side(path, label, result.steps, result.kernels, None)


def _checked(df: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str, numbers: tuple[str, ...]
             ) -> pd.DataFrame:
    require_columns(df, path, columns, what)
    return require_numbers(df, path, numbers, what)


def _capture_side(path: Path, label: str, steps: pd.DataFrame, kernels: pd.DataFrame, run: RunFiles | None) -> Side:
    if "pid" in steps.columns and steps["pid"].nunique() > 1:
        raise KvscopeError(f"{label} {path} holds the steps of {steps['pid'].nunique()} processes (a tensor-parallel "
                           "capture): kvscope diff compares one process's capture")
    if run is not None:
        base = _run_side(run, path, label)
        identity, device, settings = base.identity, base.device, base.settings
    else:
        identity, device, settings = _capture_identity(steps), None, {}
    problem = capture_problem(steps, kernels, identity, run)
    return Side(label, path, CAPTURE, identity, device, settings, run=run, steps=steps, kernels=kernels,
                problem=problem)


def _capture_identity(steps: pd.DataFrame) -> dict[str, Any]:
    """The shape a capture without its run folder says in its `run bs=B seq=S gen=G` range (model and dtype
    unknown)."""
    identity: dict[str, Any] = dict.fromkeys(IDENTITY_KEYS)
    names = steps["run"].dropna().astype(str).unique() if "run" in steps.columns else []
    if len(names) == 1 and (m := _RUN_RANGE.match(names[0])):
        identity.update(batch=int(m[1]), seq_len=int(m[2]), gen_tokens=int(m[3]))
    return identity


def capture_problem(steps: pd.DataFrame, kernels: pd.DataFrame, identity: dict[str, Any], run: RunFiles | None
                    ) -> str | None:
    """Why a capture cannot be timed, or None: no step, no GPU operation in its steps (empty), fewer repetitions
    than its run's, or a repetition with fewer decode steps than the shape's gen_tokens - 1 (truncated)."""
    if not len(steps):
        return "its capture holds no prefill or decode step (an empty or truncated capture)"
    in_steps = kernels["phase"].isin(["prefill", "decode"]).fillna(False) if len(kernels) else pd.Series(dtype=bool)
    if not len(kernels) or not bool(in_steps.any()):
        return "its capture holds no GPU operation in its steps (an empty capture)"
    reps = steps["rep"].dropna().nunique()
    if run is not None and reps < int(run.summary.iloc[0]["reps"]):
        return (f"its capture holds {reps} of the run's {int(run.summary.iloc[0]['reps'])} repetitions (a truncated "
                "capture)")
    gen = identity.get("gen_tokens")
    if gen is not None and gen > 1:
        held = steps[steps["phase"] == "decode"].groupby("rep")["step"].nunique()
        held = held.reindex(sorted(steps["rep"].dropna().unique()), fill_value=0)
        short = held[held < gen - 1]
        if len(short):
            return (f"its repetition {int(short.index[0])} holds {int(short.iloc[0])} of {gen - 1} decode steps (a "
                    "truncated capture)")
    return None


# ---- sweep files ----------------------------------------------------------------------------------------------
def _sweep_side(path: Path, label: str) -> Side:
    df = read_sweep(path)
    identity: dict[str, Any] = dict.fromkeys(IDENTITY_KEYS)
    for key in ("model", "dtype", "gen_tokens"):  # one value in the file (gen_tokens: where one engine's)
        values = df[key].dropna().unique() if key in df.columns else []
        if len(values) == 1:
            identity[key] = _plain(values[0])
    device = str(df["device"].dropna().iloc[0]) if "device" in df.columns and df["device"].notna().any() else None
    settings = {k: str(df[k].dropna().iloc[0]) for k in SETTING_KEYS if k in df.columns and df[k].notna().any()}
    return Side(label, path, SWEEP, identity, device, settings, sweep=df)


def identity_differences(a: Side, b: Side) -> list[str]:
    """What makes A and B different measurements (IDENTITY_KEYS both sides know and that differ), as
    "model (tiny vs qwen2.5-0.5b)"."""
    out = []
    serve = a.kind == SERVE  # a load's keys are all known: an open loop's concurrency is None, a closed loop's rps
    for key in SERVE_IDENTITY_KEYS if serve else IDENTITY_KEYS:
        x, y = a.identity.get(key), b.identity.get(key)
        if (serve or (x is not None and y is not None)) and str(x) != str(y):
            out.append(f"{key} ({x} vs {y})")
    return out


def setting_differences(a: Side, b: Side) -> list[str]:
    """The settings both sides record and that differ (what the change was), as "attn (sdpa vs kvscope)"."""
    keys = SERVE_SETTING_KEYS if a.kind == SERVE else SETTING_KEYS
    return [f"{k} ({a.settings[k]} vs {b.settings[k]})" for k in keys
            if k in a.settings and k in b.settings and a.settings[k] != b.settings[k]]
