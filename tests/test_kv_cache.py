from __future__ import annotations

import pytest
import torch

from kvscope.engine.loop import Engine, pad_prompts
from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.model.config import PRESETS
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


def test_bad_sizes() -> None:
    with pytest.raises(KvscopeError, match="batch > 0"):
        KVCache(PRESETS["tiny"], 0, 8, torch.float32, CPU)


def test_overflow_is_a_clear_error_before_any_write() -> None:
    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=1)
    eng = Engine(model, RunConfig(2, 8, torch.float32, CPU))
    eng.prefill(*pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8]], 512, CPU))
    assert eng.cache.lengths.tolist() == [3, 5] == eng.cache.host_lengths
    for _ in range(3):
        eng.decode_step()
    assert eng.cache.lengths.tolist() == [6, 8]
    before = eng.cache.data.clone()
    with pytest.raises(KvscopeError, match="KV cache overflow: a sequence would reach 9 positions, cache holds 8"):
        eng.decode_step()
    assert torch.equal(before, eng.cache.data)


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


def test_decode_step_reuses_its_static_buffers() -> None:
    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=0)
    eng = Engine(model, RunConfig(1, 16, torch.float32, CPU))
    eng.prefill(*pad_prompts([[1, 2]], 512, CPU))
    ptr = eng.next_tokens.data_ptr()
    out = eng.decode_step()
    assert out.data_ptr() == ptr and eng.cache.lengths.data_ptr() == eng.cache.lengths.data_ptr()


def test_static_decode_path_gives_the_same_tokens() -> None:
    """The fixed-shape decode (full cache + mask, what a CUDA graph captures) equals the eager one."""
    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=3)
    prompts = [[5, 6, 7, 8, 9], [1, 2], [3, 3, 3, 3]]
    eager = Engine(model, RunConfig(3, 16, torch.float32, CPU)).generate(prompts, 8)
    eng = Engine(model, RunConfig(3, 16, torch.float32, CPU))
    eng.prefill(*pad_prompts(prompts, 512, CPU))
    out = [eng.next_tokens.clone()]
    with torch.inference_mode():
        for _ in range(7):
            eng._decode_forward(static=True)
            eng.cache.advance()
            out.append(eng.next_tokens.clone())
    assert torch.stack(out, dim=1).tolist() == eager


def test_prefill_with_broadcast_rope_tables_writes_the_same_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above PREFILL_ROPE_TABLE_MAX_BYTES the prefill keeps broadcast tables and writes K and V separately; the
    cache and the tokens are the same as with materialised tables (one K|V write)."""
    import kvscope.engine.loop as engine

    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=3)
    prompts = [[5, 9, 2, 7, 1], [4, 4, 8]]
    runs = []
    for limit in (engine.PREFILL_ROPE_TABLE_MAX_BYTES, 0):
        monkeypatch.setattr(engine, "PREFILL_ROPE_TABLE_MAX_BYTES", limit)
        eng = Engine(model, RunConfig(2, 12, torch.float32, CPU))
        tokens = eng.generate(prompts, 4)
        runs.append((tokens, eng.cache.data.clone()))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
