"""The profiled run behind `kvscope nsys` (and the nsys flags of `kvscope sweep --nsys`): profile a command under Nsight
Systems, turn the capture into an export, and align it, into one output folder (report.nsys-rep, report.sqlite, the
tables of `kvscope align` and its trace.json).

By default the command is `kvscope run` (the arguments after `--` are its options: none, or starting with `-`, or
`kvscope run ...`): the capture covers the measured repetitions only (`--capture-range=cudaProfilerApi`: `kvscope
run` calls cudaProfilerStart/Stop around them) and keeps the program alive after the range
(`--capture-range-end=stop`) so that the run folder (`run/`) is written and aligned with the capture. `serve ...`
profiles `kvscope serve` the same way: the capture holds the served load's loop (cudaProfilerStart/Stop around it,
after the warm-up and the graph captures), `run/` is its serve run folder, and beside the alignment (made without
the run's timings: its `iter N` regions are not a run's) go iteration_kernels.parquet and iteration_gpu.parquet, the
GPU work of every scheduler iteration (`kvscope.analysis.serving.iterations_nsys`). Any other
command (`kvscope nsys -- python3 serve.py ...`) is profiled whole, without a capture range, and its export is
aligned as any export (`kvscope align EXPORT`); there is no run folder. `--cuda-graph-trace=node` makes kernels
inside CUDA graphs visible one by one.

Extra `nsys profile` flags (`--nsys-flag`, repeatable, each one option: `--sample=cpu`, `--trace=cuda,nvtx,osrt`, or
`-t cuda,nvtx,osrt` split like a shell would) come after kvscope's and replace kvscope's own value of the same option
(`-t` and `--trace` are one option); the output options (`-o`, `-f` and their long forms) are kvscope's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvscope.analysis.align.phase_map import PhaseMap
from kvscope.analysis.align.pipeline import AlignResult, analyse, write
from kvscope.analysis.align.ranks import analyse_ranks, write_ranks
from kvscope.analysis.nsys.export import export_rep, find_nsys
from kvscope.analysis.serving.iterations_nsys import ITERATION_GPU_FILE, Captured, serve_tables
from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, check_path, write_parquet
from kvscope.measure.output import OUT_LABEL
from kvscope.schema import ITERATIONS_FILE, NSYS_RUN_SUBFOLDER, NVTX_DOMAIN, TIMINGS_FILE

# kvscope's own `nsys profile` options for any command, and for `kvscope run` (whose capture range it opens)
COMMAND_PROFILE_FLAGS = ("--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none", "--cuda-graph-trace=node")
NSYS_PROFILE_FLAGS = (*COMMAND_PROFILE_FLAGS, "--capture-range=cudaProfilerApi", "--capture-range-end=stop")
# `kvscope sweep --nsys`: one report per cudaProfilerStart/Stop pair (one per sweep point), the sweep running on
SWEEP_PROFILE_FLAGS = (*COMMAND_PROFILE_FLAGS, "--capture-range=cudaProfilerApi", "--capture-range-end=repeat")
# nsys's short options and their long names, for telling which of kvscope's options an extra flag replaces
_SHORT = {"-t": "--trace", "-s": "--sample", "-c": "--capture-range", "-o": "--output", "-f": "--force-overwrite",
          "-b": "--backtrace", "-w": "--show-output", "-x": "--stop-on-exit", "-d": "--duration", "-y": "--delay",
          "-e": "--env-var", "-n": "--inherit-environment", "-p": "--nvtx-capture"}
_OWN_OPTIONS = ("--output", "--force-overwrite")  # kvscope names and places the report
# the kvscope commands profiled with a capture range and a run folder, and the file that shows their folder written
RUN_PROGRAM, SERVE_PROGRAM = "run", "serve"
_RUN_FOLDER_FILE = {RUN_PROGRAM: TIMINGS_FILE, SERVE_PROGRAM: ITERATIONS_FILE}


@dataclass
class Profiled:
    """A profiled and aligned command: the folder written, the alignment, the per-rank split (`run --tp`), the
    profiled command's exit code (0 for `kvscope run` and `kvscope serve`), and a served load's per-iteration tables
    by file name (None for any other command)."""

    folder: Path
    result: AlignResult
    split: tuple[pd.DataFrame, Any] | None
    exit_code: int
    iterations: dict[str, pd.DataFrame] | None = None


def profile(out: Path, run_args: list[str] | None, command_args: list[str] | None, nsys: str | None,
            extra: Sequence[str], tp: int | None, meta: dict[str, Any], program: str = RUN_PROGRAM) -> Profiled:
    """Profile `kvscope PROGRAM RUN_ARGS` (`run` or `serve`; or any `COMMAND_ARGS`), export, align, and write it all
    into `out`, whole or not at all."""
    folder = AtomicFolder(out, OUT_LABEL)
    require_nsys(nsys)  # before the output folder is made
    exit_code = 0
    try:
        folder.open()
        if run_args is not None:
            rep, run_dir = capture(run_args, folder.tmp, nsys, extra, program)
            what: dict[str, Any] = {f"{program}_args": run_args}
        else:
            rep, exit_code = capture_command(list(command_args or []), folder.tmp, nsys, extra)
            run_dir, what = None, {"profiled": command_args, "exit_code": exit_code}
        sqlite = export_rep(rep, nsys, out=folder.tmp / "report.sqlite")
        meta = {**meta, **what, "nsys_flags": list(extra)}
        split = iterations = None
        if tp is not None:  # every rank in one capture: aligned per rank (kvscope.analysis.align.ranks)
            result, split = analyse_ranks(sqlite, run_dir)
        elif program == SERVE_PROGRAM and run_dir is not None:
            result, iterations = align_serve(sqlite, run_dir)
        else:
            result = analyse(sqlite, run_dir)
        write(result, folder.tmp, meta)
        if split is not None:
            write_ranks(split, folder.tmp, meta)
        for name, df in (iterations or {}).items():
            write_parquet(df, folder.tmp / name, meta)
        done = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return Profiled(done, result, split, exit_code, iterations)


def align_serve(export: Path, run_dir: Path) -> tuple[AlignResult, dict[str, pd.DataFrame]]:
    """A served load's capture aligned, and its per-iteration tables by file name. Aligned without the run's timings
    (its `iter N` regions are not a run's), and with an empty phase map: the layer and op ranges of eager iterations
    are labelled by kvscope's names, but none need be there (a capture of graph-replayed decode iterations holds
    `iter N` ranges alone, which `analyse` would otherwise refuse as a kvscope domain without a run's names)."""
    result = analyse(export, phase_map=PhaseMap(()))
    if result.skipped is not None:
        result.skipped = (f"{result.skipped.split(':', 1)[0]}: the served load's ranges in the NVTX domain "
                          f"'{NVTX_DOMAIN}' are `iter N` alone (graph-replayed iterations); see {ITERATION_GPU_FILE}")
    return result, serve_tables(Captured(result.ranges, result.kernels, str(export)), run_dir)


def extra_flags(values: Sequence[str]) -> list[str]:
    """The `--nsys-flag` values as `nsys profile` arguments: each value split like a shell would, each starting with
    an option; kvscope's output options refused."""
    out: list[str] = []
    for value in values:
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise KvscopeError(f"nsys: --nsys-flag {value!r}: {exc}") from None
        if not parts or not parts[0].startswith("-"):
            raise KvscopeError(f"nsys: --nsys-flag {value!r} is not an nsys option (write --nsys-flag=--sample=cpu)")
        if _option(parts[0]) in _OWN_OPTIONS:
            raise KvscopeError(f"nsys: --nsys-flag {value!r}: kvscope sets the report's name and place; give --out")
        out += parts
    return out


def _option(arg: str) -> str:
    """The long name of the option `arg` starts with: `--trace=cuda` -> `--trace`, `-t` -> `--trace`."""
    name = arg.split("=", 1)[0]
    return _SHORT.get(name, name) if not name.startswith("--") else name


def profile_flags(own: Sequence[str], extra: Sequence[str]) -> list[str]:
    """kvscope's options without those that `extra` sets again, then `extra`."""
    replaced = {_option(a) for a in extra if a.startswith("-")}
    return [*(f for f in own if _option(f) not in replaced), *extra]


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


def require_nsys(nsys: str | None) -> str:
    """The nsys executable (find_nsys), or a one-line error: naming the path tried when one was given (`--nsys PATH`,
    else `$NSYS`), else the ways to give it."""
    exe = find_nsys(nsys)
    if exe is not None:
        return exe
    given = [(how, value) for how, value in (("--nsys", nsys), ("$NSYS", os.environ.get("NSYS"))) if value]
    if given:
        how, value = given[0]
        found = check_path(value, how)
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise KvscopeError(f"{how} {value} is a folder, not the nsys executable")
        where = "no such file" if os.sep in value else "no such file here, and no command of that name on PATH"
        raise KvscopeError(f"{how} {value}: nsys not found ({where})")
    raise KvscopeError("nsys not found: pass --nsys PATH, set $NSYS, or put nsys on PATH")


def _profile(exe: str, flags: Sequence[str], program: Sequence[str], out: Path) -> tuple[int, Path, list[str]]:
    """`nsys profile FLAGS -o OUT/report PROGRAM`: (nsys's exit code, OUT/report.nsys-rep, the command line). A raw
    capture nsys could not import is imported here (QdstrmImporter) when exactly one is left."""
    report = out / "report"
    # nsys keeps its raw capture (`nsys-report-*.qdstrm`) in its temporary folder: a private one, so that a capture
    # nsys could not import is ours, never another process's
    scratch = out / "nsys-tmp"
    scratch.mkdir(exist_ok=True)
    cmd = profile_command(exe, flags, program, report)
    try:
        proc = subprocess.run(cmd, check=False, env={**os.environ, "TMPDIR": str(scratch)})
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise KvscopeError(f"cannot run {exe}: {exc.strerror or exc}") from None
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
    return proc.returncode, rep, cmd


def profile_command(exe: str, flags: Sequence[str], program: Sequence[str], report: Path) -> list[str]:
    """`nsys profile FLAGS -o REPORT -f true PROGRAM` (REPORT without its suffix)."""
    return [exe, "profile", *flags, "-o", str(report), "-f", "true", *program]


def capture(run_args: list[str], out: Path, nsys: str | None, extra: Sequence[str] = (),
            program: str = RUN_PROGRAM) -> tuple[Path, Path]:
    """Profile `kvscope PROGRAM RUN_ARGS --out OUT/run` (`run`, or `serve`: one served load); returns
    (report.nsys-rep, run folder)."""
    if program not in _RUN_FOLDER_FILE:
        raise KvscopeError(f"nsys: profiles `kvscope {' or '.join(_RUN_FOLDER_FILE)}` with a run folder, not "
                           f"{program!r}")
    exe = require_nsys(nsys)
    run_dir = out / NSYS_RUN_SUBFOLDER
    written = run_dir / _RUN_FOLDER_FILE[program]
    argv = [sys.executable, "-m", "kvscope", program, *run_args, "--out", str(run_dir)]
    code, rep, cmd = _profile(exe, profile_flags(NSYS_PROFILE_FLAGS, extra), argv, out)
    if code != 0 and not (rep.is_file() and written.is_file()):
        raise KvscopeError(f"nsys profile exited with code {code} (command: {' '.join(cmd)})")
    if not rep.is_file():
        raise KvscopeError(f"nsys wrote no report ({rep}); is the driver's profiling support available?")
    if not written.is_file():
        raise KvscopeError(f"the profiled {program} wrote no run folder at {run_dir}")
    return rep, run_dir


def capture_command(program: list[str], out: Path, nsys: str | None, extra: Sequence[str] = ()) -> tuple[Path, int]:
    """Profile any command, whole; returns (report.nsys-rep, the exit code of nsys, which is the command's). A
    command that fails after nsys wrote its report is still aligned (the caller says so)."""
    exe = require_nsys(nsys)
    code, rep, cmd = _profile(exe, profile_flags(COMMAND_PROFILE_FLAGS, extra), program, out)
    if not rep.is_file():
        raise KvscopeError(f"nsys wrote no report ({rep}; exit code {code}; command: {shlex.join(cmd)})")
    return rep, code
