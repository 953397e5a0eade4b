"""`kvscope report`: a Markdown report with PNG plots of a run folder or a sweep file (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvscope.analysis.report import make_report


def command(ns: argparse.Namespace) -> int:
    report = make_report(Path(ns.source), Path(ns.out) if ns.out else None)
    files = sorted(p.name for p in report.parent.iterdir())
    print(f"report: {report} ({', '.join(files)})")
    return 0
