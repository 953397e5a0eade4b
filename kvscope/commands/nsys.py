"""`kvscope nsys`: profile a command under Nsight Systems, turn the capture into an export, and align it, into one
output folder (report.nsys-rep, report.sqlite, the tables of `kvscope align` and its trace.json).

By default the command is `kvscope run` (the arguments after `--` are its options: none, or starting with `-`, or
`kvscope run ...`): the capture covers the measured repetitions only (`--capture-range=cudaProfilerApi`: `kvscope
run` calls cudaProfilerStart/Stop around them) and keeps the program alive after the range
(`--capture-range-end=stop`) so that the run folder (`run/`) is written and aligned with the capture. Any other
command (`kvscope nsys -- python3 serve.py ...`) is profiled whole, without a capture range, and its export is
aligned as any export (`kvscope align EXPORT`); there is no run folder. `--cuda-graph-trace=node` makes kernels
inside CUDA graphs visible one by one.

Extra `nsys profile` flags (`--nsys-flag`, repeatable, each one option: `--sample=cpu`, `--trace=cuda,nvtx,osrt`, or
`-t cuda,nvtx,osrt` split like a shell would) come after kvscope's and replace kvscope's own value of the same option
(`-t` and `--trace` are one option); the output options (`-o`, `-f` and their long forms) are kvscope's.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console

from kvscope.analysis.align.ranks import ranks_table
from kvscope.commands.align import print_align
from kvscope.commands.json_out import align_payload, json_line
from kvscope.engine.plan import prepare
from kvscope.measure.nsys import extra_flags, profile
from kvscope.measure.options import run_spec
from kvscope.measure.tp_launch import check_plan


def command(ns: argparse.Namespace) -> int:
    """`ns.run` (the `kvscope run` arguments parsed) and `ns.run_args`, or `ns.command_args` (any other command),
    as `kvscope.cli` leaves them; `ns.nsys_flag`: the extra nsys flags."""
    extra = extra_flags(getattr(ns, "nsys_flag", []))
    tp = getattr(ns.run, "tp", None) if ns.run is not None else None
    if ns.run is not None:
        plan = prepare(run_spec(ns.run))  # validate before starting nsys
        if tp is not None:
            check_plan(plan, tp)
    final = Path(ns.out) if ns.out else Path("traces") / f"{datetime.now():%Y%m%d-%H%M%S}-nsys"
    run_args = ns.run_args if ns.run is not None else None
    done = profile(final, run_args, None if ns.run is not None else ns.command_args, ns.nsys, extra, tp,
                   {"command": " ".join(sys.argv)})
    print_align(done.result)
    if done.split is not None:
        Console().print(ranks_table(done.split[0]))
    if done.exit_code:
        print(f"nsys: the profiled command exited with code {done.exit_code}; its capture was aligned all the same")
    print(f"nsys: {done.folder} ({', '.join(sorted(p.name for p in done.folder.iterdir()))})")
    if getattr(ns, "json", False):
        print(json_line({**align_payload(done.folder, done.result.ranges, done.result.kernels),
                         "profiled_exit_code": done.exit_code}))
    return 0
