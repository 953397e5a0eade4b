"""The "why" sentences of a sweep, from small synthetic sweeps whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kvscope.analysis.explain import (
    BATCH_FREE_PCT,
    COMPUTE_BOUND_MFU_PCT,
    FINDING_COLUMNS,
    explain,
    sweep_groups,
)

SEQS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
WEIGHTS_BYTES = 6_000_000_000
KV_PER_TOKEN_BYTES = WEIGHTS_BYTES // 6000  # the KV cache read per step equals the weights at 6,000 tokens
BANDWIDTH_B_S = 4e12  # the step moves its bytes at this rate: time = bytes / bandwidth
COPY_GB_S = 4000.0
PREFILL_IDLE_PCT = [90.0, 88.0, 87.0, 60.0, 35.0, 20.0, 10.0, 5.0, 3.0]  # launch-bound (>= 30) up to 2,048
PREFILL_MFU_PCT = [1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 55.0, 60.0, 62.0]  # reaches 50% at 8,192
BATCHES = [1, 2, 4, 8, 16, 32, 64]
BATCH_STEP_MS = [10.0, 10.2, 10.5, 10.9, 11.5, 14.0, 20.0]  # more than 10% over batch 1 from batch 16


def seq_sweep(engine: str | None = None) -> pd.DataFrame:
    """Batch 1, prompts 128 to 32k: the step reads weights + seq * KV_PER_TOKEN_BYTES; attention grows with seq."""
    seq = np.array(SEQS, dtype=np.int64)
    decode_bytes = WEIGHTS_BYTES + seq * KV_PER_TOKEN_BYTES
    step_ms = decode_bytes / BANDWIDTH_B_S * 1e3
    df = pd.DataFrame({
        "seq_len": seq, "batch": 1, "gen_tokens": 2, "decode_p50_ms_per_tok": step_ms, "decode_tok_s": 1e3 / step_ms,
        "flag": "", "model": "synthetic", "weights_bytes": WEIGHTS_BYTES, "decode_bytes": decode_bytes,
        "decode_span_gb_s": decode_bytes / step_ms / 1e6,
        "decode_mbu_pct": decode_bytes / step_ms / 1e6 / COPY_GB_S * 100,
        "decode_gemm_ms": 10.0, "decode_attention_ms": seq / 1024, "decode_norm_ms": 0.5,
        "decode_elementwise_ms": 0.5, "decode_copy_ms": 0.1, "decode_communication_ms": 0.0, "decode_other_ms": 0.0,
        "decode_idle_pct": [40.0, 38.0, 35.0, 30.0, 20.0, 12.0, 8.0, 6.0, 5.0], "decode_kernels": 400,
        "prefill_idle_pct": PREFILL_IDLE_PCT, "prefill_launch_bound": [v >= 30 for v in PREFILL_IDLE_PCT],
        "prefill_mfu_pct": PREFILL_MFU_PCT, "prefill_span_ms": seq / 100,
        "prefill_gemm_ms": seq / 200, "prefill_attention_ms": seq**2 / 2e7, "prefill_norm_ms": 0.1,
        "prefill_elementwise_ms": 0.1, "prefill_copy_ms": 0.0, "prefill_communication_ms": 0.0,
        "prefill_other_ms": 0.0,
    })
    if engine is not None:
        df["engine"] = engine
    return df


def batch_sweep() -> pd.DataFrame:
    return pd.DataFrame({"seq_len": 512, "batch": BATCHES, "decode_p50_ms_per_tok": BATCH_STEP_MS, "flag": "",
                         "tpot_p50_ms": BATCH_STEP_MS})


def one(df: pd.DataFrame, finding: str) -> pd.Series:
    rows = df[df["finding"] == finding]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_groups_split_seq_and_batch_axes_per_engine() -> None:
    df = pd.concat([seq_sweep(), batch_sweep(), seq_sweep("transformers")], ignore_index=True)
    groups = [(g.engine, g.axis, g.fixed, len(g.rows)) for g in sweep_groups(df)]
    # batch 1 at 512 tokens belongs to both sweeps
    assert groups == [("kvscope", "seq_len", 1, 9), ("kvscope", "batch", 512, 7), ("transformers", "seq_len", 1, 9)]


def test_kernel_class_that_grows_most_with_context() -> None:
    f = one(explain(seq_sweep()), "class_growth")
    v = f["values"]
    total_first = 10.0 + 128 / 1024 + 0.5 + 0.5 + 0.1
    total_last = 10.0 + 32.0 + 0.5 + 0.5 + 0.1
    assert v["class"] == "attention" and (v["from"], v["to"]) == (128, 32768)
    assert v["share_from_pct"] == pytest.approx(0.125 / total_first * 100)
    assert v["share_to_pct"] == pytest.approx(32.0 / total_last * 100)
    # attention reads the KV cache (decode_bytes - weights_bytes) in its 32 ms
    gb_s = 32768 * KV_PER_TOKEN_BYTES / 0.032 / 1e9
    assert v["class_gb_s_to"] == pytest.approx(gb_s) and v["copy_gb_s"] == pytest.approx(COPY_GB_S)
    assert f["sentence"] == (f"Attention grows most with context: 1.1% of the decode step's kernel time at 128 tokens, "
                             f"74% at 32,768 tokens, where it moves the KV cache at {gb_s:,.0f} GB/s "
                             f"({gb_s / COPY_GB_S * 100:.0f}% of the calibrated copy bandwidth).")


def test_weight_bound_to_kv_bound_crossover_from_bytes_columns() -> None:
    f = one(explain(seq_sweep()), "kv_bound")
    v = f["values"]
    assert v["crossover"] == pytest.approx(6000.0)
    assert v["kv_bytes_source"] == "decode_bytes - weights_bytes"
    # time = bytes / bandwidth: the log-log slope is the KV share; it first reaches 0.5 on 8,192 -> 16,384
    slope = math.log((6000 + 16384) / (6000 + 8192)) / math.log(2)
    assert v["bend"] == pytest.approx(math.sqrt(8192 * 16384)) and v["bend_slope"] == pytest.approx(slope)
    assert v["bends_there"] == 1
    assert f["sentence"].startswith("The decode step turns from weight-bound to KV-bound at about 6,000 tokens")
    assert "the measured step time bends there" in f["sentence"]


def test_crossover_from_model_facts_when_bytes_columns_are_absent() -> None:
    df = seq_sweep().drop(columns=["decode_bytes"])
    # kv_predicted_bytes covers seq + gen tokens; the decode steps read seq + gen / 2 = seq + 1 on average
    df["kv_predicted_bytes"] = (df["seq_len"] + 2) * KV_PER_TOKEN_BYTES
    v = one(explain(df), "kv_bound")["values"]
    assert v["crossover"] == pytest.approx(5999.0)
    assert v["kv_bytes_source"].startswith("kv_predicted_bytes") and v["weights_bytes"] == WEIGHTS_BYTES


def test_a_step_time_that_bends_elsewhere_is_said_so() -> None:
    df = seq_sweep()
    df["decode_p50_ms_per_tok"] = [10.0] * 8 + [30.0]  # flat, then a jump on the last segment only
    v = one(explain(df), "kv_bound")
    assert v["values"]["bends_there"] == 0 and v["values"]["bend"] == pytest.approx(math.sqrt(16384 * 32768))
    assert "bends elsewhere" in v["sentence"]


def test_weight_bound_everywhere_and_kv_bound_everywhere() -> None:
    df = seq_sweep()
    df["decode_bytes"] = WEIGHTS_BYTES + df["seq_len"] * 100
    assert one(explain(df), "kv_bound")["sentence"].startswith(
        "The decode step stays weight-bound over the whole context range: at 32,768 tokens")
    df["decode_bytes"] = 3 * WEIGHTS_BYTES
    assert one(explain(df), "kv_bound")["sentence"].startswith("The decode step is KV-bound from the smallest point")


def test_prefill_turns_compute_bound() -> None:
    out = explain(seq_sweep())
    lb = one(out, "prefill_launch_bound")
    assert lb["values"]["turns_at"] == 4096 and lb["values"]["last_launch_bound"] == 2048
    assert lb["sentence"] == ("The prefill stops being launch-bound at 4,096 tokens: GPU idle 35% of its span at "
                              "2,048 tokens, 20% at 4,096 tokens.")
    mfu = one(out, "prefill_mfu")
    assert mfu["values"]["reaches_at"] == 8192 and mfu["values"]["mfu_pct_there"] == 55.0
    assert mfu["values"]["threshold_pct"] == COMPUTE_BOUND_MFU_PCT
    share = one(out, "prefill_attention_share")["values"]
    last = 32768**2 / 2e7
    assert share["share_to_pct"] == pytest.approx(last / (last + 32768 / 200 + 0.2) * 100)


def test_batching_stops_being_free() -> None:
    f = one(explain(batch_sweep()), "batching_free")
    v = f["values"]
    assert v["threshold_pct"] == BATCH_FREE_PCT
    assert (v["stops_at"], v["free_up_to"]) == (16, 8)
    assert v["growth_pct_there"] == pytest.approx(15.0)
    assert v["linear_pct_there"] == pytest.approx((16 / 11.5) / (16 / 10.0) * 100)
    assert v["linear_pct_largest"] == pytest.approx((64 / 20.0) / (64 / 10.0) * 100)
    assert f["sentence"].startswith("Batching is free up to batch 8 (decode step within 10% of batch 1's 10.00 ms) "
                                    "and stops being free at batch 16: the step takes 11.50 ms (+15%)")
    at_once = batch_sweep()
    at_once.loc[1, "decode_p50_ms_per_tok"] = 12.0
    assert one(explain(at_once), "batching_free")["sentence"].startswith(
        "Batching stops being free at once (batch 1's decode step takes 10.00 ms) at batch 2: the step takes 12.00 ms "
        "(+20%)")
    free = batch_sweep()
    free["decode_p50_ms_per_tok"] = 10.0
    assert one(explain(free), "batching_free")["sentence"].startswith("Batching stays free over the sweep")


def test_idle_trend() -> None:
    f = one(explain(seq_sweep()), "decode_idle")
    assert f["sentence"] == ("The GPU is idle 40% of the decode step's span at 128 tokens; the share falls to 5.0% at "
                             "32,768 tokens (400 and 400 kernels per step).")


def test_missing_columns_write_no_sentence_but_say_what_is_missing() -> None:
    classic = seq_sweep()[["seq_len", "batch", "decode_p50_ms_per_tok", "flag"]]
    out = explain(classic)
    assert list(out.columns) == list(FINDING_COLUMNS)
    assert (out["sentence"] == "").all()
    assert one(out, "class_growth")["missing"].startswith("needs column(s) decode_gemm_ms, decode_attention_ms")
    assert one(out, "kv_bound")["missing"] == ("needs column(s) weights_bytes, decode_bytes (or kv_predicted_bytes "
                                               "and gen_tokens)")
    assert one(out, "prefill_mfu")["missing"].startswith("needs column(s) prefill_mfu_pct")
    text = batch_sweep().drop(columns=["tpot_p50_ms"]).astype({"decode_p50_ms_per_tok": object})
    text.loc[0, "decode_p50_ms_per_tok"] = "fast"  # text is not a number: missing, never a category
    assert one(explain(text), "batching_free")["missing"] == "needs column(s) decode_p50_ms_per_tok"


def test_out_of_memory_rows_are_left_out() -> None:
    df = batch_sweep()
    df.loc[6, "flag"] = "oom"
    df.loc[6, "decode_p50_ms_per_tok"] = np.nan
    v = one(explain(df), "batching_free")["values"]
    assert v["largest_batch"] == 32


def test_no_class_growing_names_the_largest() -> None:
    df = seq_sweep()
    df["decode_attention_ms"] = 1.0
    f = one(explain(df), "class_growth")
    assert f["values"]["class"] == "gemm"
    assert f["sentence"] == ("No kernel class gains 1 point(s) of the decode step's kernel time with context; the "
                             "largest, gemm, is 83% at 128 tokens and 83% at 32,768 tokens, where it moves the weights "
                             "at 600 GB/s (15% of the calibrated copy bandwidth).")  # 10 of 12.1 ms; 6 GB in 10 ms


def test_prefill_compute_bound_from_the_first_point_is_said_so() -> None:
    """A sweep whose shortest prompt already passes the MFU threshold is not said to 'turn' compute-bound there."""
    rows = pd.DataFrame({"seq_len": [8192, 32768, 131000], "batch": [1, 1, 1], "decode_p50_ms_per_tok": [5.0, 6.0, 9.0],
                         "decode_tok_s": [200.0, 166.0, 111.0], "prefill_mfu_pct": [83.6, 77.7, 73.6]})
    found = explain(rows).set_index("finding")
    assert found.loc["prefill_mfu", "sentence"] == ("The prefill is compute-bound from the smallest measured point, "
                                                    "8,192 tokens: its MFU is 84% there (threshold 50%) and 74% at "
                                                    "131,000 tokens.")
