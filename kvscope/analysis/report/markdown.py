"""The pieces of a `kvscope report`: Markdown tables, percentages that say "n/a (reason)" instead of inf or nan,
and the report being built in memory (`Report`: Markdown lines, figures, notes), written by
`kvscope.analysis.report.build`.

Figures are matplotlib `Figure`s on an Agg canvas of their own (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPORT_FILE = "report.md"
FIGURE_SUFFIX = ".png"
FIGURE_DPI = 110
FIGURE_SIZE_IN = (6.4, 4.0)


def md_table(df: pd.DataFrame, floatfmt: str = "{:,.3f}", formats: dict[str, str] | None = None) -> str:
    """A Markdown table. Floats in `floatfmt` (or the column's format in `formats`), missing values blank,
    infinities "n/a"; text cells (such as "n/a (reason)") as they are."""

    def cell(v: object, fmt: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return fmt.format(v) if math.isfinite(v) else "n/a"
        if isinstance(v, int | np.integer) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    fmts = [(formats or {}).get(str(c), floatfmt) for c in df.columns]
    body = ["| " + " | ".join(cell(v, f) for v, f in zip(row, fmts, strict=True)) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def percent_change(value: pd.Series, base: pd.Series, base_name: str) -> list[float | str]:
    """(value / base - 1) * 100 per row, or "n/a (reason)" where that has no meaning: a missing value, or a base
    that is zero or negative."""
    out: list[float | str] = []
    for v, b in zip(value, base, strict=True):
        if pd.isna(v) or pd.isna(b):
            out.append("n/a (missing value)")
        elif b == 0:
            out.append(f"n/a ({base_name} is 0)")
        elif b < 0:
            out.append(f"n/a ({base_name} is negative)")
        else:
            out.append(float((v / b - 1) * 100))
    return out


def percent_of_total(values: pd.Series, total_name: str) -> list[float | str]:
    """Each value's share of their sum in percent, or "n/a (reason)" for all when the sum is not positive."""
    total = float(values.sum())
    if not total > 0:
        reason = f"n/a ({total_name} is {'0' if total == 0 else 'negative'})"
        return [reason] * len(values)
    return [float(v / total * 100) for v in values]


@dataclass
class Report:
    """A report built in memory: Markdown lines, figures by file name, and notes on data left out (written last,
    under "Notes")."""

    lines: list[str] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def section(self, title: str, *paragraphs: str) -> None:
        self.text(f"## {title}", *paragraphs)

    def figure(self, name: str, fig: Figure, alt: str) -> None:
        FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend
        fig.tight_layout()
        self.figures[name] = fig
        self.text(f"![{alt}]({name})")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        notes = ["## Notes", "", *(f"- {n}" for n in self.notes), ""] if self.notes else []
        return "\n".join([*self.lines, *notes])

    def write(self, folder: Path) -> Path:
        for name, fig in self.figures.items():
            fig.savefig(folder / name, dpi=FIGURE_DPI)
        path = folder / REPORT_FILE
        path.write_text(self.markdown())
        return path
