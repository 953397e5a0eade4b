"""`kvscope capacity`: capacity planning from a measured batch sweep (`kvscope.analysis.capacity.plan_from_sweep` reads
the sweep, finds its model and does the maths). Output: a table (or `--json`: one JSON object on the last line) and,
with `--out`, the rows as a CSV file. Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from kvscope.analysis.capacity import CapacityPlan, CapacityQuery, plan_from_sweep
from kvscope.commands.json_out import json_line, plain
from kvscope.errors import KvscopeError
from kvscope.io import write_bytes
from kvscope.schema import GIB_BYTES

TABLE_WIDTH = 140  # characters: the four scenario columns side by side


def command(ns: argparse.Namespace) -> int:
    sweep = Path(ns.sweep)
    query = CapacityQuery(gpu_mem_bytes=int(ns.gpu_mem_gb * GIB_BYTES), tpot_slo_ms=ns.tpot_slo_ms,
                          ttft_slo_ms=ns.ttft_slo_ms, prompt=ns.prompt, output=ns.output,
                          block_tokens=ns.block_tokens, reserve_bytes=int(ns.reserve_gb * GIB_BYTES))
    found = plan_from_sweep(sweep, query, getattr(ns, "model", None))
    plan, name, dtype = found.plan, found.model, found.dtype
    table = plan.table()
    if ns.out:
        _write_csv(table, Path(ns.out))
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


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """The rows as CSV, written atomically (`kvscope.io.write_bytes`: a temporary name beside `path`, renamed over
    it)."""
    if path.is_dir():
        raise KvscopeError(f"--out {path} is a folder; give a .csv file")
    if not path.parent.is_dir():
        raise KvscopeError(f"--out {path}: folder {path.parent} does not exist")
    text = table.assign(value=[plain(v) for v in table["value"]]).to_csv(index=False)
    try:
        write_bytes(path, text.encode())
    except OSError as exc:
        raise KvscopeError(f"cannot write --out {path}: {exc.strerror or exc}") from None
