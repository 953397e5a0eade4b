"""`kvscope sweep --nsys`: the sweep under Nsight Systems, one report per configuration, and each row's attribution.

One nsys process around the whole sweep, so the model loads once: `nsys profile --capture-range=cudaProfilerApi
--capture-range-end=repeat ... python3 -c <the sweep>`. Each configuration times its repetitions between
cudaProfilerStart and cudaProfilerStop (`kvscope.measure.run.measure`), and nsys writes one report per such range.
The sweep inside nsys is the ordinary one (`kvscope.measure.sweep.run_sweep`, given as JSON in a file): it appends
each finished row to the sweep file as it always does, so a crash loses no finished row and `--resume` works as
without nsys.

When nsys has ended, each report is exported (`nsys export --type sqlite`), aligned (`align.pipeline.analyse`) and
matched to its configuration by its `run bs=B seq=S gen=G` range (never by file name or order); its attribution
(`kvscope.analysis.align.attribution`) is added to that configuration's row, after every other column. A report that
names no configuration of this sweep, or a row flagged `oom`, gets no attribution (empty cells); so do rows of earlier
sweeps of the file. Captures are kept beside the sweep file, `<stem>-nsys/<run_id>/`: the report (`report.nsys-rep`),
its export (`report.sqlite`), the tables of `kvscope align` and its trace.json; with `--keep-reports off` the Parquet
tables only. The row's `nsys_report` column holds that folder's path relative to the sweep file's folder. A
configuration captured again (a resumed sweep that runs it again) replaces its folder whole (`kvscope.io.AtomicFolder`),
and only a folder that holds such files and nothing else: any other is kept, and the row gets no attribution.

nsys is looked for before anything else runs (a one-line error and exit code 2 without it); the configurations and
the sweep file are checked before nsys starts, as the sweep checks them before loading the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd

from kvscope.analysis.align.attribution import PointFacts, aligned, attribution, run_keys
from kvscope.analysis.align.pipeline import write
from kvscope.analysis.nsys.export import export_rep
from kvscope.analysis.sweep_file import read_sweep
from kvscope.engine.plan import RunPlan, RunSpec, prepare
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder
from kvscope.measure.nsys import (
    SWEEP_PROFILE_FLAGS,
    extra_flags,
    find_importer,
    profile_command,
    profile_flags,
    require_nsys,
)
from kvscope.measure.sweep import SweepSpec, point_id, run_sweep
from kvscope.measure.sweep_file import SweepFile, sweep_settings
from kvscope.measure.sweep_out import OutputLock, check_out
from kvscope.model.dtypes import dtype_name, itemsize
from kvscope.schema import ALIGN_OUTPUT_FILES, ATTRIBUTION_COLUMNS, NSYS_REPORT_COLUMN, TRACE_FILE, is_oom

Say = Callable[[str], None]
CAPTURES_SUFFIX = "-nsys"  # <sweep file stem>-nsys/: the captures folder beside the sweep file
SPEC_FILE = "sweep.json"  # the sweep the program inside nsys runs
STATUS_FILE = "status.json"  # its exit code, written as it ends
REPORT_STEM = "capture"  # nsys's -o inside the scratch folder: capture*.nsys-rep
KEPT_REPORT = "report.nsys-rep"
KEPT_EXPORT = "report.sqlite"
_CHILD = "import sys; from kvscope.measure.sweep_nsys import child; sys.exit(child(sys.argv[1]))"


def captures_folder(path: Path) -> Path:
    """`<stem>-nsys/` beside the sweep file `path`."""
    return path.with_name(path.stem + CAPTURES_SUFFIX)


def run_under_nsys(sw: SweepSpec, say: Say) -> pd.DataFrame:
    """The sweep `sw` (with `sw.nsys` set) under one nsys process, then each row's attribution; the file's rows."""
    if sw.nsys is None:
        raise ValueError("run_under_nsys needs sw.nsys")
    _, path = check_out(sw.out)
    exe = require_nsys(sw.nsys.exe)
    extra = extra_flags(sw.nsys.flags)
    if not sw.collapse_factor > 1:
        raise KvscopeError(f"--collapse-factor must be > 1, got {sw.collapse_factor}")
    plans = {(s, b): prepare(replace(sw.base, seq=s, batch_size=b, out=None))
             for s in dict.fromkeys(sw.seqs) for b in dict.fromkeys(sw.batches)}
    settings = sweep_settings(next(iter(plans.values())), sw.collapse_factor)
    if not _todo(sw, path, settings, plans):
        say("every configuration is already in the file")
        return read_sweep(path)
    captures = captures_folder(path)
    try:
        captures.mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".capture-", dir=captures))
    except OSError as exc:
        raise KvscopeError(f"cannot make the captures folder {captures}: {exc.strerror or exc}") from None
    try:
        code = _profile(sw, exe, extra, path, scratch)
        if not path.exists():
            raise KvscopeError(f"the sweep under nsys stopped (exit code {code}) before its first configuration")
        done = _attribute_all(sw, path, plans, exe, captures, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            captures.rmdir()  # only when empty: nothing was captured
    say(f"nsys: {done} configuration(s) attributed; captures in {captures}")
    if code != 0:
        raise KvscopeError(f"the sweep under nsys stopped with exit code {code} (its error is above); the "
                           f"configurations it finished are in {sw.out}, {done} of them attributed")
    return read_sweep(path)


def _todo(sw: SweepSpec, path: Path, settings: dict[str, Any], plans: dict[tuple[int, int], RunPlan]
          ) -> list[tuple[int, int]]:
    """The configurations the file does not hold yet; the file's own problems (it exists without --resume, its
    settings differ) as the sweep would say them, before nsys starts."""
    if not path.exists():
        return list(plans)
    if not sw.resume:
        raise KvscopeError(f"{sw.out} exists; pass --resume to continue that sweep, or choose another file")
    table = SweepFile.read(path, sw.out)
    table.check_settings(settings)
    finished = set(table.configs())
    return [c for c in plans if c not in finished]


def _profile(sw: SweepSpec, exe: str, extra: list[str], path: Path, scratch: Path) -> int:
    """Run the sweep inside `nsys profile`; the sweep's exit code (nsys's when the sweep wrote none)."""
    inner = replace(sw, out=path, nsys=None, base=replace(sw.base, nvtx=True))  # NVTX on: the ranges are the key
    spec = scratch / SPEC_FILE
    spec.write_text(json.dumps(spec_json(inner)))
    tmp = scratch / "nsys-tmp"  # nsys's raw captures in a folder of ours (as kvscope nsys does)
    tmp.mkdir()
    flags = profile_flags(SWEEP_PROFILE_FLAGS, extra)
    cmd = profile_command(exe, flags, [sys.executable, "-c", _CHILD, str(spec)], scratch / REPORT_STEM)
    try:
        proc = subprocess.run(cmd, check=False, env={**os.environ, "TMPDIR": str(tmp)})
    except OSError as exc:
        raise KvscopeError(f"cannot run {exe}: {exc.strerror or exc}") from None
    status = scratch / STATUS_FILE
    try:
        return int(json.loads(status.read_text())["exit"])
    except (OSError, ValueError, KeyError, TypeError):
        return proc.returncode or 1  # the sweep never wrote its status: it did not run, or was killed


def spec_json(sw: SweepSpec) -> dict[str, Any]:
    """A sweep without nsys as JSON (the program inside nsys reads it back with `spec_from_json`)."""
    return {"base": asdict(sw.base), "seqs": list(sw.seqs), "batches": list(sw.batches), "out": str(sw.out),
            "collapse_factor": sw.collapse_factor, "resume": sw.resume}


def spec_from_json(data: dict[str, Any]) -> SweepSpec:
    return SweepSpec(RunSpec(**data["base"]), tuple(data["seqs"]), tuple(data["batches"]), Path(data["out"]),
                     float(data["collapse_factor"]), bool(data["resume"]))


def child(spec_file: str) -> int:
    """The program inside nsys: the sweep of `spec_file`; its exit code is also written to `status.json` beside it
    (0, or 2 after a one-line error)."""
    status = Path(spec_file).with_name(STATUS_FILE)
    code = 1  # anything but a finished sweep or a KvscopeError (a traceback, Ctrl-C)
    try:
        sw = spec_from_json(json.loads(Path(spec_file).read_text()))
        run_sweep(sw, log=lambda m: print(f"kvscope: {m}", file=sys.stderr, flush=True))
        code = 0
    except KvscopeError as exc:
        print(f"kvscope: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        code = 2
    finally:
        status.write_text(json.dumps({"exit": code}))
    return code


def _attribute_all(sw: SweepSpec, path: Path, plans: dict[tuple[int, int], RunPlan], exe: str,
                   captures: Path, scratch: Path, say: Say) -> int:
    """Export, align and attribute every report; add the columns to the rows of the sweep file. The number of rows
    attributed."""
    keep = sw.nsys is not None and sw.nsys.keep_reports
    with OutputLock(path, sw.out, say):
        table = SweepFile.read(path, sw.out)
        flags = dict(zip(table.configs(), table.numbers["flag"].fillna("").astype(str), strict=True))
        values: dict[tuple[int, int], dict[str, Any]] = {}
        reports = sorted(scratch.glob(f"{REPORT_STEM}*.nsys-rep")) + _imported(scratch, exe, say)
        if not reports:
            say("nsys wrote no report (no CUDA device, or the driver's profiling support is off): no attribution")
        for i, rep in enumerate(reports):
            got = _one_report(rep, i, exe, plans, flags, captures, scratch, keep, say)
            if got is None:
                continue
            key, vals = got
            vals[NSYS_REPORT_COLUMN] = os.path.relpath(captures / point_id(plans[key]), path.parent)
            values[key] = vals
        table.annotate(values, ATTRIBUTION_COLUMNS)
        try:
            table.write(path, {"sweep": table.meta})
        except OSError as exc:
            raise KvscopeError(f"cannot write {sw.out}: {exc.strerror or exc}; its rows are as the sweep wrote "
                               "them, without attribution") from None
    return len(values)


def _imported(scratch: Path, exe: str, say: Say) -> list[Path]:
    """Raw captures nsys left unimported (`*.qdstrm`, in the scratch folder or nsys's temporary one), imported with
    QdstrmImporter where it is found: the reports made."""
    raw = sorted(scratch.glob("*.qdstrm")) + sorted((scratch / "nsys-tmp").glob("*.qdstrm"))
    if not raw:
        return []
    importer = find_importer(exe)
    if importer is None:
        say(f"nsys left {len(raw)} raw capture(s) unimported and QdstrmImporter was not found; left out")
        return []
    made = []
    for q in raw:
        subprocess.run([importer, "-i", str(q)], check=False, capture_output=True)
        if q.with_suffix(".nsys-rep").is_file():
            made.append(q.with_suffix(".nsys-rep"))
        else:
            say(f"{q.name}: QdstrmImporter made no report; left out")
    return made


def _one_report(rep: Path, i: int, exe: str, plans: dict[tuple[int, int], RunPlan], flags: dict[tuple[int, int], str],
                captures: Path, scratch: Path, keep: bool, say: Say) -> tuple[tuple[int, int], dict[str, Any]] | None:
    """One report exported, aligned, attributed and kept: ((seq, batch), its columns), or None (said why) when it
    holds no configuration of this sweep, or one whose row is missing or flagged `oom` (`flags`: each row's)."""
    work = scratch / f"point-{i}"
    work.mkdir()
    try:
        result = aligned(export_rep(rep, exe, out=work / KEPT_EXPORT))
    except KvscopeError as exc:
        say(f"{rep.name}: {exc}; left out")
        return None
    runs = run_keys(result)
    if len(runs) != 1:
        say(f"{rep.name}: holds {len(runs)} kvscope runs (expected one `run bs=.. seq=.. gen=..` range); left out")
        return None
    batch, seq, _gen = runs[0]
    plan = plans.get((seq, batch))
    if plan is None:
        say(f"{rep.name}: seq {seq} batch {batch} is not a configuration of this sweep; left out")
        return None
    if (seq, batch) not in flags or is_oom(flags[(seq, batch)]):
        why = "out of memory" if (seq, batch) in flags else "the sweep file has no row of it"
        say(f"seq {seq} batch {batch}: {why}; no attribution")
        return None
    facts = PointFacts(plan.source.args, batch, seq, itemsize(plan.cfg.dtype), dtype_name(plan.cfg.dtype),
                       plan.ceilings)
    values = attribution(result, facts)
    try:  # a new folder, or this point's earlier capture, replaced whole; never anything else
        with AtomicFolder(captures / point_id(plan), "capture folder", replaceable=is_capture_output) as tmp:
            write(result, tmp, {"sweep_point": point_id(plan), "report": KEPT_REPORT})
            if keep:
                shutil.move(str(rep), tmp / KEPT_REPORT)
                shutil.move(str(work / KEPT_EXPORT), tmp / KEPT_EXPORT)
            else:
                (tmp / TRACE_FILE).unlink()
    except KvscopeError as exc:
        say(f"{exc}; seq {seq} batch {batch} gets no attribution")
        return None
    return (seq, batch), values


def is_capture_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but what a point's capture folder holds (an earlier capture of the point)."""
    names = (*ALIGN_OUTPUT_FILES, TRACE_FILE, KEPT_REPORT, KEPT_EXPORT)
    return all(p.name in names and p.is_file() and not p.is_symlink() for p in folder.iterdir())
