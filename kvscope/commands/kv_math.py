"""`kvscope kv-math`: KV-cache memory maths of a model (bytes per token and per request, capacity under a memory
budget, Little's-law concurrency, paged-cache waste), printed as a table or one JSON object. Torch-free, except that
`--device cuda` asks torch for the GPU's memory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from kvscope.measure.kv_math import compute
from kvscope.schema import GIB_BYTES


def command(ns: argparse.Namespace) -> int:
    result = compute(ns)
    if ns.json:
        print(json.dumps(result))
    else:
        Console().print(_table(result))
    return 0


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"KV-cache maths: {result['model']}, batch {result['batch']} x seq {result['seq']}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, int) and "bytes" in key:
            shown = f"{value:,} B ({value / GIB_BYTES:.3f} GiB)"
        elif isinstance(value, float):
            shown = f"{value:,.1f}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, shown)
    return table
