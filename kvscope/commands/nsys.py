"""`kvscope nsys`: run `kvscope run` under Nsight Systems, turn the capture into an export, and align it, into one
output folder (report.nsys-rep, report.sqlite, the run folder `run/`, and the tables of `kvscope align`).

The capture covers the measured repetitions only (`--capture-range=cudaProfilerApi`: `kvscope run` calls
cudaProfilerStart/Stop around them) and keeps the program alive after the range (`--capture-range-end=stop`) so
that the run folder is written. `--cuda-graph-trace=node` makes kernels inside CUDA graphs visible one by one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from kvscope.analysis.nsys import export_rep, find_nsys
from kvscope.analysis.report_align import analyse, write
from kvscope.analysis.schema import NSYS_RUN_SUBFOLDER, TIMINGS_FILE
from kvscope.commands.align import print_align
from kvscope.commands.options import run_spec
from kvscope.commands.run_output import OutputFolder
from kvscope.engine.plan import prepare
from kvscope.errors import KvscopeError

NSYS_PROFILE_FLAGS = ("-t", "cuda,nvtx", "-s", "none", "--cpuctxsw=none", "--capture-range=cudaProfilerApi",
                      "--capture-range-end=stop", "--cuda-graph-trace=node")


def command(ns: argparse.Namespace) -> int:
    """`ns.run_args`: the arguments of `kvscope run` as given; `ns.run`: the same, parsed (`kvscope.cli`)."""
    prepare(run_spec(ns.run))  # validate before starting nsys
    final = Path(ns.out) if ns.out else Path("traces") / f"{datetime.now():%Y%m%d-%H%M%S}-nsys"
    folder = OutputFolder(final)
    try:
        rep, run_dir = capture(ns.run_args, folder.tmp, ns.nsys)
        sqlite = export_rep(rep, ns.nsys, out=folder.tmp / "report.sqlite")
        result = analyse(sqlite, run_dir)
        write(result, folder.tmp, {"command": " ".join(sys.argv), "run_args": ns.run_args})
        done = folder.commit()
    except BaseException:
        folder.discard()
        raise
    print_align(result)
    print(f"nsys: {done} (report.nsys-rep, report.sqlite, run/, ranges, kernels, align, steps, kernel_classes)")
    return 0


def find_importer(nsys: str) -> str | None:
    """QdstrmImporter: `$QDSTRM_IMPORTER`, or inside the nsys install: beside the nsys executable or in a sibling
    `host-*` folder of the one that holds it (the layout of Nsight Systems and of the copy inside Nsight Compute).
    Never a recursive search: nsys on PATH as /usr/bin/nsys would otherwise walk the whole filesystem."""
    env = os.environ.get("QDSTRM_IMPORTER")
    if env and Path(env).is_file():
        return env
    folder = Path(nsys).resolve().parent
    candidates = [folder / "QdstrmImporter", *sorted(folder.parent.glob("host-*/QdstrmImporter"))]
    hits = [c for c in candidates if c.is_file()]
    return str(hits[0]) if hits else None


def capture(run_args: list[str], out: Path, nsys: str | None) -> tuple[Path, Path]:
    """Profile `kvscope run RUN_ARGS --out OUT/run`; returns (report.nsys-rep, run folder)."""
    exe = find_nsys(nsys)
    if exe is None:
        raise KvscopeError("nsys not found: pass --nsys PATH, set $NSYS, or put nsys on PATH")
    report = out / "report"
    run_dir = out / NSYS_RUN_SUBFOLDER
    # nsys keeps its raw capture (`nsys-report-*.qdstrm`) in its temporary folder: a private one, so that a capture
    # nsys could not import is ours, never another process's
    scratch = out / "nsys-tmp"
    scratch.mkdir(exist_ok=True)
    cmd = [exe, "profile", *NSYS_PROFILE_FLAGS, "-o", str(report), "-f", "true",
           sys.executable, "-m", "kvscope", "run", *run_args, "--out", str(run_dir)]
    proc = subprocess.run(cmd, check=False, env={**os.environ, "TMPDIR": str(scratch)})
    rep = report.with_suffix(".nsys-rep")
    if not rep.is_file():
        leftovers = sorted(out.glob("*.qdstrm")) + sorted(scratch.glob("*.qdstrm"))
        importer = find_importer(exe)
        if len(leftovers) == 1 and importer:
            subprocess.run([importer, "-i", str(leftovers[0])], check=False)
            made = leftovers[0].with_suffix(".nsys-rep")
            if made.is_file():
                shutil.move(str(made), rep)
    shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0 and not (rep.is_file() and (run_dir / TIMINGS_FILE).is_file()):
        raise KvscopeError(f"nsys profile exited with code {proc.returncode} (command: {' '.join(cmd)})")
    if not rep.is_file():
        raise KvscopeError(f"nsys wrote no report ({rep}); is the driver's profiling support available?")
    if not (run_dir / TIMINGS_FILE).is_file():
        raise KvscopeError(f"the profiled run wrote no run folder at {run_dir}")
    return rep, run_dir
