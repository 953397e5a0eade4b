"""`kvscope report`: a Markdown report with PNG plots of a run folder or a sweep file (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvscope.analysis.report.build import make_report
from kvscope.commands.json_out import folder_files, json_line


def command(ns: argparse.Namespace) -> int:
    compare = getattr(ns, "compare", None)
    report = make_report(Path(ns.source), Path(ns.out) if ns.out else None, Path(compare) if compare else None)
    files = folder_files(report.parent)
    print(f"report: {report} ({', '.join(files)})")
    if getattr(ns, "json", False):
        print(json_line({"report": report, "folder": report.parent, "files": files}))
    return 0
