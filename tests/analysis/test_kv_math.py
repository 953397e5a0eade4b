"""KV-cache maths in exact integers."""

from __future__ import annotations

import dataclasses
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


MISTRAL_V01 = dataclasses.replace(PRESETS["mistral-7b"], name="mistral-7b-v0.1", sliding_window=4096)
PER_TOKEN_MISTRAL = 32 * 2 * 8 * 128 * 2  # 131,072


@pytest.mark.parametrize(("seq", "seen"), [(1000, 1000), (4096, 4096), (8192, 4096), (32_768, 4096)])
def test_window_bounds_reads_not_the_contiguous_cache(seq: int, seen: int) -> None:
    """Mistral v0.1: the contiguous cache (kvscope's) keeps every position, so the per-request and total bytes and
    the capacity count `seq`; a decode step reads only min(seq, 4096) positions, and a ring cache would hold those."""
    r = kv_math(KvQuery(MISTRAL_V01, batch=4, seq=seq, dtype="bf16", gpu_mem_bytes=80 * GIB_BYTES))
    assert r["kv_bytes_per_request"] == PER_TOKEN_MISTRAL * seq
    assert r["kv_bytes_total"] == PER_TOKEN_MISTRAL * seq * 4
    assert r["sliding_window"] == 4096 and r["attended_positions"] == seen
    assert r["kv_bytes_read_per_step"] == PER_TOKEN_MISTRAL * seen * 4
    assert r["kv_bytes_per_request_ring"] == PER_TOKEN_MISTRAL * seen
    no_window = kv_math(KvQuery(PRESETS["mistral-7b"], batch=4, seq=seq, dtype="bf16", gpu_mem_bytes=80 * GIB_BYTES))
    assert {k: v for k, v in r.items() if k not in {"model", "sliding_window", "attended_positions",
                                                    "kv_bytes_read_per_step", "kv_bytes_per_request_ring"}} == \
        {k: v for k, v in no_window.items() if k != "model"}  # the capacity as the engine allocates: all positions
    assert "sliding_window" not in no_window and "kv_bytes_read_per_step" not in no_window


def test_window_from_config_json_through_the_command_and_the_api(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A Mistral v0.1 config.json (sliding_window 4096; absent means 4096 too, transformers' default; null: none)."""
    import kvscope

    base = {k: v for k, v in TINY_CONFIGS["mistral"].items() if k != "sliding_window"}
    for name, extra, window in (("v01", {"sliding_window": 16}, 16), ("absent", {}, 4096),
                                ("v03", {"sliding_window": None}, None)):
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({**base, **extra, "torch_dtype": "float32"}))
        assert main(["kv-math", "--model", str(cfg), "--seq", "100", "--batch-size", "3", "--json"]) == 0
        r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert r == kvscope.kv_math(str(cfg), batch_size=3, seq=100)
        assert r["kv_bytes_total"] == 256 * 100 * 3  # all positions, as kvscope's cache holds them
        assert r.get("sliding_window") == window
        seen = min(100, window) if window else None
        assert r.get("kv_bytes_read_per_step") == (256 * seen * 3 if seen else None)
        assert r.get("kv_bytes_per_request_ring") == (256 * seen if seen else None)


def test_the_engines_cache_is_what_kv_math_says_under_a_window() -> None:
    """The contiguous cache the engine allocates for a windowed model: kv_math's `kv_bytes_total`, every position."""
    import torch

    from kvscope.engine.loop import Engine
    from kvscope.engine.plan import RunConfig
    from kvscope.model.config import ModelArgs
    from kvscope.model.weights import empty_model

    args = ModelArgs.from_hf_config(TINY_CONFIGS["mistral-window"], name="w")
    engine = Engine(empty_model(args, "cpu", torch.float32), RunConfig(2, 40, torch.float32, torch.device("cpu")))
    r = kv_math(KvQuery(args, batch=2, seq=40, dtype="float32"))
    assert engine.kv_alloc_bytes == engine.cache.nbytes == r["kv_bytes_total"] == 2 * 40 * 256
    assert r["kv_bytes_read_per_step"] == 2 * 8 * 256
