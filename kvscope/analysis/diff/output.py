"""`kvscope diff --out DIR`: diff.parquet (the table, verdicts.DIFF_COLUMNS) and diff.md (a Markdown section: what
was compared, the headline rows, the waterfall of where the step's time moved, the largest changes), written into a
folder whole or not at all (`kvscope.io.AtomicFolder`: new, empty, or an earlier diff output; never A or B)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from kvscope.analysis.diff.compare import DiffResult, describe, headline
from kvscope.analysis.diff.waterfall import unaccounted_share
from kvscope.analysis.report.markdown import md_table
from kvscope.io import AtomicFolder, write_bytes, write_parquet

DIFF_FILE = "diff.parquet"
MARKDOWN_FILE = "diff.md"
OUTPUT_FILES = (DIFF_FILE, MARKDOWN_FILE)
TOP_ROWS = 30  # rows of the "largest changes" table
BAR_CHARS = 24  # the widest bar of the waterfall


def is_diff_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but files `kvscope diff` writes (so a new diff may replace it)."""
    return all(p.name in OUTPUT_FILES and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def output_folder(out: Path, a: Path, b: Path) -> AtomicFolder:
    """The `--out` folder, checked now (before reading A and B)."""
    return AtomicFolder(out, "--out", replaceable=is_diff_output, inputs=[("A", a), ("B", b)])


def write(result: DiffResult, folder: Path, meta: dict[str, Any]) -> None:
    """diff.parquet and diff.md into `folder` (the AtomicFolder's temporary folder)."""
    meta = {**meta, "a": str(result.a.path), "b": str(result.b.path), "kind": result.kind,
            "threshold_pct": result.threshold_pct, "notes": result.notes}
    write_parquet(result.table, folder / DIFF_FILE, meta)
    write_bytes(folder / MARKDOWN_FILE, markdown(result).encode())


def cell_change(line: pd.Series) -> str:
    """`+1.234 ms (+5.6%)`, or what is missing."""
    if not math.isfinite(line["diff"]):
        return "n/a"
    unit = f" {line['unit']}" if line["unit"] else ""
    pct = f" ({line['diff_pct']:+.1f}%)" if math.isfinite(line["diff_pct"]) else ""
    return f"{line['diff']:+.4g}{unit}{pct}"


def cell_interval(line: pd.Series) -> str:
    lo, hi = line["ci_low_pct"], line["ci_high_pct"]
    return f"{lo:+.1f}% to {hi:+.1f}%" if math.isfinite(lo) and math.isfinite(hi) else "none"


def shown_table(df: pd.DataFrame) -> pd.DataFrame:
    """The diff's rows as the terminal and the Markdown show them."""
    return pd.DataFrame({
        "row": df["row"].map(short_row), "A": df["a"], "B": df["b"],
        "change": [cell_change(r) for _, r in df.iterrows()],
        "95% interval": [cell_interval(r) for _, r in df.iterrows()],
        "samples": [f"{r.a_samples}/{r.b_samples}" for r in df.itertuples()],
        "verdict": df["verdict"], "reason": df["reason"]})


def short_row(name: str, width: int = 70) -> str:
    """A row's name, cut to `width` characters (kernel names run to hundreds)."""
    return name if len(name) <= width else name[: width - 3] + "..."


def markdown(result: DiffResult) -> str:
    """The Markdown section (module docstring)."""
    lines = ["## kvscope diff", "", f"- {describe(result.a)}", f"- {describe(result.b)}", "",
             f"Verdicts: `same` when the 95% interval of B / A lies inside ±{result.threshold_pct:g}%, `slower` or "
             "`faster` when it lies beyond, `cannot tell` otherwise (the reason says why). Intervals over "
             "repetitions (a sweep: over its points), Hodges-Lehmann with the exact Mann-Whitney or signed-rank "
             "bounds (docs/diff.md).", ""]
    lines += [f"- {n}" for n in result.notes] + ([""] if result.notes else [])
    head = headline(result)
    if len(head):
        lines += ["### Headline", "", md_table(shown_table(head), floatfmt="{:,.4g}"), ""]
    lines += ["### Where the step's time moved", ""]
    if len(result.waterfall):
        lines += [md_table(_waterfall_shown(result.waterfall), floatfmt="{:,.4f}"), "",
                  accounted_line(result.waterfall), ""]
    else:
        lines += ["No waterfall: neither side's step has parts on both sides (a sweep's points each have their own "
                  "step).", ""]
    rest = result.table[~result.table.index.isin(head.index)]
    lines += [f"### Largest changes ({min(TOP_ROWS, len(rest))} of {len(rest)} rows; all in {DIFF_FILE})", "",
              md_table(shown_table(rest.head(TOP_ROWS)), floatfmt="{:,.4g}"), ""]
    return "\n".join(lines)


def accounted_line(w: pd.DataFrame) -> str:
    """One line under the waterfall: how much of the step's change its parts account for (what the last line
    leaves, waterfall.unaccounted_share), so a reader sees whether the parts explain the change."""
    left, change = float(w["delta_ms"].iloc[-2]), float(w["delta_ms"].iloc[-1])
    share = unaccounted_share(w)
    if not math.isfinite(share):
        return f"B's step equals A's: no change for the parts to account for (leftover {left:+.4f} ms)."
    return (f"The parts account for the step's change within {share * 100:.1f}% (leftover {left:+.4f} ms of "
            f"{change:+.4f} ms).")


def _waterfall_shown(w: pd.DataFrame) -> pd.DataFrame:
    deltas = w["delta_ms"].iloc[1:-1].abs()
    scale = float(deltas.max()) if len(deltas) and deltas.max() > 0 else 1.0
    bars = []
    for i, d in enumerate(w["delta_ms"]):
        if i in (0, len(w) - 1) or not math.isfinite(d) or d == 0:
            bars.append("")
        else:
            n = max(1, round(abs(d) / scale * BAR_CHARS))
            bars.append(("+" if d > 0 else "-") + ("#" * n))
    return pd.DataFrame({"part": w["part"].map(short_row), "A (ms)": w["a_ms"], "B (ms)": w["b_ms"],
                         "change (ms)": w["delta_ms"], "running total (ms)": w["running_ms"], "": bars})
