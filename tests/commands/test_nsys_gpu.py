"""`kvscope nsys` end to end (marked `gpu`; skipped without CUDA or without nsys)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvscope.analysis.nsys.export import find_nsys
from kvscope.cli import main

pytestmark = pytest.mark.gpu


def test_kvscope_nsys_tiny(tmp_path: Path) -> None:
    if find_nsys() is None:
        pytest.skip("nsys not found")
    out = tmp_path / "n"
    rc = main(["nsys", "--out", str(out), "--", "--model", "tiny", "--seq", "32", "--gen-tokens", "4", "--reps", "2",
               "--warmup", "1", "--granularity", "layer"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.nsys-rep", "report.sqlite", "run", "ranges.parquet", "kernels.parquet", "align.parquet",
            "steps.parquet", "kernel_classes.parquet"} <= names
    a = pd.read_parquet(out / "align.parquet")
    t = pd.read_parquet(out / "run" / "timings.parquet")
    in_graph = t["clock"] == "cuda-graph"  # layer rows of graph-replayed decode steps: event nodes, no NVTX range
    assert in_graph.sum() == 2 * 3 * (2 + 3)  # 2 reps x 3 decode steps x (tiny's 2 layers + embed, lm_head, sample)
    assert a["event_ms"].notna().sum() == (~in_graph).sum()
    steps = pd.read_parquet(out / "steps.parquet")
    assert len(steps) == 2 * 4
