"""`kvscope capacity`: capacity planning from a measured batch sweep (`kvscope.analysis.capacity.plan_from_sweep` reads
the sweep, finds its model and does the maths). Output: a table (or `--json`: one JSON object on the last line) and,
with `--out`, the rows as a CSV file (`kvscope.io.OutputFile`: checked before the sweep is read; never the sweep or
the model it reads, never a file that is not an earlier capacity table; written atomically). Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvscope.analysis.capacity import ROW_COLUMNS, CapacityPlan, CapacityQuery, plan_from_sweep
from kvscope.commands.json_out import json_line, plain
from kvscope.io import OutputFile
from kvscope.schema import GIB_BYTES

TABLE_WIDTH = 140  # characters: the four scenario columns side by side


def command(ns: argparse.Namespace) -> int:
    sweep = Path(ns.sweep)
    model = getattr(ns, "model", None)
    out = output_file(Path(ns.out), sweep, model) if ns.out else None  # checked before any work
    query = CapacityQuery(gpu_mem_bytes=int(ns.gpu_mem_gb * GIB_BYTES), tpot_slo_ms=ns.tpot_slo_ms,
                          ttft_slo_ms=ns.ttft_slo_ms, prompt=ns.prompt, output=ns.output,
                          block_tokens=ns.block_tokens, reserve_bytes=int(ns.reserve_gb * GIB_BYTES))
    found = plan_from_sweep(sweep, query, model)
    plan, name, dtype = found.plan, found.model, found.dtype
    table = plan.table()
    if out is not None:
        out.write(table.assign(value=[plain(v) for v in table["value"]]).to_csv(index=False).encode())
    title = (f"capacity: {name} ({dtype}), prompt {ns.prompt:,} + output {ns.output:,} tokens, "
             f"{ns.gpu_mem_gb:g} GiB, TPOT <= {ns.tpot_slo_ms:g} ms, TTFT <= {ns.ttft_slo_ms:g} ms")
    _print(plan, title)
    if ns.json:
        print(json_line({"sweep": sweep, "model": name, "dtype": dtype, "rows": table.to_dict("records"),
                         "warnings": plan.warnings, "assumptions": plan.assumptions, "out": ns.out}))
    return 0


def _shown(v: object) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:,.3f}" if isinstance(v, float) else str(v)


def _print(plan: CapacityPlan, title: str) -> None:
    """One row per quantity, one column per scenario; each value with its source; the notes below."""
    table = Table(title=title)
    scenarios = list(dict.fromkeys(r["scenario"] for r in plan.rows))
    quantities = list(dict.fromkeys(r["quantity"] for r in plan.rows))
    table.add_column("quantity")
    table.add_column("unit")
    for sc in scenarios:
        table.add_column(sc, justify="right")
    cells = {(r["scenario"], r["quantity"]): f"{_shown(r['value'])} ({r['source']})" for r in plan.rows}
    units = {r["quantity"]: r["unit"] for r in plan.rows}
    for qty in quantities:
        table.add_row(qty, units[qty], *(cells.get((sc, qty), "-") for sc in scenarios))
    console = Console(width=max(Console().width, TABLE_WIDTH))
    console.print(table)
    for r in plan.rows:
        if r["note"] and r["quantity"] == "max_batch_slo":
            console.print(f"{r['scenario']}: max_batch_slo {r['value']}: {r['note']}", markup=False)
    for w in plan.warnings:
        console.print(f"warning: {w}", markup=False)
    for a in plan.assumptions:
        console.print(f"assumed: {a}", markup=False)


def is_capacity_table(path: Path) -> bool:
    """Whether `path` is a table `kvscope capacity --out` wrote: its first line is the table's header."""
    with path.open("rb") as f:
        return f.readline(4096).rstrip(b"\r\n") == ",".join(ROW_COLUMNS).encode()


def output_file(path: Path, sweep: Path, model: str | None) -> OutputFile:
    """`--out`: new, or an earlier capacity table; never the sweep file or the model's file."""
    inputs = [("--sweep file", sweep)] + ([("--model", Path(model))] if model else [])
    return OutputFile(path, "--out", is_capacity_table, "a kvscope capacity table", inputs)
