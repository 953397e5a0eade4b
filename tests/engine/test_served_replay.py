"""The served engine's decode-bucket replay path on the CPU, its graph stood in for by the bucket's forward run eagerly
(tests/serve_drive.EagerReplay): a decode-only batch through a bucket larger than it (padding rows of slot -1 and
length 0, which must write and change nothing) gives the eager forward's tokens and K/V, with every row sampled and
with a single-token row that samples nothing (one prompt token of a chunked prefill), and fed tokens taken from the
previous iteration's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serve_drive import stand_in_graphs

from kvscope.engine.options import EngineOptions
from kvscope.engine.served import Feed, IterationBatch, ServeConfig, ServedEngine
from kvscope.model.paged_kv_cache import PagedKVCache
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

CPU = torch.device("cpu")
EAGER = EngineOptions(graphs=False, kernels=False)
BLOCK, N_BLOCKS, MAX_SEQ, MAX_SEQS = 8, 16, 32, 8


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = load_model(resolve_model("tiny"), CPU, torch.float32, seed=0)
    return m


def engine(model: torch.nn.Module, replayed: bool) -> ServedEngine:
    cache = PagedKVCache(model.args, N_BLOCKS, BLOCK, torch.float32, CPU)
    eng = ServedEngine(model, cache, ServeConfig(MAX_SEQ, MAX_SEQS, torch.float32, CPU), options=EAGER)
    if replayed:
        stand_in_graphs(eng)
    return eng


def batch(tokens: list[int], positions: list[int], sample_rows: list[int]) -> IterationBatch:
    """Single-token rows of sequences 0, 1, 2, ... each in its own block (block i + 1; block 0 is the scratch)."""
    n = len(tokens)
    tables = np.zeros((n, -(-MAX_SEQ // BLOCK)), dtype=np.int32)
    tables[:, 0] = np.arange(1, n + 1)
    slots = [(i + 1) * BLOCK + p for i, p in enumerate(positions)]
    return IterationBatch(np.asarray(tokens, np.int64), np.asarray(positions, np.int64), np.asarray(slots, np.int64),
                          n, tables, [], np.asarray(sample_rows, np.int64))


@pytest.mark.parametrize("sample_rows", [[0, 1, 2], [0, 2], [1]], ids=["every-row", "rows-0-2", "row-1"])
def test_replay_equals_eager(model: torch.nn.Module, sample_rows: list[int]) -> None:
    eager, replayed = engine(model, False), engine(model, True)
    first = batch([5, 17, 301], [0, 0, 0], [0, 1, 2])
    second = batch([0, 0, 0], [1, 1, 1], sample_rows)
    outs = []
    for eng in (eager, replayed):
        prev = eng.forward(first, 0)  # (3,) tokens of positions 0
        assert eng.last_bucket == (0 if eng is eager else 4)  # 3 rows replay the bucket of 4: one padding row
        # the second iteration's tokens fed from the first's output, in another order (rows 0, 1, 2 <- 2, 0, 1)
        feed = Feed(np.arange(3, dtype=np.int64), np.asarray([2, 0, 1], np.int64), prev)
        outs.append((prev.clone(), eng.forward(second, 1, feed).clone()))
    assert outs[1][0].tolist() == outs[0][0].tolist()
    assert outs[1][1].tolist() == outs[0][1].tolist() and outs[1][1].shape == (len(sample_rows),)
    torch.testing.assert_close(replayed.cache.data, eager.cache.data, rtol=0, atol=0)
    assert replayed.cache.data[:, :, 0].abs().sum() == 0  # the padding row wrote nothing into the scratch block


def test_graph_pool_bytes_counts_the_pools_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph pool's bytes are its own segments on the device (another pool's, the default pool's and another
    device's left out); None where the snapshot names no pools."""
    from kvscope.engine import served

    segments = [{"device": 0, "total_size": 2 << 20, "segment_pool_id": (0, 3)},
                {"device": 0, "total_size": 20 << 20, "segment_pool_id": (0, 3)},
                {"device": 0, "total_size": 64 << 20, "segment_pool_id": (0, 0)},
                {"device": 0, "total_size": 8 << 20, "segment_pool_id": (0, 4)},
                {"device": 1, "total_size": 2 << 20, "segment_pool_id": (0, 3)}]
    monkeypatch.setattr(served.torch.cuda, "memory_snapshot", lambda: segments)
    dev = torch.device("cuda", 0)
    assert served.graph_pool_bytes((0, 3), dev) == 22 << 20
    assert served.graph_pool_bytes(None, dev) == 0
    monkeypatch.setattr(served.torch.cuda, "memory_snapshot", lambda: [{"device": 0, "total_size": 1}])
    assert served.graph_pool_bytes((0, 3), dev) is None
