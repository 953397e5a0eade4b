"""The per-rank split of an alignment (kvscope.commands.tp_align): ranks by GPU then pid, compute / communication /
idle per step, the straggler named; on the real two-process export of tests/data/foreign (multiproc: two spawned
processes on one H200, ranges `rank0 iter 0..1` and `rank1 iter 0..2`) and on synthetic tables with known answers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvscope.cli import main
from kvscope.commands.tp_align import analyse_ranks, process_ranks, rank_steps, rank_table

MULTIPROC = Path(__file__).parent / "data" / "foreign" / "multiproc.sqlite"


def test_multiproc_export_split_per_process() -> None:
    result, split = analyse_ranks(MULTIPROC, phase_map=r"step=iter (\d+)")
    assert split is not None
    ranks, steps = split
    # both processes ran on GPU 0: ranks follow the pids
    assert ranks[["pid", "device", "rank"]].values.tolist() == [[1093, 0, 0], [1094, 0, 1]]
    assert ranks["steps"].tolist() == [2, 3]
    assert steps.groupby("rank")["name"].apply(list).to_dict() == {
        0: ["rank0 iter 0", "rank0 iter 1"], 1: ["rank1 iter 0", "rank1 iter 1", "rank1 iter 2"]}
    assert (steps["comm_ms"] == 0).all()  # matmuls only: no communication kernel
    # compute is the steps' busy time; span = compute + communication + idle
    expect = result.steps.set_index("name")["gpu_busy_ms"].astype(float)
    assert steps.set_index("name")["compute_ms"].to_dict() == pytest.approx(expect.to_dict(), abs=0)
    total = steps["compute_ms"] + steps["comm_ms"] + steps["idle_ms"]
    assert (total - steps["gpu_span_ms"]).abs().max() < 1e-9
    # steps 0 and 1 ran in both processes: rank 0's compute is the longer in each (20.608 vs 20.544 us, 20.128 vs
    # 20.064 us); step 2 ran in rank 1 alone and has no straggler
    assert steps.loc[steps["straggler"], ["rank", "step"]].values.tolist() == [[0, 0], [0, 1]]
    assert ranks.loc[ranks["straggler"], "rank"].tolist() == [0]
    assert ranks["straggler_steps"].tolist() == [2, 0]


def _kernels(rows: list[tuple[int, int, str, int, int]]) -> pd.DataFrame:
    """(pid, device, class, step, dur_ns) -> a kernels table as align writes it (decode, rep 0)."""
    return pd.DataFrame({"pid": [r[0] for r in rows], "device": [r[1] for r in rows],
                         "kernel_class": [r[2] for r in rows], "rep": pd.array([0] * len(rows), dtype="Int64"),
                         "phase": ["decode"] * len(rows), "step": pd.array([r[3] for r in rows], dtype="Int64"),
                         "dur_ns": [r[4] for r in rows]})


def test_ranks_by_gpu_and_communication_by_class() -> None:
    # three ranks; the process ids do not follow the GPUs
    kernels = _kernels([
        (300, 0, "gemm", 1, 6_000), (300, 0, "communication", 1, 4_000),
        (100, 1, "gemm", 1, 9_000), (100, 1, "communication", 1, 1_000),
        (200, 2, "gemm", 1, 5_000), (200, 2, "communication", 1, 3_000), (200, 2, "communication", 1, 2_000),
    ])
    ranks = process_ranks(kernels)
    assert ranks[["pid", "device", "rank"]].values.tolist() == [[300, 0, 0], [100, 1, 1], [200, 2, 2]]
    steps = pd.DataFrame({"pid": [300, 100, 200], "rep": pd.array([0, 0, 0], dtype="Int64"),
                          "phase": ["decode"] * 3, "step": pd.array([1, 1, 1], dtype="Int64"),
                          "name": ["decode step 1"] * 3, "gpu_span_ms": [0.012, 0.012, 0.012],
                          "gpu_busy_ms": [0.010, 0.010, 0.010], "gpu_idle_ms": [0.002, 0.002, 0.002]})
    per = rank_steps(steps, kernels, ranks)
    assert per["rank"].tolist() == [0, 1, 2]
    assert per["comm_ms"].tolist() == pytest.approx([0.004, 0.001, 0.005], abs=1e-15)
    assert per["compute_ms"].tolist() == pytest.approx([0.006, 0.009, 0.005], abs=1e-15)
    assert per["straggler"].tolist() == [False, True, False]  # rank 1 computed longest; the others waited for it
    table = rank_table(per, ranks)
    assert table.loc[table["straggler"], "rank"].tolist() == [1]
    assert table["comm_share"].tolist() == pytest.approx([4 / 12, 1 / 12, 5 / 12])
    assert table["idle_share"].tolist() == pytest.approx([2 / 12] * 3)


def test_nsys_tp_refusals_before_nsys_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["nsys", "--out", str(tmp_path / "n"), "--tp", "4", "--", "--model", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kvscope: error: --tp 4 does not divide tiny's 2 KV heads (n_kv_heads); tensor parallelism shards them "
        "evenly (choose a tp that divides 2)")
    assert main(["nsys", "--out", str(tmp_path / "n"), "--tp", "2", "--", "python3", "serve.py"]) == 2
    assert capsys.readouterr().err.strip() == ("kvscope: error: nsys: --tp profiles `kvscope run --tp N`; another "
                                               "command starts its own processes")
    assert main(["nsys", "--out", str(tmp_path / "n"), "--tp", "2", "--", "--tp", "2"]) == 2
    assert capsys.readouterr().err.strip() == "kvscope: error: nsys: give --tp once, before --"
    assert not (tmp_path / "n").exists()
