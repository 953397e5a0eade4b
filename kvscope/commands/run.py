"""`kvscope run`: parse the run's flags, run it (`kvscope.measure.run`, or `kvscope.measure.tp_run` with `--tp`),
print its summary table, its folder and files."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvscope.commands.json_out import folder_files, json_line, key_numbers
from kvscope.commands.summary_table import summary_table
from kvscope.measure.options import run_spec
from kvscope.measure.output import RunResult
from kvscope.measure.run import execute
from kvscope.measure.tp_run import execute_tp


def command(ns: argparse.Namespace) -> int:
    """`kvscope run`: the run with a progress bar on stderr (when it is a terminal), then its summary table."""
    if getattr(ns, "tp", None) is not None:
        return command_tp(ns)  # tensor parallelism: ranks spawned or from torchrun
    err = Console(stderr=True)
    # no bar when stderr is not a terminal: rich would leave a blank line there, before any error line
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind] = bar.add_task(kind, total=total)
            bar.update(tasks[kind], completed=done)

        result = execute(run_spec(ns), progress=progress, log=lambda msg: err.print(f"kvscope: {msg}"))
    print_result(result, getattr(ns, "json", False))
    return 0


def print_result(result: RunResult, as_json: bool) -> None:
    """A finished run on stdout: its summary table, its folder and files, and with `--json` one JSON line."""
    Console().print(summary_table(result.summary))
    files = folder_files(result.out_dir)
    print(f"run folder: {result.out_dir} ({', '.join(files)})")
    if as_json:
        print(json_line({"run_folder": result.out_dir, "files": files, **key_numbers(result.summary.iloc[0])}))


def command_tp(ns: argparse.Namespace) -> int:
    """`kvscope run --tp N`: the run over N ranks, then (rank 0 only) its merged summary table and folder."""
    result = execute_tp(run_spec(ns), ns.tp, log=lambda msg: print(f"kvscope: {msg}", file=sys.stderr))
    if result is None:  # a torchrun rank other than 0
        return 0
    print_result(result, getattr(ns, "json", False))
    return 0
