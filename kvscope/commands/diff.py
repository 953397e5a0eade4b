"""`kvscope diff A B`: two run folders, captures or sweep files compared row by row (`kvscope.analysis.diff`): the
headline rows and the largest changes on the terminal, with `--out` diff.parquet and diff.md, with `--json` one
object on the last line, with `--fail-if` a gate's exit code (0 passed, 1 slower beyond the threshold, 2 cannot
tell: its reason on stderr). Torch-free."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvscope.analysis.diff.compare import DiffResult, describe, diff, headline
from kvscope.analysis.diff.gate import CANNOT_TELL, FAIL, parse_gate
from kvscope.analysis.diff.output import OUTPUT_FILES, accounted_line, output_folder, shown_table, write
from kvscope.analysis.diff.waterfall import unaccounted_share
from kvscope.commands.json_out import json_line
from kvscope.errors import KvscopeError

TABLE_WIDTH = 160


def command(ns: argparse.Namespace) -> int:
    a, b = Path(ns.a), Path(ns.b)
    if ns.top < 0:
        raise KvscopeError(f"--top must be >= 0, got {ns.top}")
    gates = [parse_gate(text) for text in ns.fail_if or []]  # checked before any work
    folder = output_folder(Path(ns.out), a, b) if ns.out else None
    result = diff(a, b, ns.threshold, ns.allow_different).with_gates(gates)  # a row it lacks: one line, now
    if folder is not None:
        with folder as tmp:
            write(result, tmp, {"command": " ".join(sys.argv)})
    _print(result, ns.top)
    if folder is not None:
        print(f"diff: {ns.out} ({', '.join(OUTPUT_FILES)})")
    for o in result.gates:
        print(f"diff: {o.message}", file=sys.stderr if o.code in (FAIL, CANNOT_TELL) else sys.stdout)
    if ns.json:
        print(json_line(_payload(result, ns.out)))
    return result.exit_code


def _print(result: DiffResult, top: int) -> None:
    console = Console(width=max(Console().width, TABLE_WIDTH))
    for side in (result.a, result.b):
        console.print(describe(side), markup=False, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    head = headline(result)
    if len(head):
        console.print(_table(f"headline (same within ±{result.threshold_pct:g}%)", head))
    if len(result.waterfall):
        console.print(f"waterfall ({result.waterfall['part'].iloc[0].removeprefix('A: ')}): "
                      f"{accounted_line(result.waterfall)}", markup=False, highlight=False)
    rest = result.table[~result.table.index.isin(head.index)]
    if len(rest) and top > 0:
        shown = rest.head(top)
        console.print(_table(f"largest changes ({len(shown)} of {len(rest)} rows)", shown))


def _table(title: str, rows: pd.DataFrame) -> Table:
    shown = shown_table(rows)
    t = Table(title=title)
    for col in shown.columns:
        t.add_column(col, justify="right" if col in ("A", "B", "change", "95% interval", "samples") else "left",
                     overflow="fold")
    for r in shown.itertuples(index=False):
        t.add_row(*(escape(_cell(v)) for v in r))
    return t


def _cell(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:,.4g}"
    return str(v)


def _payload(result: DiffResult, out: str | None) -> dict[str, object]:
    """`--json`: what was compared, the notes, every row, each gate's answer, the exit code."""
    return {"a": result.a.path, "b": result.b.path, "kind": result.kind, "threshold_pct": result.threshold_pct,
            "notes": result.notes, "out": out, "headline_row": result.headline_row(),
            "rows": result.table.to_dict("records"), "waterfall": result.waterfall.to_dict("records"),
            "waterfall_unaccounted_share": unaccounted_share(result.waterfall),  # NaN (null) without a waterfall
            "gates": [{"gate": o.gate.text, "row": o.row, "exit": o.code, "message": o.message} for o in result.gates],
            "exit": result.exit_code}
