"""A served load's iterations under nsys (kvscope.analysis.serving.iterations_nsys) on a small synthetic export whose
every number is known by hand, read as an export and as the folder `kvscope align` writes, joined with the
hand-built run's iterations (serving_frames), and fed to the per-request GPU cost.

The export (times in µs; one process, thread 1 unless said; NVTX domain `kvscope` unless said):

| range | host span | launches inside (kernel: GPU span, stream) |
| iter 0 | 1000..6000 | in `L00` 1050..3000: gemv 2000..2500 (s7), attention 2400..3000 (s8); norm 3500..3600 (s7) |
| iter 1 | 7000..9000 | one cudaGraphLaunch: gemv 8000..8300, attention 8300..8700 (s7, graph nodes) |
| iter -1 | 9400..9900 | gemv 9700..9800 (a warm-up iteration: not one of the load's) |
| iter 5 (default domain) | 10000..11000 | gemv 10300..10400 (not kvscope's) |
| (none, thread 2) | | gemv 2600..2700, launched at 1500 while iter 0 is open on thread 1: not iter 0's |

iter 0: span 2000..3600 = 1.6 ms, busy [2000, 3000] + [3500, 3600] = 1.1 ms, idle 0.5 ms (31.25%), 3 launches;
iter 1: span 0.7 ms, all busy, 1 launch of 2 kernels, 4.4 ms after iter 0's last kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from serving_frames import META, batches, iterations, requests, write_run

from kvscope.analysis.align.pipeline import analyse, write
from kvscope.analysis.serving.iterations_nsys import (
    ITERATION_GPU_COLUMNS,
    ITERATION_GPU_FILE,
    ITERATION_KERNEL_COLUMNS,
    ITERATION_KERNELS_FILE,
    ITERATION_RE,
    captured,
    iteration_gpu,
    iteration_kernels,
    iteration_summary,
    nsys_kernel_classes,
    serve_tables,
)
from kvscope.analysis.serving.request_cost import iteration_split, request_gpu_cost
from kvscope.errors import KvscopeError
from kvscope.io import write_parquet
from kvscope.schema import NSYS_RUN_SUBFOLDER, iteration_name
from tests.synthetic_export import Synth

PID = 7
GEMV, NORM = "kvscope_gemv_m4", "kvscope_rms_norm_vec"
ATTN, ATTN_MMA = "kvscope_decode_attention_d128_g2", "kvscope_decode_attention_mma_d128"


def us(t: int) -> int:
    return t * 1000


def serve_export(path: Path, twice: bool = False) -> Path:
    """The export of the module docstring (`twice`: a second `iter 1` range, as two loads in one capture)."""
    s = Synth()
    s.domain(PID, 1, 1, "kvscope")
    s.range(PID, 1, us(1000), us(6000), "iter 0", domain_id=1)
    s.range(PID, 1, us(1050), us(3000), "L00", domain_id=1)
    s.launch(PID, 1, us(1100), us(1200), 1, [(us(2000), us(2500), 7)], kernel_name=GEMV)
    s.launch(PID, 1, us(1300), us(1400), 2, [(us(2400), us(3000), 8)], kernel_name=ATTN)
    s.launch(PID, 1, us(3100), us(3200), 3, [(us(3500), us(3600), 7)], kernel_name=NORM)
    s.launch(PID, 2, us(1500), us(1550), 9, [(us(2600), us(2700), 9)], kernel_name=GEMV)  # another thread
    s.range(PID, 1, us(7000), us(9000), "iter 1", domain_id=1)
    s.launch(PID, 1, us(7100), us(7200), 4, [(us(8000), us(8300), 7), (us(8300), us(8700), 7)],
             name="cudaGraphLaunch", kernel_name=GEMV, graph_nodes=True)
    second = s.kernels[-1]  # the replay's second node is the attention kernel
    s.kernels[-1] = (*second[:6], s.sid(ATTN_MMA), s.sid(ATTN_MMA), second[8])
    s.range(PID, 1, us(9400), us(9900), "iter -1", domain_id=1)
    s.launch(PID, 1, us(9500), us(9600), 5, [(us(9700), us(9800), 7)], kernel_name=GEMV)
    s.range(PID, 1, us(10000), us(11000), "iter 5")
    s.launch(PID, 1, us(10100), us(10200), 6, [(us(10300), us(10400), 7)], kernel_name=GEMV)
    if twice:
        s.range(PID, 1, us(12000), us(13000), "iter 1", domain_id=1)
    return s.write(path)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return serve_export(tmp_path / "serve.sqlite")


def _kernels_dict(df: pd.DataFrame) -> dict[tuple[int, str], tuple[int, float]]:
    return {(int(r.iteration), str(r[1])): (int(r.kernels), float(r.ms)) for r in df.itertuples(index=False)}


def test_the_iteration_name_reads_back() -> None:
    assert ITERATION_RE.match(iteration_name(42))[1] == "42"  # type: ignore[index]
    assert ITERATION_RE.match(iteration_name(-1)) is None  # the warm-up's


def test_kernel_time_per_iteration_and_class(export: Path) -> None:
    got = iteration_kernels(export)
    assert list(got.columns) == list(ITERATION_KERNEL_COLUMNS)
    assert _kernels_dict(got) == {
        (0, "gemm"): (1, 0.5), (0, "attention"): (1, 0.6), (0, "norm"): (1, 0.1),
        (1, "gemm"): (1, 0.3), (1, "attention"): (1, 0.4),
    }


def test_gpu_span_busy_idle_per_iteration(export: Path) -> None:
    got = iteration_gpu(export)
    assert list(got.columns) == list(ITERATION_GPU_COLUMNS)
    assert got["iteration"].tolist() == [0, 1]
    assert got["span_ms"].tolist() == [1.6, 0.7]
    assert got["busy_ms"].tolist() == [1.1, 0.7]
    assert got["idle_ms"].tolist() == [0.5, 0.0]
    assert got["idle_pct"].tolist() == [31.25, 0.0]
    assert got["gpu_start_ns"].tolist() == [us(2000), us(8000)] and got["gpu_end_ns"].tolist() == [us(3600), us(8700)]
    assert np.isnan(got["gap_ms"].iloc[0]) and got["gap_ms"].iloc[1] == 4.4
    assert got["gpu_ops"].tolist() == [3, 1] and got["kernels"].tolist() == [3, 2]
    assert got["cpu_ms"].tolist() == [5.0, 2.0] and (got["pid"] == PID).all()
    assert got["kind"].isna().all() and got["event_ms"].isna().all()  # no run folder given


def test_the_align_folder_gives_the_same_tables(export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "aligned"
    write(analyse(export), folder, {})
    pd.testing.assert_frame_equal(iteration_kernels(folder), iteration_kernels(export))
    pd.testing.assert_frame_equal(iteration_gpu(folder), iteration_gpu(export))


def test_each_class_sum_matches_the_iteration(export: Path) -> None:
    """Every GPU operation under an iteration is counted once: the class rows add up to the iteration's rows."""
    k, g = iteration_kernels(export), iteration_gpu(export)
    assert k.groupby("iteration")["kernels"].sum().tolist() == g["kernels"].tolist()


