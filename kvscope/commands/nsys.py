"""`kvscope nsys`: parse, then profile a command under Nsight Systems, export and align it into one output folder
(`kvscope.measure.nsys`, which says what the capture holds and how extra `--nsys-flag`s combine with kvscope's), and
print the alignment's summary, the per-rank table with `run --tp`, a served load's iterations with `-- serve ...`,
the folder and its files."""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from kvscope.analysis.align.ranks import ranks_table
from kvscope.analysis.serving.iterations_nsys import ITERATION_GPU_FILE, ITERATION_KERNELS_FILE, iteration_summary
from kvscope.commands.align import print_align
from kvscope.commands.json_out import align_payload, json_line
from kvscope.engine.plan import prepare
from kvscope.errors import KvscopeError
from kvscope.measure.nsys import RUN_PROGRAM, SERVE_PROGRAM, extra_flags, profile
from kvscope.measure.options import run_spec
from kvscope.measure.serve.run import plan_for
from kvscope.measure.serve.spec import load_source, serve_points
from kvscope.measure.tp_launch import check_plan
from kvscope.schema import US_PER_MS


def check_serve(serve: argparse.Namespace) -> None:
    """A served load's arguments checked before nsys starts, as `kvscope serve` checks them before its model loads:
    the spec (one load), the load (request file, lengths) and the run plan (model, device, dtype)."""
    points = serve_points(serve)
    if len(points) != 1:
        raise KvscopeError(f"nsys: profiles one served load, not a sweep of {len(points)}")
    _, max_seq = load_source(points[0])
    plan_for(points[0], max_seq)


def command(ns: argparse.Namespace) -> int:
    """`ns.run` (the `kvscope run` arguments parsed) and `ns.run_args`, or `ns.serve` (the `kvscope serve` arguments
    parsed) and `ns.run_args`, or `ns.command_args` (any other command), as `kvscope.cli` leaves them;
    `ns.nsys_flag`: the extra nsys flags."""
    extra = extra_flags(getattr(ns, "nsys_flag", []))
    serve = getattr(ns, "serve", None)
    tp = getattr(ns.run, "tp", None) if ns.run is not None else None
    if ns.run is not None:
        plan = prepare(run_spec(ns.run))  # validate before starting nsys
        if tp is not None:
            check_plan(plan, tp)
    elif serve is not None:
        check_serve(serve)
    final = Path(ns.out) if ns.out else Path("traces") / f"{datetime.now():%Y%m%d-%H%M%S}-nsys"
    own = ns.run is not None or serve is not None
    done = profile(final, ns.run_args if own else None, None if own else ns.command_args, ns.nsys, extra, tp,
                   {"command": " ".join(sys.argv)}, SERVE_PROGRAM if serve is not None else RUN_PROGRAM)
    print_align(done.result)
    if done.split is not None:
        Console().print(ranks_table(done.split[0]))
    summary = iteration_summary(done.iterations) if done.iterations is not None else None
    if summary is not None:
        print(_iterations_line(summary))
    if done.exit_code:
        print(f"nsys: the profiled command exited with code {done.exit_code}; its capture was aligned all the same")
    print(f"nsys: {done.folder} ({', '.join(sorted(p.name for p in done.folder.iterdir()))})")
    if getattr(ns, "json", False):
        print(json_line({**align_payload(done.folder, done.result.ranges, done.result.kernels),
                         "profiled_exit_code": done.exit_code, **({"serve_iterations": summary} if summary else {})}))
    return 0


def _iterations_line(s: dict[str, Any]) -> str:
    """The captured iterations in one line (iteration_summary's numbers)."""
    if not s["iterations"]:
        return "nsys: no `iter N` range in the capture: no per-iteration GPU attribution"
    classes = ", ".join(f"{c} {ms:,.1f} ms" for c, ms in s["ms_by_class"].items())
    diff = s["span_minus_event_p50_ms"]
    event = f"; GPU span - CUDA-event time: median {diff * US_PER_MS:+,.1f} us" if math.isfinite(diff) else ""
    return (f"nsys: {s['iterations']:,} iterations captured: GPU busy {s['busy_ms']:,.1f} ms of {s['span_ms']:,.1f} ms "
            f"spanned ({s['idle_pct']:.1f}% idle inside iterations), {s['gap_ms']:,.1f} ms idle between them{event}; "
            f"kernel time by class: {classes or 'none'} ({ITERATION_KERNELS_FILE}, {ITERATION_GPU_FILE})")
