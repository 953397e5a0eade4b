"""The KV cache (kvscope/model/kv_cache.py): one allocation with per-layer views, its size without allocating it
(the formula kv-math uses), and seeded random weights (kvscope/model/weights.py). The engine's use of the cache:
tests/engine/test_engine.py."""

from __future__ import annotations

import pytest
import torch

from kvscope.analysis.kv_math import KvQuery, kv_math
from kvscope.errors import KvscopeError
from kvscope.model.config import PRESETS, kv_bytes_per_token
from kvscope.model.dtypes import DTYPES
from kvscope.model.kv_cache import KVCache
from kvscope.model.weights import empty_model, init_random

CPU = torch.device("cpu")


def test_one_allocation_with_layer_views() -> None:
    a = PRESETS["tiny"]
    c = KVCache(a, batch=3, max_seq=40, dtype=torch.float16, device=CPU)
    assert tuple(c.data.shape) == (a.n_layers, 2, 3, 40, a.n_kv_heads, a.head_dim)
    assert c.nbytes == a.n_layers * 2 * 3 * a.n_kv_heads * 40 * a.head_dim * 2 == 30720
    assert c.nbytes == KVCache.bytes_for(a, 3, 40, torch.float16)
    for layer in range(a.n_layers):
        assert c.k(layer).data_ptr() == c.data[layer, 0].data_ptr()
        assert c.v(layer).untyped_storage().data_ptr() == c.data.untyped_storage().data_ptr()
        assert tuple(c.k(layer).shape) == (3, 40, a.n_kv_heads, a.head_dim)


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-3b", "llama-3.1-8b"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_cache_size_and_kv_math_agree(preset: str, dtype) -> None:
    """The engine's cache and kv-math's prediction come from one formula (kv_bytes_per_token), in every dtype."""
    a = PRESETS[preset]
    predicted = kv_math(KvQuery(a, batch=4, seq=96, dtype=dtype.name))
    assert predicted["kv_bytes_per_token"] == kv_bytes_per_token(a, dtype.nbytes)
    assert predicted["kv_bytes_total"] == KVCache.bytes_for(a, 4, 96, dtype.torch_dtype)
    if preset == "tiny":
        assert KVCache(a, 4, 96, dtype.torch_dtype, CPU).nbytes == predicted["kv_bytes_total"]


def test_bad_sizes() -> None:
    with pytest.raises(KvscopeError, match="batch > 0"):
        KVCache(PRESETS["tiny"], 0, 8, torch.float32, CPU)


def test_random_init_is_seeded_and_never_zero() -> None:
    m1, m2 = (empty_model(PRESETS["tiny"], CPU, torch.float32) for _ in range(2))
    init_random(m1, 5)
    init_random(m2, 5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2), n
        assert p1.abs().sum() > 0, n
    m3 = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(m3, 6)
    assert not torch.equal(m1.tok_embeddings.weight, m3.tok_embeddings.weight)
