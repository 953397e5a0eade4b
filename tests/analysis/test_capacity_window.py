"""`kvscope capacity` under a sliding window (Mistral's): the contiguous and paged scenarios keep every position, as
kvscope's cache does; a `window` scenario sizes a ring cache of the window's positions. Hand-computed on the `tiny`
preset with a window of 64 (bfloat16: 256 KV bytes per token, 3,328 bytes of decode workspace a request, 696,256
bytes for the requests), and through the command on a tiny Mistral config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import TINY_CONFIGS

from kvscope.analysis.capacity import COMPUTED, CapacityQuery, batch_curve, plan_capacity
from kvscope.cli import main
from kvscope.model.config import ModelArgs

TINY = ModelArgs.from_preset("tiny")
BATCHES = [1, 2, 4, 8, 16, 32]
TPOT_MS = [10.0, 10.5, 11.0, 12.0, 16.0, 24.0]
TTFT_MS = [50.0, 90.0, 170.0, 330.0, 650.0, 1290.0]
PROMPT, OUTPUT = 100, 28


def _sweep(per_token: int, weights: int, model: str, source: str) -> pd.DataFrame:
    b = np.array(BATCHES)
    return pd.DataFrame({"seq_len": PROMPT, "batch": b, "gen_tokens": OUTPUT, "tpot_p50_ms": TPOT_MS,
                         "decode_p50_ms_per_tok": TPOT_MS, "ttft_ms": TTFT_MS, "flag": "", "model": model,
                         "model_source": source, "dtype": "bfloat16", "weights_bytes": weights,
                         "kv_predicted_bytes": per_token * b * (PROMPT + OUTPUT)})


def _rows(args: ModelArgs) -> tuple[dict[tuple[str, str], float], list[str]]:
    curve = batch_curve(_sweep(256, 303_744, "tiny", "preset:tiny"), Path("b.csv"))
    q = CapacityQuery(gpu_mem_bytes=1_000_000, tpot_slo_ms=14.0, ttft_slo_ms=450.0, prompt=PROMPT, output=OUTPUT,
                      block_tokens=16, reserve_bytes=0)
    p = plan_capacity(curve, args, "bfloat16", 303_744, q)
    return {(r["scenario"], r["quantity"]): r["value"] for r in p.rows}, p.assumptions


def test_window_scenario_beside_the_unchanged_ones() -> None:
    windowed, assumptions = _rows(dataclasses.replace(TINY, sliding_window=64))
    plain, plain_assumptions = _rows(TINY)
    # contiguous and paged: every position kept, as without the window
    assert {k: v for k, v in windowed.items() if not k[0].startswith("window")} == plain
    # window: 64 of the 128 positions: 16,384 B + 3,328 B = 19,712 B a request; 696,256 // 19,712 = 35
    assert windowed[("window bfloat16 KV", "kv_bytes_per_request")] == 256 * 64
    assert windowed[("window bfloat16 KV", "max_batch_memory")] == 35
    assert windowed[("window fp8 KV", "kv_bytes_per_request")] == 128 * 64
    assert windowed[("window fp8 KV", "max_batch_memory")] == 696_256 // (8192 + 3328) == 60
    assert windowed[("window bfloat16 KV", "max_batch_slo")] == 11  # the targets bind, as for the others
    assert not any(k[0].startswith("window") for k in plain)
    (line,) = [a for a in assumptions if a.startswith("sliding window")]
    assert line == ("sliding window: tiny attends each token's last 64 positions; contiguous and paged keep every "
                    "position (as kvscope's cache does); window: a ring cache of the last 64 positions per request "
                    "(kvscope has none: its latencies are those measured with the sweep's own cache)")
    assert assumptions[:-1] == plain_assumptions


def test_a_window_longer_than_the_context_holds_the_context() -> None:
    rows, _ = _rows(dataclasses.replace(TINY, sliding_window=4096))
    assert rows[("window bfloat16 KV", "kv_bytes_per_request")] == rows[("contiguous bfloat16 KV",
                                                                          "kv_bytes_per_request")] == 256 * 128


def test_command_on_a_windowed_config_json(tmp_path: Path, capsys) -> None:
    """A tiny Mistral with window 8 (bfloat16: 2 layers x 2 x 2 KV heads x 8 dims x 2 B = 128 B a token), its sweep
    naming the config.json: the command's JSON carries the window rows, each `computed`."""
    cfg = tmp_path / "mistral-window.json"
    cfg.write_text(json.dumps(TINY_CONFIGS["mistral-window"]))
    args = ModelArgs.from_hf_config(TINY_CONFIGS["mistral-window"])
    path = tmp_path / "batch.csv"
    _sweep(128, args.param_count() * 2, "mistral-window", f"config:{cfg}").to_csv(path, index=False)
    assert main(["capacity", "--sweep", str(path), "--gpu-mem-gb", "1", "--tpot-slo-ms", "14", "--ttft-slo-ms",
                 "450", "--prompt", "100", "--output", "28", "--reserve-gb", "0", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["scenario"], r["quantity"]): r for r in payload["rows"]}
    assert rows[("window bfloat16 KV", "kv_bytes_per_request")]["value"] == 128 * 8
    assert rows[("contiguous bfloat16 KV", "kv_bytes_per_request")]["value"] == 128 * 128
    assert {r["source"] for k, r in rows.items() if k[0].startswith("window") and "memory" in k[1]} == {COMPUTED}
