"""The summary table a command prints: the spread of TTFT in brackets and the number of samples it rests on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from tiny_run import tiny_run

from kvscope.commands.summary_table import summary_table


def test_summary_table_shows_spread_and_samples(tmp_path: Path) -> None:
    s, _ = tiny_run(tmp_path, "--reps", "3", "--granularity", "phase")
    console = Console(width=200, record=True)
    console.print(summary_table(pd.DataFrame([s])))
    text = console.export_text()
    assert "TTFT (host clock) p50 [q1, q3] (ms)" in text and "3 samples" in text  # brackets shown, not markup
    assert f"{s['ttft_q1_ms']:.3f}" in text and f"{s['ttft_q3_ms']:.3f}" in text
