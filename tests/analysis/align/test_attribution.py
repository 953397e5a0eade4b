"""The attribution columns of `kvscope sweep --nsys` (kvscope.analysis.align.attribution): on real exports of kvscope's
loop, checked against figures computed here from the kernel table by another path (group by the kernels' own
rep/step keys, interval unions written out), and on a small synthetic export of another engine whose answers are
known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.attribution import (
    ATTRIBUTION_VALUES,
    CLASS_COLUMNS,
    LAUNCH_BOUND_IDLE_PCT,
    PointFacts,
    aligned,
    attribution,
    run_keys,
    step_table,
)
from kvscope.analysis.kv_math import kv_bytes_per_token
from kvscope.analysis.roofline import layer_matmul_params, weights_read_bytes
from kvscope.model.config import PRESETS
from kvscope.schema import ATTRIBUTION_CLASS_WORDS, ATTRIBUTION_COLUMNS, NSYS_REPORT_COLUMN, Ceilings
from tests.synthetic_export import Synth

EXPORTS = {"tiny": DATA / "nsys" / "tiny.sqlite", "qwen2.5-0.5b": DATA / "nsys" / "qwen25-05b.sqlite"}
SEQ = 32  # both exports: `run bs=1 seq=32 gen=4`, 2 repetitions of a prefill and decode steps 1..3
CEILINGS = Ceilings("test GPU", 2000.0, 500.0)


def _union_ns(starts: np.ndarray, ends: np.ndarray) -> int:
    """Length of the union of intervals, by a plain sweep over them sorted by start."""
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(zip(starts.tolist(), ends.tolist(), strict=True)):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0)


def _expected(kernels: pd.DataFrame, phase: str) -> dict[str, float]:
    """Per step of `phase` (grouped by the kernels' rep and step keys): span, busy, kernels and class sums; the
    medians over the steps."""
    k = kernels[(kernels["phase"] == phase).fillna(False) & kernels["step"].notna()]
    rows = []
    for _, g in k.groupby([k["rep"].astype("int64"), k["step"].astype("int64")]):
        s, e = g["start_ns"].to_numpy(np.int64), g["end_ns"].to_numpy(np.int64)
        row = {"span_ms": (e.max() - s.min()) / 1e6, "busy_ms": _union_ns(s, e) / 1e6, "kernels": float(len(g))}
        for cls, word in CLASS_COLUMNS.items():
            row[f"{word}_ms"] = g.loc[g["kernel_class"] == cls, "dur_ns"].sum() / 1e6
        rows.append(row)
    return pd.DataFrame(rows).median().to_dict()


def test_the_columns_are_schemas() -> None:
    assert tuple(CLASS_COLUMNS.values()) == ATTRIBUTION_CLASS_WORDS
    assert (*ATTRIBUTION_VALUES, NSYS_REPORT_COLUMN) == ATTRIBUTION_COLUMNS
    assert LAUNCH_BOUND_IDLE_PCT == 30.0


@pytest.mark.parametrize("model", list(EXPORTS))
def test_real_export_per_step_figures(model: str) -> None:
    result = aligned(EXPORTS[model])
    assert run_keys(result) == [(1, SEQ, 4)]
    args = PRESETS[model]
    got = attribution(result, PointFacts(args, 1, SEQ, 2, "bfloat16", CEILINGS))
    assert list(got) == list(ATTRIBUTION_VALUES)
    for phase, steps in (("decode", 6), ("prefill", 2)):
        assert (step_table(result)["phase"] == phase).sum() == steps  # 2 repetitions
        want = _expected(result.kernels, phase)
        for col, value in want.items():
            assert got[f"{phase}_{col}"] == pytest.approx(value, rel=1e-12, abs=1e-12), (phase, col)
        idle = 100 * (1 - want["busy_ms"] / want["span_ms"])
        assert got[f"{phase}_idle_pct"] == pytest.approx(idle, rel=1e-12)
        assert got[f"{phase}_launch_bound"] is (idle >= 30.0)
    # eager steps of a small model at batch 1: the GPU idles most of every step
    assert got["decode_idle_pct"] > 90 and got["decode_launch_bound"] is True
    assert got["decode_kernels"] == (91.0 if model == "tiny" else 953.0)


@pytest.mark.parametrize("model", list(EXPORTS))
def test_bytes_flops_and_rates(model: str) -> None:
    result = aligned(EXPORTS[model])
    a = PRESETS[model]
    got = attribution(result, PointFacts(a, 1, SEQ, 2, "bfloat16", CEILINGS))
    per_tok = kv_bytes_per_token(a, 2)
    weights = weights_read_bytes(a, 1, 2)
    # decode steps 1, 2, 3 attend over SEQ + step positions and write one: the mean context is SEQ + 2
    assert got["decode_bytes"] == weights + (SEQ + 2) * per_tok + per_tok
    assert got["prefill_bytes"] == weights_read_bytes(a, SEQ, 2) + SEQ * per_tok
    flops = 2 * SEQ * a.n_layers * layer_matmul_params(a) + 2 * a.dim * a.vocab_size
    flops += a.n_layers * 4 * a.n_heads * a.head_dim * SEQ * (SEQ + 1) // 2
    assert got["prefill_flops"] == flops
    for phase in ("decode", "prefill"):
        gb_s = got[f"{phase}_bytes"] / (got[f"{phase}_span_ms"] / 1e3) / 1e9
        assert got[f"{phase}_span_gb_s"] == pytest.approx(gb_s, rel=1e-12)
        assert got[f"{phase}_mbu_pct"] == pytest.approx(100 * gb_s / CEILINGS.copy_gb_s, rel=1e-12)
    tflop_s = flops / (got["prefill_span_ms"] / 1e3) / 1e12
    assert got["prefill_span_tflop_s"] == pytest.approx(tflop_s, rel=1e-12)
    assert got["prefill_mfu_pct"] == pytest.approx(100 * tflop_s / CEILINGS.bf16_tflop_s, rel=1e-12)


def test_no_calibration_or_a_float32_run_has_no_utilisation() -> None:
    result = aligned(EXPORTS["tiny"])
    bare = attribution(result, PointFacts(PRESETS["tiny"], 1, SEQ, 2, "bfloat16", None))
    assert all(math.isnan(bare[c]) for c in ("decode_mbu_pct", "prefill_mbu_pct", "prefill_mfu_pct"))
    assert bare["decode_span_gb_s"] > 0
    fp32 = attribution(result, PointFacts(PRESETS["tiny"], 1, SEQ, 4, "float32", CEILINGS))
    assert math.isnan(fp32["prefill_mfu_pct"]) and fp32["prefill_mbu_pct"] > 0


def _engine_export(path: Path, domain: bool) -> Path:
    """Another engine's capture: `run bs=2 seq=4 gen=3`, a prefill and decode steps 1 and 2 with the kvscope names,
    in the default NVTX domain (or in `kvscope`'s when `domain`), kernels at known times (ns)."""
    x = Synth()
    dom = 0
    if domain:
        x.domain(1, 1, 1, "kvscope")
        dom = 1
    x.range(1, 1, 0, 10_000, "run bs=2 seq=4 gen=3", dom)
    x.range(1, 1, 100, 2_000, "prefill", dom)
    x.launch(1, 1, 110, 120, 1, [(200, 900, 7)], kernel_name="void gemm_kernel()")
    x.launch(1, 1, 130, 140, 2, [(1_000, 1_200, 7)], kernel_name="flash_fwd_kernel")
    x.launch(1, 1, 150, 160, 3, [(1_300, 1_400, 7)], kernel_name="rms_norm_kernel")
    # step 1: span 400 ns, busy 300 ns (idle 25%); step 2: span 600 ns, busy 200 ns (idle 66.7%)
    x.range(1, 1, 3_000, 4_000, "decode step 1", dom)
    x.launch(1, 1, 3_010, 3_020, 4, [(3_100, 3_300, 7)], kernel_name="void gemm_kernel()")
    x.launch(1, 1, 3_030, 3_040, 5, [(3_400, 3_500, 7)], kernel_name="flash_fwd_kernel")
    x.range(1, 1, 5_000, 6_000, "decode step 2", dom)
    x.launch(1, 1, 5_010, 5_020, 6, [(5_100, 5_200, 7)], kernel_name="void gemm_kernel()")
    x.launch(1, 1, 5_030, 5_040, 7, [(5_600, 5_700, 7)], kernel_name="flash_fwd_kernel")
    x.launch(1, 1, 9_000, 9_010, 8, [(9_100, 9_200, 7)], kernel_name="void gemm_kernel()")  # in no step
    return x.write(path)


@pytest.mark.parametrize("domain", [False, True], ids=["default-domain", "kvscope-domain"])
def test_another_engines_ranges_by_hand(tmp_path: Path, domain: bool) -> None:
    result = aligned(_engine_export(tmp_path / "e.sqlite", domain))
    assert run_keys(result) == [(2, 4, 3)]
    got = attribution(result, PointFacts(PRESETS["tiny"], 2, 4, 2, "bfloat16", CEILINGS))
    assert got["decode_span_ms"] == pytest.approx(500e-6) and got["decode_busy_ms"] == pytest.approx(250e-6)
    assert got["decode_idle_pct"] == pytest.approx(50.0) and got["decode_launch_bound"] is True
    assert got["decode_kernels"] == 2.0
    assert got["decode_gemm_ms"] == pytest.approx(150e-6) and got["decode_attention_ms"] == pytest.approx(100e-6)
    assert got["decode_norm_ms"] == 0.0 and got["decode_copy_ms"] == 0.0 and got["decode_other_ms"] == 0.0
    assert got["prefill_span_ms"] == pytest.approx(1200e-6) and got["prefill_busy_ms"] == pytest.approx(1000e-6)
    assert got["prefill_idle_pct"] == pytest.approx(100 * (1 - 1000 / 1200))
    assert got["prefill_launch_bound"] is False and got["prefill_kernels"] == 3.0
    assert (got["prefill_gemm_ms"], got["prefill_attention_ms"], got["prefill_norm_ms"]) == pytest.approx(
        (700e-6, 200e-6, 100e-6))
    a = PRESETS["tiny"]
    per_tok = kv_bytes_per_token(a, 2)
    # steps 1 and 2 of two sequences: contexts 5 and 6, mean 5.5
    assert got["decode_bytes"] == weights_read_bytes(a, 2, 2) + 2 * 5.5 * per_tok + 2 * per_tok


@pytest.mark.parametrize("name", ["plain", "hf"])  # torch ranges; transformers' generate, one range per call
def test_a_capture_without_steps_is_all_nan(name: str) -> None:
    result = aligned(DATA / "foreign" / f"{name}.sqlite")
    got = attribution(result, PointFacts(PRESETS["tiny"], 1, 8, 2, "bfloat16", CEILINGS))
    assert run_keys(result) == []
    assert got["decode_launch_bound"] is pd.NA and got["prefill_launch_bound"] is pd.NA
    assert all(math.isnan(v) for k, v in got.items() if not k.endswith("launch_bound"))


def test_launch_bound_threshold_is_inclusive(tmp_path: Path) -> None:
    x = Synth()
    x.range(1, 1, 0, 2_000, "decode step 1")
    x.launch(1, 1, 10, 20, 1, [(100, 170, 7)])
    x.launch(1, 1, 30, 40, 2, [(170, 200, 7)])  # busy 100 of a 100 ns span
    x.range(1, 1, 3_000, 5_000, "decode step 2")
    x.launch(1, 1, 3_010, 3_020, 3, [(3_100, 3_170, 7)])
    x.launch(1, 1, 3_030, 3_040, 4, [(3_230, 3_300, 7)])  # busy 140 of 200: idle 30%
    result = aligned(x.write(tmp_path / "t.sqlite"))
    got = attribution(result, PointFacts(PRESETS["tiny"], 1, 8, 2, "bfloat16", None))
    # medians: span 150, busy 120 -> idle 20%; each step on its own is 0% and 30%
    assert got["decode_idle_pct"] == pytest.approx(20.0) and got["decode_launch_bound"] is False
    steps = step_table(result)
    idle = 100 * (1 - steps["busy_ms"] / steps["span_ms"])
    assert idle.round(9).tolist() == [0.0, 30.0]


def test_replayed_graphs_count_every_node(tmp_path: Path) -> None:
    """Decode steps replayed from a CUDA graph (`--cuda-graph-trace=node`): one cudaGraphLaunch per step, whose
    kernels all share its correlation id and belong to the step."""
    x = Synth()
    x.domain(1, 1, 1, "kvscope")
    for i, t0 in enumerate((1_000, 5_000), start=1):
        x.range(1, 1, t0, t0 + 2_000, f"decode step {i}", 1)
        nodes = [(t0 + 100, t0 + 400, 7), (t0 + 400, t0 + 500, 7), (t0 + 500, t0 + 800, 7)]
        x.launch(1, 1, t0 + 10, t0 + 50, i, nodes, name="cudaGraphLaunch_v10000", kernel_name="nvjet_sm90_gemm",
                 graph_nodes=True)
    result = aligned(x.write(tmp_path / "g.sqlite"))
    got = attribution(result, PointFacts(PRESETS["tiny"], 1, 8, 2, "bfloat16", None))
    assert got["decode_kernels"] == 3.0 and got["decode_gemm_ms"] == pytest.approx(700e-6)
    assert got["decode_span_ms"] == pytest.approx(700e-6) and got["decode_idle_pct"] == pytest.approx(0.0)
    assert got["decode_launch_bound"] is False
    assert math.isnan(got["prefill_span_ms"]) and got["prefill_launch_bound"] is pd.NA
