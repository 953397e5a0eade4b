"""`kvscope diff` of sweep files (kvscope/analysis/diff/sweep_rows.py) on the committed sweeps of docs/sweeps: a sweep
against itself, against a copy whose decode step is 5% slower, kvscope's sweep against transformers', two devices,
a point out of memory, and sweeps of other shapes or kinds refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diff_fixtures import slowed_sweep
from paths import ROOT

from kvscope.analysis.diff.compare import diff
from kvscope.analysis.diff.gate import parse_gate
from kvscope.errors import KvscopeError

SWEEPS = ROOT / "docs" / "sweeps"
H100_BATCH = SWEEPS / "qwen2.5-3b-batch.csv"  # 7 points, H100
H100_SEQ = SWEEPS / "qwen2.5-3b-seq.csv"
H200_SEQ = SWEEPS / "h200" / "qwen2.5-3b-seq-kvscope.csv"  # 5 points, H200
H200_KV = SWEEPS / "h200" / "qwen2.5-3b-batch-kvscope.csv"  # 5 points, kvscope's loop
H200_HF = SWEEPS / "h200" / "qwen2.5-3b-batch-transformers.csv"  # the same points, transformers' eager loop
ONE_VALUE = ("one value a side: a sweep file keeps a point's medians, not its samples (the all points rows pool the "
             "points)")


def _line(table: pd.DataFrame, row: str) -> pd.Series:
    hits = table[table["row"] == row]
    assert len(hits) == 1, row
    return hits.iloc[0]


def test_a_sweep_against_itself() -> None:
    result = diff(H100_BATCH, H100_BATCH)
    t = result.table
    assert result.kind == "sweep file" and set(t["verdict"]) == {"same"}
    assert {"all points decode_p50_ms_per_tok", "seq=128 batch=64 decode_p50_ms_per_tok",
            "all points total_tok_s"} <= set(t["row"])
    assert result.headline_row() == "all points decode_p50_ms_per_tok"
    assert _line(t, "all points decode_p50_ms_per_tok")["a_samples"] == 7


def test_a_five_percent_slower_decode_step(tmp_path: Path) -> None:
    """The decode step 5% longer at every point: the pooled row is slower (every ratio 1.05), each point's row has
    its two numbers and no verdict, the other columns are the same."""
    slow = slowed_sweep(H100_BATCH, tmp_path / "slow.csv", "decode_p50_ms_per_tok", 1.05)
    result = diff(H100_BATCH, slow)
    t = result.table
    pooled = _line(t, "all points decode_p50_ms_per_tok")
    assert pooled["verdict"] == "slower"
    assert (pooled["ci_low_pct"], pooled["ci_high_pct"]) == pytest.approx((5.0, 5.0))
    point = _line(t, "seq=128 batch=1 decode_p50_ms_per_tok")
    assert (point["a"], point["b"]) == pytest.approx((3.860416, 3.860416 * 1.05), rel=1e-6)
    assert point["verdict"] == "cannot tell" and point["reason"] == ONE_VALUE
    others = t[~t["row"].str.contains("decode_p50_ms_per_tok")]
    assert set(others.loc[others["family"] == "points", "verdict"]) == {"same"}
    assert [result.gate(parse_gate(g)).code for g in ("slower:3%", "slower:10%", "slower:6%")] == [1, 0, 0]


def test_kvscope_against_transformers_on_one_device() -> None:
    """Two engines' sweeps of one model on the H200, 5 points each: matched point by point, their settings named;
    5 points are too few for the pooled interval (6 needed), so even a 17x slower decode step cannot tell."""
    result = diff(H200_KV, H200_HF)
    t = result.table
    assert result.notes == ["settings that differ: engine (kvscope vs transformers), attn (kvscope vs sdpa), "
                            "cuda_graphs (True vs False), kernels (True vs False)"]
    pooled = _line(t, "all points decode_p50_ms_per_tok")
    assert pooled["verdict"] == "cannot tell"
    assert pooled["reason"] == "too few samples: 5 points both sides hold (a 95% interval needs 6)"
    point = _line(t, "seq=512 batch=1 decode_p50_ms_per_tok")
    assert point["diff_pct"] == pytest.approx((48.054241 / 2.832544 - 1) * 100, rel=1e-6)


def test_sweeps_of_another_shape_are_refused() -> None:
    """The H100 and H200 sequence sweeps generated 32 and 16 tokens: refused, or shown without verdicts."""
    with pytest.raises(KvscopeError, match=r"different measurements: gen_tokens \(32 vs 16\)"):
        diff(H100_SEQ, H200_SEQ)
    t = diff(H100_SEQ, H200_SEQ, allow_different=True).table
    assert set(t["reason"]) == {"different gen_tokens (32 vs 16)"}
    shared = t[t["row"].str.endswith(" decode_p50_ms_per_tok") & t["a"].notna() & t["b"].notna()]
    assert sorted(shared["row"]) == ["all points decode_p50_ms_per_tok", "seq=128 batch=1 decode_p50_ms_per_tok",
                                     "seq=2048 batch=1 decode_p50_ms_per_tok",
                                     "seq=512 batch=1 decode_p50_ms_per_tok"]


def _other_device(tmp_path: Path, mbu: bool) -> Path:
    """The H100 batch sweep as if run on an H200: the decode step 20% shorter, and its MBU 25% higher (or none: no
    calibration there)."""
    df = pd.read_csv(H100_BATCH)
    df["device"] = "NVIDIA H200"
    df["decode_p50_ms_per_tok"] *= 0.8
    df["decode_mbu"] = df["decode_mbu"] * 1.25 if mbu else np.nan
    out = tmp_path / "h200.csv"
    df.to_csv(out, index=False)
    return out


def test_two_devices_compare_times_and_shares_of_their_ceilings(tmp_path: Path) -> None:
    result = diff(H100_BATCH, _other_device(tmp_path, mbu=True))
    t = result.table
    assert result.notes[-1].startswith("different devices (NVIDIA H100 80GB HBM3 vs NVIDIA H200): times compare")
    step = _line(t, "all points decode_p50_ms_per_tok")
    assert step["verdict"] == "faster"
    assert step["reason"] == ("the 95% interval -20.0% to -20.0% lies below -2% (different devices: NVIDIA H100 80GB "
                              "HBM3 vs NVIDIA H200)")
    mbu = _line(t, "all points decode_mbu")
    assert mbu["better"] == "higher" and mbu["verdict"] == "faster" and mbu["diff_pct"] == pytest.approx(25.0)


def test_two_devices_without_ceilings_cannot_tell_their_shares(tmp_path: Path) -> None:
    t = diff(H100_BATCH, _other_device(tmp_path, mbu=False)).table
    mbu = _line(t, "all points decode_mbu")
    assert mbu["verdict"] == "cannot tell"
    assert mbu["reason"] == ("different devices (NVIDIA H100 80GB HBM3 vs NVIDIA H200) without ceilings: B has no "
                             "calibrated ceiling (kvscope calibrate)")
    assert _line(t, "all points decode_p50_ms_per_tok")["verdict"] == "faster"


def test_a_point_out_of_memory(tmp_path: Path) -> None:
    df = pd.read_csv(H100_BATCH)
    df["flag"] = np.where(df["batch"] == 64, "oom", "")
    oom = tmp_path / "oom.csv"
    df.to_csv(oom, index=False)
    t = diff(H100_BATCH, oom).table
    assert _line(t, "seq=128 batch=64 decode_p50_ms_per_tok")["reason"] == "ran out of memory in B"
    pooled = _line(t, "all points decode_p50_ms_per_tok")  # the 6 other points
    assert (pooled["a_samples"], pooled["verdict"]) == (6, "same")
    assert pooled["reason"] == "identical samples on both sides"


def test_a_sweep_against_a_run_folder_is_refused() -> None:
    with pytest.raises(KvscopeError, match=r"^A .*qwen2.5-3b-batch.csv is a sweep file and B .*tiny-run a run "
                                           r"folder: kvscope diff compares two run folders, two captures or two "
                                           r"sweep files$"):
        diff(H100_BATCH, ROOT / "tests" / "data" / "nsys" / "tiny-run")
