"""The per-rank split of an alignment (kvscope.analysis.align.ranks): ranks by GPU then pid, compute / communication /
idle per step, the straggler named; on the real two-process export of tests/data/foreign (multiproc: two spawned
processes on one H200, ranges `rank0 iter 0..1` and `rank1 iter 0..2`) and on synthetic tables with known answers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from paths import DATA
from synthetic_export import Synth, gtid

from kvscope.analysis.align.ranks import (
    RANK_STEPS_FILE,
    RANKS_FILE,
    analyse_ranks,
    process_ranks,
    rank_steps,
    rank_table,
)
from kvscope.cli import main

MULTIPROC = DATA / "foreign" / "multiproc.sqlite"


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


def _two_rank_run(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic capture of `kvscope run --tp 2` (pids 22 on GPU 0 and 11 on GPU 1, so the pids do not follow the
    ranks) and its run folder: the same region names in both processes, one decode step each with a GEMM and an NCCL
    all-reduce; rank 1 computes longer (600 ns of GEMM against 300 ns), rank 0 waits in the all-reduce."""
    x = Synth()
    rows = []
    for rank, pid, gemm_ns in ((0, 22, 300), (1, 11, 600)):
        x.domain(pid, 1, 1, "kvscope")
        x.range(pid, 1, 0, 20_000, "run bs=1 seq=4 gen=2", 1)
        x.range(pid, 1, 10, 19_000, "rep 0", 1)
        x.range(pid, 1, 100, 2_000, "prefill", 1)
        x.launch(pid, 1, 110, 120, 1, [(200, 1_200, 7)])
        x.range(pid, 1, 3_000, 9_000, "decode", 1)
        x.range(pid, 1, 3_100, 8_000, "decode step 1", 1)
        x.launch(pid, 1, 3_110, 3_120, 2, [(4_000, 4_000 + gemm_ns, 7)])
        x.launch(pid, 1, 3_130, 3_140, 3, [(4_600, 5_000, 8)], kernel_name="ncclDevKernel_AllReduce_Sum_f32_RING_LL")
        for level, name, rep, step, dur_ms in (("run", "run bs=1 seq=4 gen=2", None, None, 0.02),
                                               ("rep", "rep 0", 0, None, 0.019), ("phase", "prefill", 0, 0, 0.001),
                                               ("phase", "decode", 0, None, 0.001), ("step", "decode step 1", 0, 1,
                                                                                     0.001)):
            rows.append({"run_id": "r", "rank": rank, "rep": rep, "level": level, "phase": None, "step": step,
                         "layer": None, "op": None, "name": name, "start_ms": 0.0, "dur_ms": dur_ms,
                         "host_enqueue_ms": 0.0, "clock": "cuda", "batch": 1, "seq_len": 4, "gen_tokens": 2,
                         "context_len": None, "tokens": None})
    on_gpu1 = gtid(11, 0) & ~0xFFFFFF  # the kernels' globalPid of process 11
    x.kernels = [(*k[:2], 1 if k[5] == on_gpu1 else 0, *k[3:]) for k in x.kernels]  # pid 11 ran on GPU 1
    export = x.write(tmp_path / "tp2.sqlite")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    timings = pd.DataFrame(rows)
    for col in ("rep", "step", "layer", "context_len", "tokens"):
        timings[col] = timings[col].astype("Int64")
    timings.to_parquet(run_dir / "timings.parquet")
    return export, run_dir


def test_tp_run_capture_split_per_rank_with_its_timings(tmp_path: Path) -> None:
    export, run_dir = _two_rank_run(tmp_path)
    result, split = analyse_ranks(export, run_dir)
    assert split is not None
    ranks, steps = split
    assert ranks[["pid", "device", "rank"]].values.tolist() == [[22, 0, 0], [11, 1, 1]]
    decode = steps[steps["phase"] == "decode"].set_index("rank")
    assert decode["comm_ms"].tolist() == pytest.approx([400e-6, 400e-6])  # the NCCL kernel, 400 ns in each rank
    assert decode["compute_ms"].tolist() == pytest.approx([300e-6, 600e-6])
    assert decode["gpu_span_ms"].tolist() == pytest.approx([1000e-6, 1000e-6])  # 4,000 to 5,000 ns
    assert decode["idle_ms"].tolist() == pytest.approx([300e-6, 0.0])
    assert decode["straggler"].tolist() == [False, True]
    assert ranks.loc[ranks["straggler"], "rank"].tolist() == [1]
    # align.parquet: each rank's regions matched with its own timings rows
    regions = result.regions
    assert sorted(regions["rank"].unique()) == [0, 1]
    assert len(regions) == 10 and regions["event_ms"].notna().all()
    step1 = regions[regions["name"] == "decode step 1"].set_index("rank")
    assert step1["gpu_span_ms"].tolist() == pytest.approx([1000e-6, 1000e-6])


def test_align_command_splits_a_tp_run_per_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kvscope align EXPORT --timings TP_RUN` aligns each rank with its own timings and writes the rank tables (as
    `kvscope nsys --tp` does); filters that would cut ranks apart are refused in one line."""
    export, run_dir = _two_rank_run(tmp_path)
    out = tmp_path / "aligned"
    assert main(["align", str(export), "--timings", str(run_dir), "--out", str(out)]) == 0
    ranks = pd.read_parquet(out / RANKS_FILE)
    assert ranks[["pid", "rank", "straggler"]].values.tolist() == [[22, 0, False], [11, 1, True]]
    assert sorted(pd.read_parquet(out / "align.parquet")["rank"].unique()) == [0, 1]
    assert (out / RANK_STEPS_FILE).exists()
    capsys.readouterr()
    assert main(["align", str(export), "--timings", str(run_dir), "--pid", "22", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pid cannot be combined with the timings of a tensor-parallel run" in err
    assert not (tmp_path / "x").exists()
