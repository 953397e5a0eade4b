"""`kvscope nsys`: parse, then profile a command under Nsight Systems, export and align it into one output folder
(`kvscope.measure.nsys`, which says what the capture holds and how extra `--nsys-flag`s combine with kvscope's), and
print the alignment's summary, the per-rank table with `run --tp`, the folder and its files."""

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
