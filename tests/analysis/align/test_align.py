"""Alignment of projected ranges with a run's timings, on the real captures of tests/data/nsys."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.join import LAUNCH_BOUND_IDLE_FRACTION
from kvscope.analysis.align.kernel_classes import classify_name
from kvscope.analysis.align.pipeline import OUTPUT_FILES, analyse
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata

DATA = DATA / "nsys"


@pytest.fixture(scope="module")
def tiny():
    return analyse(DATA / "tiny.sqlite", DATA / "tiny-run")


def test_every_timed_region_has_its_range(tiny) -> None:
    t = pd.read_parquet(DATA / "tiny-run" / "timings.parquet")
    a = tiny.regions.dropna(subset=["event_ms"])
    assert len(a) == len(t) == 1 + 2 * (1 + 2 + 3 + 4 * (2 + 3))  # run, reps, phases, steps, layers+named
    merged = a.merge(t, on=["name", "rep", "step"], suffixes=("", "_t"))
    assert len(merged) == len(t)
    assert (merged["event_ms"] == merged["dur_ms"]).all()
    assert set(tiny.regions["kind"].dropna()) == {"run", "rep", "phase", "step", "layer", "op"}
    ops = tiny.regions[tiny.regions["kind"] == "op"]
    assert len(ops) == 2 * 4 * 2 * 7 and ops["event_ms"].isna().all()  # op ranges exist (NVTX), untimed at layer


def test_keys_are_inherited(tiny) -> None:
    r = tiny.regions.set_index("range_id")
    qkv = r[(r["name"] == "L01.qkv") & (r["rep"] == 1) & (r["step"] == 2)]
    assert len(qkv) == 1
    row = qkv.iloc[0]
    assert (row["phase"], row["layer"], row["op"], row["run"]) == ("decode", 1, "qkv", "run bs=1 seq=32 gen=4")
    pre = r[(r["name"] == "L00") & (r["phase"] == "prefill")]
    assert len(pre) == 2 and (pre["step"] == 0).all()


def test_step_activity_and_launch_bound(tiny) -> None:
    s = tiny.steps
    assert len(s) == 2 * 4
    assert s["phase"].tolist().count("prefill") == 2
    assert ((s["gpu_busy_ms"] <= s["gpu_span_ms"]) & (s["gpu_idle_fraction"] >= 0)).all()
    assert (s["launch_bound"] == (s["gpu_idle_fraction"] > LAUNCH_BOUND_IDLE_FRACTION)).all()
    assert s["launch_bound"].all()  # tiny model, eager loop: the GPU waits for the host
    assert (s.loc[s["phase"] == "decode", "gpu_ops"] == 91).all()


def test_class_breakdown_exact(tiny) -> None:
    c = tiny.classes.set_index(["phase", "kernel_class"])
    assert c.loc[("decode", "gemm"), "ops"] == 54
    assert c.loc[("decode", "attention"), "ops"] == 12
    assert c.loc[("prefill", "gemm"), "ops"] == 18
    for phase, g in tiny.classes.groupby("phase"):
        assert g["share_pct"].sum() == pytest.approx(100.0), phase
    k = tiny.kernels
    assert len(k) == 736 and k["range_id"].notna().all()
    # the prompt lengths' host-to-device copies sit in each rep, outside its prefill range
    assert k["phase"].isna().sum() == 4 and (k.loc[k["phase"].isna(), "kind"] == "memcpy").all()
    assert (k.loc[k["kind"] == "memset", "kernel_class"] == "copy/memset").all()


@pytest.mark.parametrize(("name", "cls"), [
    ("nvjet_sm90_tst_64x8_64x16_2x4_h_bz_TNT", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t>>, false, true>(Flash_fwd_params)",
     "attention"),
    ("void fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)",
     "attention"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>", "norm"),
    ("void at::native::_scatter_gather_elementwise_kernel<128, 8>", "copy/memset"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    # kvscope's own kernels, by the names nsys shows for them
    ("kvscope_rms_norm_vec", "norm"),
    ("kvscope_silu_mul_vec", "elementwise"),
    ("kvscope_rope_kv_vec", "elementwise"),
    ("kvscope_stamp", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::ArgMaxOps<float>>>",
     "other"),
])
def test_kernel_class_rules(name: str, cls: str) -> None:
    assert classify_name(name) == cls


def test_cli_align_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "al"
    assert main(["align", str(DATA / "qwen25-05b.parquetdir"), "--timings", str(DATA / "qwen25-05b-run"),
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, "trace.json"])
    text = capsys.readouterr().out
    assert "GPU kernel time by class and phase" in text and "launch-bound" in text
    ranges = pd.read_parquet(out / "ranges.parquet")
    for col in ("range_id", "name", "domain", "style", "pid", "tid", "level", "parent_id", "start_ns", "end_ns",
                "gpu_start_ns", "gpu_end_ns", "gpu_busy_ns", "gpu_ops"):
        assert col in ranges.columns
    assert len(ranges) == 1573
    assert read_metadata(out / "align.parquet")["nsys_version"] == "2025.3.2.0"


def test_cli_align_without_timings(tmp_path: Path) -> None:
    assert main(["align", str(DATA / "tiny.sqlite"), "--out", str(tmp_path / "a")]) == 0
    assert pd.read_parquet(tmp_path / "a" / "align.parquet")["event_ms"].isna().all()


@pytest.mark.parametrize(("argv", "message"), [
    (["align", str(DATA / "tiny.sqlite"), "--timings", str(DATA / "qwen25-05b-run")], "timings do not match"),
    (["align", str(DATA / "tiny.sqlite"), "--timings", str(DATA)], f"{DATA / 'timings.parquet'} is missing"),
    (["align", str(DATA.parent / "README.md")], "not an nsys export"),
    (["align", str(DATA / "tiny-run")], "not an nsys parquetdir export"),
    (["align", str(DATA / "absent.sqlite")], "export not found"),
])
def test_cli_align_bad_input(argv: list[str], message: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_cli_nsys_validates_before_profiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nsys", "--out", str(tmp_path / "n"), "--", "--batch-size", "0", "--device", "cpu"]) == 2
    assert "--batch-size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["nsys", "--out", str(tmp_path / "n"), "--", "--model", "tiny", "--no-nvtx"]) == 2
    assert "needs NVTX" in capsys.readouterr().err
    assert main(["nsys", "--nsys", str(tmp_path / "no-nsys"), "--out", str(tmp_path / "n2"), "--", "--model",
                 "tiny", "--device", "cpu"]) == 2
    assert "nsys not found" in capsys.readouterr().err
    assert not (tmp_path / "n2").exists()


def test_timings_of_another_run_are_refused() -> None:
    with pytest.raises(KvscopeError, match="timings do not match the export"):
        analyse(DATA / "qwen25-05b.sqlite", DATA / "tiny-run")


def test_rows_timed_inside_a_cuda_graph_need_no_range(tiny) -> None:
    """Layer rows of graph-replayed steps (clock `cuda-graph`) have no NVTX range by design: alignment leaves them
    out; a host- or event-clock row without its range is still refused."""
    from kvscope.analysis.align.join import align_regions, label_ranges
    from kvscope.analysis.nsys.projection import project

    t = pd.read_parquet(DATA / "tiny-run" / "timings.parquet")
    extra = t[t["level"] == "layer"].head(3).copy()
    extra["name"] = ["L00", "L01", "lm_head"]
    extra["step"] = pd.array([99, 99, 99], dtype="Int64")  # a step the export has no range for
    extra["clock"] = "cuda-graph"
    labeled = label_ranges(project(tiny.export))
    aligned = align_regions(labeled, pd.concat([t, extra], ignore_index=True))
    assert aligned["event_ms"].notna().sum() == len(t)
    extra["clock"] = "cuda"
    with pytest.raises(KvscopeError, match="timings do not match the export"):
        align_regions(labeled, pd.concat([t, extra], ignore_index=True))
