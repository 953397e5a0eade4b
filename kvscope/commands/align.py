"""`kvscope align`: project an nsys export's NVTX ranges onto its GPU operations, align them with a run's timings,
and write the tables into a folder written whole or not at all (torch-free)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from kvscope.analysis.report_align import AlignResult, analyse, output_folder, summary_tables, write
from kvscope.analysis.schema import ALIGN_OUTPUT_FILES
from kvscope.commands.json_out import align_payload, json_line


def command(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    folder = output_folder(out)  # checked before the analysis; written whole or not at all
    result = analyse(Path(ns.export), Path(ns.timings) if ns.timings else None, nsys=ns.nsys)
    with folder as tmp:
        write(result, tmp, {"command": " ".join(sys.argv), "timings": ns.timings})
    print_align(result)
    print(f"align: {out} ({', '.join(ALIGN_OUTPUT_FILES)})")
    if getattr(ns, "json", False):
        print(json_line(align_payload(out, result.ranges, result.kernels)))
    return 0


def print_align(result: AlignResult) -> None:
    """The alignment's summary tables on stdout."""
    console = Console()
    for table in summary_tables(result):
        console.print(table)
