"""Roofline counting in exact integers, and the calibration cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.roofline import decode_cost, layer_matmul_params, prefill_cost, roofline, weights_read_bytes
from kvscope.cli import main
from kvscope.model.config import PRESETS
from kvscope.profiler.calibrate import load_ceilings
from kvscope.schema import Ceilings


def test_weights_read_once_tied_and_untied() -> None:
    q = PRESETS["qwen2.5-3b"]  # tied: the output projection is the embedding matrix, read once
    assert weights_read_bytes(q, 1, 2) == (q.param_count() + q.dim) * 2
    ll = PRESETS["llama-3.1-8b"]  # untied: the embedding table is only looked up, B rows
    assert weights_read_bytes(ll, 4, 2) == (ll.param_count() - ll.vocab_size * ll.dim + 4 * ll.dim) * 2


def test_decode_cost_qwen25_3b() -> None:
    a = PRESETS["qwen2.5-3b"]
    assert layer_matmul_params(a) == 2048 * (2048 + 2 * 256) + 2048 * 2048 + 3 * 2048 * 11008
    moved, flops = decode_cost(a, batch=1, context=513, w_bytes=2, kv_bytes=2)
    assert moved == weights_read_bytes(a, 1, 2) + 513 * 36_864 + 36_864
    assert flops == 2 * (36 * layer_matmul_params(a) + 2048 * 151936) + 36 * 4 * 16 * 128 * 513


def test_prefill_counts_causal_pairs() -> None:
    a = PRESETS["tiny"]
    moved, flops = prefill_cost(a, batch=2, seq=10, w_bytes=4, kv_bytes=4)
    assert flops == (2 * 20 * a.n_layers * layer_matmul_params(a) + 2 * 2 * a.dim * a.vocab_size
                     + a.n_layers * 4 * 2 * a.n_heads * a.head_dim * 55)
    assert moved == weights_read_bytes(a, 20, 4) + 20 * a.n_layers * 2 * a.n_kv_heads * a.head_dim * 4


MISTRAL_V01 = dataclasses.replace(PRESETS["mistral-7b"], name="mistral-7b-v0.1", sliding_window=4096)


@pytest.mark.parametrize(("context", "seen"), [(1, 1), (4095, 4095), (4096, 4096), (4097, 4096), (32_768, 4096)])
def test_decode_cost_reads_only_the_window(context: int, seen: int) -> None:
    """Mistral v0.1 (window 4,096): a step reads K/V of min(context, 4096) positions and does attention over them;
    without the window the same model reads all `context` positions."""
    a = MISTRAL_V01
    per_token = 32 * 2 * 8 * 128 * 2
    moved, flops = decode_cost(a, batch=3, context=context, w_bytes=2, kv_bytes=2)
    assert moved == weights_read_bytes(a, 3, 2) + 3 * seen * per_token + 3 * per_token
    assert flops == 2 * 3 * (32 * layer_matmul_params(a) + 4096 * 32768) + 32 * 4 * 3 * 32 * 128 * seen
    full = decode_cost(PRESETS["mistral-7b"], batch=3, context=context, w_bytes=2, kv_bytes=2)
    assert full == (moved + 3 * (context - seen) * per_token, flops + 32 * 4 * 3 * 32 * 128 * (context - seen))


@pytest.mark.parametrize(("seq", "pairs"), [(3, 6), (4, 10), (5, 10 + 4), (10, 10 + 6 * 4)])
def test_prefill_counts_the_windows_pairs(seq: int, pairs: int) -> None:
    """Window 4: query i sees min(i + 1, 4) keys: 1 + 2 + 3 + 4 + 4 + ... pairs per sequence and head."""
    a = dataclasses.replace(PRESETS["tiny"], sliding_window=4)
    _, flops = prefill_cost(a, batch=2, seq=seq, w_bytes=4, kv_bytes=4)
    assert flops == (2 * 2 * seq * a.n_layers * layer_matmul_params(a) + 2 * 2 * a.dim * a.vocab_size
                     + a.n_layers * 4 * 2 * a.n_heads * a.head_dim * pairs)
    assert prefill_cost(a, 2, seq, 4, 4)[0] == prefill_cost(PRESETS["tiny"], 2, seq, 4, 4)[0]  # every K/V written


def test_roofline_of_a_run_and_ceilings() -> None:
    t = pd.read_parquet(DATA / "nsys" / "qwen25-05b-run" / "timings.parquet")
    a = PRESETS["qwen2.5-0.5b"]
    r = roofline(t, a, 2, 2, None)
    assert len(r) == 2 * 4 and r["mbu"].isna().all()
    step = r[(r["phase"] == "decode") & (r["step"] == 2)].iloc[0]
    assert step["bytes"] == decode_cost(a, 1, 34, 2, 2)[0]
    ceil = Ceilings("H100", copy_gb_s=3000.0, bf16_tflop_s=800.0)
    r2 = roofline(t, a, 2, 2, ceil)
    assert np.allclose(r2["mbu"], r2["achieved_gb_s"] / 3000.0)
    assert np.allclose(r2["achieved_gb_s"], r2["bytes"] / (r2["dur_ms"] / 1e3) / 1e9)


def test_calibration_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "calibration.json"
    assert load_ceilings("NVIDIA H100 80GB HBM3", cache) is None
    cache.write_text(json.dumps({"NVIDIA H100 80GB HBM3": {"copy_gb_s": 2990.5, "bf16_tflop_s": 780.0}}))
    c = load_ceilings("NVIDIA H100 80GB HBM3", cache)
    assert c == Ceilings("NVIDIA H100 80GB HBM3", 2990.5, 780.0)
    assert load_ceilings("another GPU", cache) is None  # never calibrated
    assert main(["calibrate", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --device cuda" in err[0]


def test_calibration_cache_keeps_other_gpus_and_reads_back(tmp_path) -> None:
    from kvscope.profiler.calibrate import save

    path = tmp_path / "kvscope" / "calibration.json"
    save({"gpu": "GPU A", "copy_gb_s": 1000.0, "bf16_tflop_s": 100.0}, path)
    save({"gpu": "GPU B", "copy_gb_s": 2000.0, "bf16_tflop_s": 200.0}, path)
    save({"gpu": "GPU A", "copy_gb_s": 1500.0, "bf16_tflop_s": 150.0}, path)
    assert load_ceilings("GPU A", path) == Ceilings("GPU A", 1500.0, 150.0)
    assert load_ceilings("GPU B", path) == Ceilings("GPU B", 2000.0, 200.0)
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary file left


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unusable_calibration_cache_is_an_error_and_stays(tmp_path: Path, text: str) -> None:
    """A cache that exists but cannot be used is neither read as empty nor overwritten: one-line KvscopeError,
    the file untouched."""
    from kvscope.errors import KvscopeError
    from kvscope.profiler.calibrate import save

    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(KvscopeError, match=r"calibration cache .*calibration\.json") as e:
        load_ceilings("GPU A", path)
    assert "\n" not in str(e.value)
    with pytest.raises(KvscopeError, match="calibration cache"):
        save({"gpu": "GPU A", "copy_gb_s": 1.0, "bf16_tflop_s": 1.0}, path)
    assert path.read_text() == text


def test_calibration_entry_without_numbers_is_an_error_until_recalibrated(tmp_path: Path) -> None:
    from kvscope.errors import KvscopeError
    from kvscope.profiler.calibrate import save

    path = tmp_path / "calibration.json"
    path.write_text('{"GPU A": {"copy_gb_s": "fast"}, "GPU B": {"copy_gb_s": 2.0, "bf16_tflop_s": 3.0}}')
    with pytest.raises(KvscopeError, match="entry for 'GPU A' lacks numeric"):
        load_ceilings("GPU A", path)
    save({"gpu": "GPU A", "copy_gb_s": 1.0, "bf16_tflop_s": 1.0}, path)  # a new calibration replaces the entry
    assert load_ceilings("GPU A", path) == Ceilings("GPU A", 1.0, 1.0)
    assert load_ceilings("GPU B", path) == Ceilings("GPU B", 2.0, 3.0)