def test_joined_with_the_run_folders_iterations(export: Path, tmp_path: Path) -> None:
    nsys_out = tmp_path / "x"
    write(analyse(export), nsys_out, {})
    write_run(nsys_out / NSYS_RUN_SUBFOLDER)
    got = iteration_gpu(nsys_out)  # finds x/run/iterations.parquet
    assert got["kind"].tolist() == ["prefill", "mixed"]
    assert got["event_ms"].tolist() == [100.0, 150.0]
    assert got["span_minus_event_ms"].to_numpy() == pytest.approx([1.6 - 100.0, 0.7 - 150.0])
    pd.testing.assert_frame_equal(got, iteration_gpu(export, nsys_out / NSYS_RUN_SUBFOLDER))
    pd.testing.assert_frame_equal(got, iteration_gpu(export, iterations()))


def test_user_class_rules_come_first(export: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rule": [{"class": "attention", "pattern": "kvscope_gemv"}]}))
    got = _kernels_dict(iteration_kernels(export, classes=rules))
    assert got == {(0, "attention"): (2, 1.1), (0, "norm"): (1, 0.1), (1, "attention"): (2, 0.7)}
    folder = tmp_path / "aligned"
    write(analyse(export), folder, {})
    assert _kernels_dict(iteration_kernels(folder, classes=rules)) == got


def test_an_iteration_twice_is_one_line(tmp_path: Path) -> None:
    path = serve_export(tmp_path / "twice.sqlite", twice=True)
    with pytest.raises(KvscopeError, match=r"2 ranges named 'iter 1'.*one served load per capture"):
        iteration_kernels(path)


def test_request_cost_takes_the_kernel_classes(export: Path) -> None:
    """Iterations 0 and 1 from nsys (attention 0.6 and 0.4 ms, the rest 0.6 and 0.3 ms), 2..4 from the model."""
    split = iteration_split(batches(), iterations(), iteration_kernels(export), META).set_index("iteration")
    assert split["source"].tolist() == ["nsys", "nsys", "model", "model", "model"]
    assert split.loc[0, "attention_ms"] == pytest.approx(0.6) and split.loc[0, "other_ms"] == pytest.approx(0.6)
    assert split.loc[1, "attention_ms"] == pytest.approx(0.4) and split.loc[1, "other_ms"] == pytest.approx(0.3)
    cost = request_gpu_cost(batches(), iterations(), iteration_kernels(export), META, requests())
    assert set(cost["source"]) == {"nsys+model", "model", ""}  # r1, r2 ran in both; r3 after; r4 refused


def test_written_tables_are_found_from_either_folder(export: Path, tmp_path: Path) -> None:
    nsys_out = tmp_path / "x"
    write_run(nsys_out / NSYS_RUN_SUBFOLDER)
    tables = serve_tables(captured(export), nsys_out / NSYS_RUN_SUBFOLDER)
    assert set(tables) == {ITERATION_KERNELS_FILE, ITERATION_GPU_FILE}
    for name, df in tables.items():
        write_parquet(df, nsys_out / name, {})
    for folder in (nsys_out, nsys_out / NSYS_RUN_SUBFOLDER):
        found = nsys_kernel_classes(folder)
        assert found is not None
        pd.testing.assert_frame_equal(found, tables[ITERATION_KERNELS_FILE])
    assert nsys_kernel_classes(write_run(tmp_path / "plain")) is None  # a serve run never profiled


def test_the_summary_numbers(export: Path) -> None:
    s = iteration_summary(serve_tables(captured(export)))
    assert s["iterations"] == 2 and s["span_ms"] == pytest.approx(2.3) and s["busy_ms"] == pytest.approx(1.8)
    assert s["idle_pct"] == pytest.approx(100 * 0.5 / 2.3) and s["gap_ms"] == pytest.approx(4.4)
    assert s["ms_by_class"] == pytest.approx({"attention": 1.0, "gemm": 0.8, "norm": 0.1})
