"""`kvscope sweep`: parse the sweep's flags, run it (`kvscope.measure.sweep`, or under Nsight Systems
`kvscope.measure.sweep_nsys` with `--nsys`), print its classic columns."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kvscope.argtypes import INT64_MAX, shown
from kvscope.commands.json_out import json_line, key_numbers
from kvscope.errors import KvscopeError
from kvscope.measure.options import run_options
from kvscope.measure.sweep import NsysCapture, SweepSpec, run_sweep
from kvscope.measure.sweep_nsys import run_under_nsys
from kvscope.schema import CLASSIC_COLUMNS


def command(ns: argparse.Namespace) -> int:
    """`kvscope sweep`: the sweep with a progress bar on stderr (when it is a terminal), then its classic columns."""
    sw = SweepSpec(run_options(ns), parse_int_list(ns.seq, "--seq"), parse_int_list(ns.batch_sizes, "--batch-sizes"),
                   Path(ns.out), ns.collapse_factor, ns.resume, nsys_capture(ns))
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sweep", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"sweep ({what})")

        say = lambda m: err.print(f"kvscope: {m}")  # noqa: E731
        rows = run_under_nsys(sw, say) if sw.nsys is not None else run_sweep(sw, progress=progress, log=say)
    cols = [c for c in CLASSIC_COLUMNS if c in rows.columns]
    print(rows[cols].to_string(index=False))
    print(f"sweep: {sw.out} ({len(rows)} configuration(s))")
    if getattr(ns, "json", False):
        print(json_line({"sweep_file": sw.out, "configurations": len(rows),
                         "rows": [key_numbers(row) for _, row in rows.iterrows()]}))
    return 0


def nsys_capture(ns: argparse.Namespace) -> NsysCapture | None:
    """`--nsys [PATH]` (absent: None; without PATH: True), `--nsys-flag` and `--keep-reports on|off`, which need
    `--nsys`."""
    nsys = getattr(ns, "nsys", None)
    flags = tuple(getattr(ns, "nsys_flag", None) or ())
    keep = getattr(ns, "keep_reports", None)
    if nsys is None:
        if flags or keep is not None:
            raise KvscopeError(f"{'--nsys-flag' if flags else '--keep-reports'} needs --nsys")
        return None
    return NsysCapture(nsys if isinstance(nsys, str) else None, flags, keep != "off")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive sizes that fit in 64 bits (a sweep file stores them as int64)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise KvscopeError(f"{flag}: empty list")
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:  # also digits beyond Python's int-parsing limit
            raise KvscopeError(f"{flag}: {shown(x)} is not an integer") from None
        if v <= 0:
            raise KvscopeError(f"{flag}: sizes must be positive, got {v}")
        if v > INT64_MAX:
            raise KvscopeError(f"{flag}: sizes must fit in 64 bits (at most {INT64_MAX}), got {shown(x)}")
        out.append(v)
    return tuple(out)
