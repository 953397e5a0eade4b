"""A tiny `kvscope run` on the CPU through the CLI, its summary row and its timings read back (shared by the tests of
the run's summary, the summary table and the run report)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvscope.cli import main


def tiny_run(tmp_path: Path, *argv: str) -> tuple[pd.Series, pd.DataFrame]:
    """`kvscope run` of the tiny preset (seq 8, 4 generated tokens, 1 warmup, no NVTX) into `tmp_path / "r"`, with
    `argv` added; returns the summary's one row and the timings table."""
    out = tmp_path / "r"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "4", "--warmup", "1",
                 "--no-nvtx", "--out", str(out), *argv]) == 0
    return pd.read_parquet(out / "summary.parquet").iloc[0], pd.read_parquet(out / "timings.parquet")
