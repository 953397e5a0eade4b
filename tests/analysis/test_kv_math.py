"""KV-cache maths in exact integers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_CONFIGS

from kvscope.analysis.kv_math import KvQuery, kv_math
from kvscope.cli import main
from kvscope.model.config import PRESETS
from kvscope.schema import GIB_BYTES

# (preset, bytes per token in bf16): layers * 2 (K and V) * kv_heads * head_dim * 2 bytes
PER_TOKEN_BF16 = {
    "qwen2.5-0.5b": 24 * 2 * 2 * 64 * 2,  # 12,288
    "qwen2.5-3b": 36 * 2 * 2 * 128 * 2,  # 36,864
    "qwen2.5-7b": 28 * 2 * 4 * 128 * 2,  # 57,344
    "llama-3.2-1b": 16 * 2 * 8 * 64 * 2,  # 32,768
    "llama-3.1-8b": 32 * 2 * 8 * 128 * 2,  # 131,072
    "mistral-7b": 32 * 2 * 8 * 128 * 2,  # 131,072
}


@pytest.mark.parametrize(("preset", "per_token"), sorted(PER_TOKEN_BF16.items()))
def test_bytes_per_token_and_totals(preset: str, per_token: int) -> None:
    r = kv_math(KvQuery(PRESETS[preset], batch=8, seq=1024, dtype="bf16"))
    assert r["kv_bytes_per_token"] == per_token
    assert r["kv_bytes_per_request"] == per_token * 1024
    assert r["kv_bytes_total"] == per_token * 1024 * 8
    assert r["weights_bytes"] == PRESETS[preset].param_count() * 2
    assert r["logits_bytes_full"] == 8 * 1024 * PRESETS[preset].vocab_size * 2
    assert r["logits_bytes_last"] == 8 * PRESETS[preset].vocab_size * 2


def test_qwen25_3b_numbers() -> None:
    r = kv_math(KvQuery(PRESETS["qwen2.5-3b"], batch=8, seq=4096, dtype="bf16", kv_dtype="fp8",
                        gpu_mem_bytes=80 * GIB_BYTES, rps=10, latency_s=2.5, page_size=16))
    assert r["kv_bytes_per_token"] == 18_432
    assert r["kv_bytes_total"] == 18_432 * 4096 * 8 == 603_979_776
    assert r["weights_bytes"] == 6_171_877_376
    assert r["workspace_bytes"] == 8 * ((2 * 11008 + 2048 + 2 * 256 + 3 * 2048) * 2 + 151936 * 4)
    budget = 80 * GIB_BYTES - 6_171_877_376 - GIB_BYTES
    assert r["budget_bytes"] == budget
    per_seq_ws = (2 * 11008 + 2048 + 2 * 256 + 3 * 2048) * 2 + 151936 * 4
    assert r["max_batch"] == budget // (18_432 * 4096 + per_seq_ws)
    assert r["max_seq"] == 32768  # capped at the model's context
    assert r["concurrency"] == 25 and r["concurrency_kv_bytes"] == 25 * 18_432 * 4096
    assert r["pages_per_request"] == 256 and r["page_waste_bytes"] == 0
    assert r["page_waste_bytes_worst"] == 8 * 15 * 18_432


def test_max_seq_when_memory_binds_and_paging_waste() -> None:
    a = PRESETS["llama-3.1-8b"]
    r = kv_math(KvQuery(a, batch=64, seq=1000, dtype="bf16", gpu_mem_bytes=24 * GIB_BYTES, page_size=16))
    avail = 24 * GIB_BYTES - a.param_count() * 2 - GIB_BYTES - r["workspace_bytes"]
    assert r["max_seq"] == avail // (131_072 * 64) < a.max_position_embeddings
    assert r["pages_per_request"] == 63 and r["page_waste_bytes"] == 64 * 8 * 131_072
    assert kv_math(KvQuery(a, batch=1, seq=1000, dtype="bf16", gpu_mem_bytes=8 * GIB_BYTES))["max_batch"] == 0


def test_config_json_and_little_law_rounding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_CONFIGS["mistral"], "torch_dtype": "float32"}))
    assert main(["kv-math", "--model", str(cfg), "--seq", "100", "--batch-size", "3", "--rps", "0.5",
                 "--latency-s", "3.1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["dtype"] == "float32"
    assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4 == 256
    assert r["kv_bytes_total"] == 256 * 100 * 3
    assert r["concurrency"] == 2  # ceil(1.55)
    assert "max_batch" not in r  # no budget given


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--seq", "40000"], "exceeds qwen2.5-3b's maximum context"),
    (["--gpu-mem-gb", "-1"], "--gpu-mem-gb must be positive"),
    (["--rps", "3"], "--rps and --latency-s go together"),
    (["--page-size", "0"], "--page-size must be positive"),
    (["--kv-dtype", "int4"], "invalid choice"),
])
def test_kv_math_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-math", "--model", "qwen2.5-3b", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
