"""`kvscope capacity` against hand-computed cases on the `tiny` preset.

tiny (bfloat16): 2 layers, 2 KV heads of 16 dims: KV bytes per token 2 * 2 * 2 * 16 * 2 = 256 (fp8: 128); the decode
workspace of one sequence (2 * 160 + 64 + 2 * 32 + 3 * 64) * 2 + 512 * 4 = 3,328 bytes; weights 151,872 * 2 =
303,744 bytes. Requests of 100 prompt + 28 output tokens; no reserve; 1,000,000 bytes of GPU memory: 696,256 bytes
for the requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import ROOT

from kvscope.analysis.capacity import (
    COMPUTED,
    INTERPOLATED,
    MEASURED,
    SOURCES,
    CapacityQuery,
    batch_curve,
    paged_block_sum,
    plan_capacity,
)
from kvscope.cli import main
from kvscope.model.config import ModelArgs

TINY = ModelArgs.from_preset("tiny")
WEIGHTS_BYTES = 303_744
BATCHES = [1, 2, 4, 8, 16, 32]
TPOT_MS = [10.0, 10.5, 11.0, 12.0, 16.0, 24.0]
TTFT_MS = [50.0, 90.0, 170.0, 330.0, 650.0, 1290.0]
PROMPT, OUTPUT = 100, 28


def batch_sweep(**extra: object) -> pd.DataFrame:
    b = np.array(BATCHES)
    df = pd.DataFrame({"seq_len": PROMPT, "batch": b, "gen_tokens": OUTPUT, "tpot_p50_ms": TPOT_MS,
                       "decode_p50_ms_per_tok": TPOT_MS, "ttft_ms": TTFT_MS, "flag": "", "model": "tiny",
                       "model_source": "preset:tiny", "dtype": "bfloat16", "weights_bytes": WEIGHTS_BYTES,
                       "kv_predicted_bytes": 256 * b * (PROMPT + OUTPUT)})
    return df.assign(**extra)


def plan(gpu_mem_bytes: int = 1_000_000, tpot: float = 14.0, ttft: float = 450.0, df: pd.DataFrame | None = None):
    curve = batch_curve(batch_sweep() if df is None else df, Path("b.csv"))
    q = CapacityQuery(gpu_mem_bytes=gpu_mem_bytes, tpot_slo_ms=tpot, ttft_slo_ms=ttft, prompt=PROMPT, output=OUTPUT,
                      block_tokens=16, reserve_bytes=0)
    return plan_capacity(curve, TINY, "bfloat16", WEIGHTS_BYTES, q)


def row(p, scenario: str, quantity: str) -> dict:
    (hit,) = [r for r in p.rows if r["scenario"] == scenario and r["quantity"] == quantity]
    return hit


def test_paged_blocks_by_hand() -> None:
    # after token k a request holds 100 + k tokens: k = 1..12 -> 7 blocks of 16, k = 13..28 -> 8 blocks
    assert paged_block_sum(PROMPT, OUTPUT, 16) == 12 * 7 + 16 * 8 == 212
    assert paged_block_sum(0, 32, 16) == 16 * 1 + 16 * 2


def test_memory_limits_contiguous_paged_fp8() -> None:
    p = plan()
    # contiguous: 128 tokens * 256 B = 32,768 B + 3,328 B workspace = 36,096 B per request; 696,256 // 36,096 = 19
    assert row(p, "contiguous bfloat16 KV", "kv_bytes_per_request")["value"] == 32_768
    assert row(p, "contiguous bfloat16 KV", "max_batch_memory")["value"] == 19
    # fp8: 16,384 + 3,328 = 19,712 B; 696,256 // 19,712 = 35
    assert row(p, "contiguous fp8 KV", "max_batch_memory")["value"] == 35
    # paged: 256 * 16 * 212 / 28 = 31,012.57 B on average; floor(696,256 * 28 / (868,352 + 3,328 * 28)) = 20
    assert row(p, "paged bfloat16 KV", "kv_bytes_per_request")["value"] == pytest.approx(256 * 16 * 212 / 28)
    assert row(p, "paged bfloat16 KV", "max_batch_memory")["value"] == 20
    assert row(p, "paged fp8 KV", "max_batch_memory")["value"] == 36  # floor(19,495,168 / 527,360)
    assert {r["source"] for r in p.rows if r["quantity"].startswith(("max_batch_memory", "kv_"))} == {COMPUTED}


def test_slo_batch_is_interpolated_and_littles_law() -> None:
    p = plan()
    # TTFT: 330 ms at 8, 650 at 16 -> 40 ms per batch: 450 at 11, 490 at 12 (> 450). TPOT at 11: 12 + 3 * 0.5
    for scenario in ("contiguous bfloat16 KV", "paged fp8 KV"):
        b = row(p, scenario, "max_batch_slo")
        assert (b["value"], b["source"]) == (11, INTERPOLATED)
        assert b["note"] == "limited by targets: stops at batch 12: TTFT 490.000 ms > 450 ms"
        assert row(p, scenario, "tpot_ms")["value"] == pytest.approx(13.5)
        assert row(p, scenario, "ttft_ms")["value"] == pytest.approx(450.0)
        assert row(p, scenario, "decode_tok_s")["value"] == pytest.approx(11 / 13.5 * 1000)
        assert row(p, scenario, "request_latency_s")["value"] == pytest.approx((450 + 28 * 13.5) / 1000)
        assert row(p, scenario, "request_rate_per_s")["value"] == pytest.approx(11 / 0.828)
        assert row(p, scenario, "concurrency")["value"] == 11
    assert {r["source"] for r in p.rows} <= set(SOURCES)


def test_memory_binds_before_the_targets() -> None:
    # 628,708 B: 324,964 B for requests; contiguous 324,964 // 36,096 = 9; fp8 324,964 // 19,712 = 16 -> targets (11)
    p = plan(gpu_mem_bytes=628_708)
    b = row(p, "contiguous bfloat16 KV", "max_batch_slo")
    assert (b["value"], b["note"]) == (9, "limited by memory (max_batch_memory 9)")
    assert row(p, "contiguous bfloat16 KV", "tpot_ms")["value"] == pytest.approx(12.5)  # 12 + 1 * 0.5
    assert row(p, "contiguous bfloat16 KV", "ttft_ms")["value"] == pytest.approx(370.0)
    assert row(p, "paged bfloat16 KV", "max_batch_memory")["value"] == 9  # floor(9,098,992 / 961,536)
    assert row(p, "contiguous fp8 KV", "max_batch_memory")["value"] == 16
    assert row(p, "contiguous fp8 KV", "max_batch_slo")["value"] == 11


def test_measured_point_and_no_extrapolation() -> None:
    p = plan(tpot=12.0, ttft=330.0)  # met exactly at the swept batch 8
    assert (row(p, "contiguous bfloat16 KV", "max_batch_slo")["value"],
            row(p, "contiguous bfloat16 KV", "max_batch_slo")["source"]) == (8, MEASURED)
    p = plan(gpu_mem_bytes=10**9, tpot=100.0, ttft=5000.0)  # met everywhere swept, memory for far more
    b = row(p, "contiguous bfloat16 KV", "max_batch_slo")
    assert b["value"] == 32 and b["source"] == MEASURED
    assert "larger batches are not measured (not extrapolated)" in b["note"]


def test_targets_missed_at_batch_one_is_a_result() -> None:
    p = plan(tpot=5.0)
    b = row(p, "contiguous bfloat16 KV", "max_batch_slo")
    assert b["value"] == 0
    assert b["note"] == "targets not met even at the smallest swept batch (at batch 1: TPOT 10.000 ms > 5 ms)"
    assert [r["quantity"] for r in p.rows if r["scenario"] == "contiguous bfloat16 KV"] == [
        "kv_bytes_per_request", "max_batch_memory", "max_batch_slo"]


def _cli(tmp_path: Path, df: pd.DataFrame, *extra: str) -> int:
    path = tmp_path / "batch.csv"
    df.to_csv(path, index=False)
    return main(["capacity", "--sweep", str(path), "--gpu-mem-gb", str(1_000_000 / 2**30), "--tpot-slo-ms", "14",
                 "--ttft-slo-ms", "450", "--prompt", "100", "--output", "28", "--reserve-gb", "0", *extra])


def test_cli_json_and_csv_carry_every_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cap.csv"
    assert _cli(tmp_path, batch_sweep(), "--json", "--out", str(out)) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = pd.DataFrame(payload["rows"])
    assert set(rows["source"]) == {COMPUTED, INTERPOLATED}
    got = rows.set_index(["scenario", "quantity"])["value"]
    assert got[("contiguous bfloat16 KV", "max_batch_memory")] == 19
    assert got[("paged bfloat16 KV", "max_batch_slo")] == 11
    on_disk = pd.read_csv(out)
    assert list(on_disk.columns) == ["scenario", "quantity", "value", "unit", "source", "note"]
    assert len(on_disk) == len(rows) and (on_disk["source"] == rows["source"]).all()
    assert payload["warnings"] == []


def test_cli_warns_when_the_prompt_differs_from_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(tmp_path, batch_sweep(seq_len=64, kv_predicted_bytes=256 * np.array(BATCHES) * (64 + 28))) == 0
    assert "latencies were measured at a prompt of 64 tokens, not at --prompt 100" in capsys.readouterr().out


@pytest.mark.parametrize(("df", "extra", "message"), [
    (batch_sweep(seq_len=[100, 200, 100, 200, 100, 200]), (), "is not a batch sweep: it holds prompt lengths 100, 200"),
    (batch_sweep(batch=1).iloc[:1], (), "is not a batch sweep: it holds one batch size (1)"),
    (batch_sweep().drop(columns=["tpot_p50_ms", "decode_p50_ms_per_tok"]), (),
     "lacks column(s) tpot_p50_ms or decode_p50_ms_per_tok"),
    (batch_sweep(ttft_ms=["50", "inf", "1", "2", "3", "4"]), (),
     "batch.csv: column ttft_ms, line 3: 'inf' is not a finite number >= 0"),  # the reader's verdict
    (batch_sweep(tpot_p50_ms=[10, 11, -1, 12, 13, 14]), (), "batch.csv: column tpot_p50_ms, line 4: '-1' is not a "
                                                            "finite number >= 0"),
    (batch_sweep(tpot_p50_ms=[10, 11, 0, 12, 13, 14]), (),
     "column tpot_p50_ms holds 0 at batch 4; latencies must be finite and positive"),
    (batch_sweep(ttft_ms=["50", "slow", "1", "2", "3", "4"]), (), "batch.csv: column ttft_ms, line 3: 'slow' is not a "
                                                                 "number"),
    (batch_sweep(dtype=["bfloat16", "float16"] * 3), (),
     "batch.csv mixes sweeps: dtype=bfloat16 in line 2, dtype=float16 in line 3; a sweep file holds one sweep's rows"),
    (batch_sweep(model=["tiny"] * 5 + ["qwen2.5-0.5b"], model_source=["preset:tiny"] * 5 + ["preset:qwen2.5-0.5b"]),
     ("--model", "tiny"), "batch.csv mixes sweeps: model=tiny in line 2, model=qwen2.5-0.5b in line 7; a sweep file "
                          "holds one sweep's rows"),
    (batch_sweep(), ("--model", "qwen2.5-0.5b"), "does not match qwen2.5-0.5b's 12,288 KV bytes per token"),
    (batch_sweep(model_source="checkpoint:/nowhere/x", model="x"), (), "cannot be resolved here"),
    (batch_sweep(engine=["kvscope", "transformers"] * 3), (), "holds the rows of several engines"),
    (batch_sweep(), ("--output", "4000"), "exceeds tiny's maximum context of 2,048"),
    (batch_sweep(), ("--block-tokens", "0"), "--block-tokens must be >= 1, got 0"),
    (batch_sweep(), ("--gpu-mem-gb", "-1"), "--gpu-mem-gb must be positive, got -1 GiB (-1,073,741,824 bytes)"),
    (batch_sweep(), ("--reserve-gb", "-0.5"), "--reserve-gb must be >= 0, got -0.5 GiB (-536,870,912 bytes)"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], df: pd.DataFrame,
                                      extra: tuple[str, ...], message: str) -> None:
    assert _cli(tmp_path, df, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_capacity_runs_without_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "batch.csv"
    batch_sweep().to_csv(path, index=False)
    argv = ["capacity", "--sweep", str(path), "--gpu-mem-gb", "1", "--tpot-slo-ms", "14", "--ttft-slo-ms", "450",
            "--prompt", "100", "--output", "28", "--json"]
    code = f"import sys; sys.modules['torch'] = None\nfrom kvscope.cli import main\nraise SystemExit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["model"] == "tiny"
