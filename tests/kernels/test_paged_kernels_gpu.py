"""kvscope's kernels over a paged KV cache against their torch references (marked `gpu`, skipped without CUDA).

Split-KV decode attention with a block table (`split_kv_decode(..., block_table=...)`) against `split_kv_decode_ref`
over the same positions laid token-major: every served block size, batch 1 to 64, lengths 0 to 8k (ragged, at and
past a block boundary), each sequence's blocks at shuffled places of the pools; bfloat16 / float16 / float32, the
tensor-core and the CUDA-core kernels, sliding windows, forced split counts (most splits empty), replays of a CUDA
graph with the lengths, the table and the pools changed between them. The pools hold NaN in every row no position
attends and the table -1 in every entry no position needs (past a length, before a window): a kernel that loads one
of those rows, or looks one of those entries up, shows it. Outputs and the splits' partial results are poisoned with
NaN before each launch; every test runs with the separate merge kernel and with the fused merge (whose counters must
be zero again after every launch).

RoPE with the K/V write into the pools (`rope_kv_(..., slots=...)`) against `rope_kv_ref_` with the same slots,
padding tokens (slot -1) included, eagerly and from a CUDA graph. The CPU side: tests/kernels/test_paged_kernels.py."""

from __future__ import annotations

import pytest
import torch

from kvscope.kernels import common as k_common
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.model.config import PRESETS
from kvscope.model.layers import rope_tables

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KERNELS = [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False), (torch.float16, False),
           (torch.float32, False)]  # (dtype, tensor cores): both kernels for 16-bit dtypes
BLOCK_SIZES = list(k_decode_attention.PAGED_BLOCK_SIZES)


@pytest.fixture(autouse=True, params=[False, True], ids=["merge-kernel", "fused-merge"])
def fused(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The default merge of every call in the test, and a fresh set of kept counters."""
    monkeypatch.setattr(k_decode_attention, "DECODE_ATTENTION_FUSED_MERGE", request.param)
    monkeypatch.setattr(k_decode_attention, "_DECODE_COUNTERS", {})
    return request.param


@pytest.fixture(autouse=True)
def _poisoned_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The splits' partial outputs and log-sum-exps start as NaN: a value the merge reads but no split wrote shows."""
    plain = k_decode_attention._decode_workspace

    def poisoned(b: int, h: int, splits: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_o, part_lse = plain(b, h, splits, d, device)
        return part_o.fill_(float("nan")), part_lse.fill_(float("nan"))

    monkeypatch.setattr(k_decode_attention, "_decode_workspace", poisoned)


def _counters_zero() -> None:
    for key, c in k_decode_attention._DECODE_COUNTERS.items():
        assert int(c.count_nonzero()) == 0, f"counters {key} left non-zero: {c.tolist()}"


def _case(b: int, s_max: int, hkv: int, group: int, d: int, dtype: torch.dtype, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, D), token-major k/v caches (B, S_max, H_kv, D) of fresh random values."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q = torch.randn(b, hkv * group, d, device=CUDA, generator=g).to(dtype)
    k = torch.randn(b, s_max, hkv, d, device=CUDA, generator=g).to(dtype)
    v = torch.randn(b, s_max, hkv, d, device=CUDA, generator=g).to(dtype)
    return q, k, v


def _attended(lengths: torch.Tensor, s_max: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first attended position, length) per sequence, lengths clamped to [0, S_max] as the kernel does: (B,) each."""
    n = lengths.clamp(0, s_max)
    return ((n - window).clamp(min=0) if window else torch.zeros_like(n)), n


def lay_out(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, block_size: int, window: int | None,
            seed: int, pools: tuple[torch.Tensor, torch.Tensor] | None = None, table: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attended positions of the token-major caches k / v (B, S_max, H_kv, D) laid into pools (n_blocks,
    block_size, H_kv, D): the blocks holding an attended position at shuffled places (a random permutation of all
    the pools' blocks), every other table entry -1, every other pool row NaN. Into `pools` and `table` when given
    (a CUDA graph's tensors: written in place), else new ones with five spare blocks. Returns (k_pool, v_pool,
    table (B, S_max / block_size) int32)."""
    b, s_max, hkv, d = k.shape
    max_blocks = s_max // block_size
    if pools is None or table is None:
        n_blocks = b * max_blocks + 5
        pools = tuple(torch.empty(n_blocks, block_size, hkv, d, dtype=k.dtype, device=CUDA) for _ in range(2))
        table = torch.empty(b, max_blocks, dtype=torch.int32, device=CUDA)
    lo, n = _attended(lengths, s_max, window)
    j = torch.arange(max_blocks, device=CUDA).view(1, max_blocks)
    used = (j * block_size < n.view(b, 1)) & ((j + 1) * block_size > lo.view(b, 1))  # (B, max_blocks)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    places = torch.randperm(pools[0].shape[0], device=CUDA, generator=g)[:int(used.sum())]
    table.fill_(-1)
    table[used] = places.to(torch.int32)
    pos = torch.arange(s_max, device=CUDA).view(1, s_max)
    attended = (pos < n.view(b, 1)) & (pos >= lo.view(b, 1))  # (B, S_max)
    rows = table.long().clamp(min=0).repeat_interleave(block_size, dim=1) * block_size + pos % block_size  # (B, S)
    for pool, cache in zip(pools, (k, v), strict=True):
        pool.fill_(float("nan"))
        pool.view(-1, hkv, d)[rows[attended]] = cache[attended]  # (n_blocks * block_size, H_kv, D)
    return pools[0], pools[1], table


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, block_size: int,
           window: int | None = None, splits: int | None = None, tensor_cores: bool | None = None,
           long_splits: bool | None = None, seed: int = 0) -> None:
    k_pool, v_pool, table = lay_out(k, v, lengths, block_size, window, seed)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)  # (B, H, D) poisoned
    got = k_decode_attention.split_kv_decode(q, k_pool, v_pool, lengths, splits=splits, out=out,
                                             tensor_cores=tensor_cores, long_splits=long_splits, window=window,
                                             block_table=table)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "an output element was not written, or a row no position attends was read"
    torch.testing.assert_close(got, k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window),
                               **k_decode_attention.DECODE_ATTENTION_TOLERANCE[q.dtype])
    _counters_zero()


@pytest.mark.parametrize(("dtype", "tensor_cores"), KERNELS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_paged_dtypes_kernels_head_sizes_and_block_sizes(dtype: torch.dtype, tensor_cores: bool, d: int,
                                                         block_size: int) -> None:
    """Three ragged sequences (1 position, one that is no multiple of any tile or block, the full cache), 4 query
    heads per KV head, default splits."""
    q, k, v = _case(3, 1024, 2, 4, d, dtype, seed=d + block_size)
    _check(q, k, v, torch.tensor([1, 517, 1024], device=CUDA), block_size, tensor_cores=tensor_cores,
           seed=block_size)


@pytest.mark.parametrize(("b", "s_max", "lengths"), [
    (1, 8192, [8192]),
    (1, 8192, [0]),
    (4, 4096, [0, 1, 16, 17]),  # block boundaries of 16
    (5, 4096, [15, 16, 4095, 4096, 9999]),  # the last one past S_max: clamped
    (16, 8192, "random"),
    (64, 4096, "random"),
    (64, 8192, "random"),
])
@pytest.mark.parametrize("block_size", [8, 16, 256])
def test_paged_batches_and_lengths_at_qwen25_3b_shapes(b: int, s_max: int, lengths: list[int] | str,
                                                       block_size: int) -> None:
    """16 query heads over 2 KV heads, d=128, bfloat16, both kernels; random lengths from 0 to S_max."""
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=b * s_max)
    if lengths == "random":
        n = torch.randint(0, s_max + 1, (b,), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(b))
        n[0] = 0
    else:
        n = torch.tensor(lengths, device=CUDA)
    for tc in (True, False):
        _check(q, k, v, n, block_size, tensor_cores=tc, seed=b + block_size)


@pytest.mark.parametrize(("dtype", "tensor_cores"), KERNELS)
@pytest.mark.parametrize("window", [1, 16, 100, 517])
@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_paged_windows(dtype: torch.dtype, tensor_cores: bool, window: int, block_size: int) -> None:
    """Sliding windows over the pools: ragged lengths shorter and longer than the window; the blocks wholly before
    a window have no table entry (-1) and NaN rows."""
    q, k, v = _case(4, 2048, 2, 4, 128, dtype, seed=window + block_size)
    n = torch.tensor([1, 517, 2048, 1000 + window], device=CUDA)
    _check(q, k, v, n, block_size, window=window, tensor_cores=tensor_cores, seed=window)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("splits", [1, 2, 7, 300, k_decode_attention.DECODE_ATTENTION_MAX_SPLITS])
def test_paged_forced_split_counts_including_empty_splits(splits: int, block_size: int, tensor_cores: bool) -> None:
    """Any split count gives the same result (splits rounded to whole tiles), also when most splits get none;
    with and without a window."""
    q, k, v = _case(3, 2048, 2, 8, 128, torch.float16, seed=splits)
    n = torch.tensor([3, 1999, 250], device=CUDA)
    for window in (None, 250):
        _check(q, k, v, n, block_size, window=window, splits=splits, tensor_cores=tensor_cores, seed=splits)


@pytest.mark.parametrize("long_splits", [False, True])
def test_paged_long_split_rule(long_splits: bool) -> None:
    """Both split rules at the benchmark's shapes (batch 16 at 4k, batch 64 at 512)."""
    for b, s_max in ((16, 4096 + 64), (64, 512 + 64), (1, 32_768)):
        q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=b)
        n = torch.randint(1, s_max + 1, (b,), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(b))
        for tc in (True, False):
            _check(q, k, v, n, 16, tensor_cores=tc, long_splits=long_splits, seed=b)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("window", [None, 1500])
def test_paged_graph_replays_with_tables_and_lengths_changed(tensor_cores: bool, window: int | None) -> None:
    """Captured once; between replays the device lengths (0 to S_max), the table (a new shuffle, other blocks
    unused) and the pools' contents change, and every replay matches the reference; output poisoned each time."""
    b, s_max, block_size = 4, 8192, 16
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=41)
    lengths = torch.tensor([1, 100, 8192, 4000], device=CUDA)
    k_pool, v_pool, table = lay_out(k, v, lengths, block_size, window, seed=1)
    out = torch.empty(b, 16, 128, dtype=torch.bfloat16, device=CUDA)

    def call() -> None:
        k_decode_attention.split_kv_decode(q, k_pool, v_pool, lengths, out=out, tensor_cores=tensor_cores,
                                           window=window, block_table=table)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compiles before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    g = torch.Generator(device=CUDA).manual_seed(42)
    for rep in range(5):
        lengths.copy_(torch.randint(0 if rep % 2 else 1, s_max + 1, (b,), device=CUDA, generator=g))
        k.copy_(torch.randn(k.shape, device=CUDA, generator=g))
        q.copy_(torch.randn(q.shape, device=CUDA, generator=g))
        lay_out(k, v, lengths, block_size, window, seed=rep + 2, pools=(k_pool, v_pool), table=table)
        out.fill_(float("nan"))
        graph.replay()
        assert not out.isnan().any()
        torch.testing.assert_close(out, k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window),
                                   **k_decode_attention.DECODE_ATTENTION_TOLERANCE[torch.bfloat16])
        _counters_zero()


def test_tiny_paged_grid_for_the_sanitizer() -> None:
    """A few small paged launches of every path (one split and several, padded and chunked groups, each dtype,
    block sizes 8 and 16, a window, length 0): run under compute-sanitizer's memcheck and racecheck."""
    for dtype, tensor_cores in KERNELS:
        q, k, v = _case(2, 80, 2, 8, 128, dtype, seed=1)
        for splits in (1, 3):
            _check(q, k, v, torch.tensor([80, 9], device=CUDA), 16, splits=splits, tensor_cores=tensor_cores)
        q, k, v = _case(2, 48, 2, 6, 64, dtype, seed=2)
        _check(q, k, v, torch.tensor([0, 33], device=CUDA), 8, splits=2, tensor_cores=tensor_cores, window=20)


# ---- RoPE + K/V write into the pools ---------------------------------------------------------------------------------
def _rope_case(t: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, 1, H + 2 H_kv, D), tables (256, D), positions (T,) and slots (T,) into pools of 16 blocks of 16: each
    token a distinct random row, every third token padding (-1)."""
    tab_rows = 256
    if d == PRESETS["qwen2.5-3b"].head_dim:
        cos, sin_rot = (x.to(dtype) for x in rope_tables(PRESETS["qwen2.5-3b"], tab_rows, CUDA, torch.float32))
    else:  # a head size of its own: tables of the right width with the rotate-half sign pattern
        ang = torch.arange(tab_rows, device=CUDA).view(-1, 1).float() * torch.linspace(0.1, 1.0, d // 2, device=CUDA)
        cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
        sin_rot = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    qkv = torch.randn(t, 1, heads + 2 * kv_heads, d, device=CUDA, generator=g).to(dtype)
    positions = torch.randint(0, tab_rows, (t,), device=CUDA, generator=g)
    slots = torch.randperm(16 * 16, device=CUDA, generator=g)[:t]
    slots[::3] = -1
    return qkv, cos, sin_rot, positions, slots


def _rope_compare(qkv: torch.Tensor, ref_qkv: torch.Tensor, pools: list[torch.Tensor], heads: int, kv_heads: int
                  ) -> None:
    tol = k_common.REF_TOLERANCE[qkv.dtype]
    torch.testing.assert_close(qkv, ref_qkv, **tol)
    torch.testing.assert_close(pools[0], pools[2], **tol, equal_nan=True)  # rows never written stay NaN in both
    assert torch.equal(pools[1].nan_to_num(7.0), pools[3].nan_to_num(7.0))  # values are copied, not computed
    assert torch.equal(qkv[:, :, heads + kv_heads:], ref_qkv[:, :, heads + kv_heads:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "heads", "kv_heads", "d"), [(5, 16, 2, 128), (64, 32, 8, 128), (7, 14, 2, 64),
                                                           (3, 4, 2, 6), (1, 16, 2, 128)])
def test_rope_kv_slots_matches_reference(dtype: torch.dtype, t: int, heads: int, kv_heads: int, d: int) -> None:
    """Tokens at random positions into random rows of NaN-filled pools, every third a padding token (slot -1, no
    row written); the 16-byte path and the scalar one (d=6)."""
    qkv, cos, sin_rot, positions, slots = _rope_case(t, heads, kv_heads, d, dtype, seed=t * d)
    pools = [torch.full((16, 16, kv_heads, d), float("nan"), dtype=dtype, device=CUDA) for _ in range(4)]
    ref_qkv = qkv.clone()
    k_rope_kv.rope_kv_(qkv, cos, sin_rot, pools[0], pools[1], heads, positions, slots=slots)
    k_rope_kv.rope_kv_ref_(ref_qkv, cos, sin_rot, pools[2], pools[3], heads, positions, slots=slots)
    _rope_compare(qkv, ref_qkv, pools, heads, kv_heads)
    written = pools[1].view(-1, kv_heads, d)[:, 0, 0].isnan().logical_not().nonzero().flatten()
    assert sorted(written.tolist()) == sorted(s for s in slots.tolist() if s >= 0)


def test_rope_kv_slots_in_a_cuda_graph_with_slots_changed_between_replays() -> None:
    """Captured once; the positions, the slots (padding moved) and qkv change between replays."""
    heads, kv_heads, d, t = 16, 2, 128, 8
    qkv, cos, sin_rot, positions, slots = _rope_case(t, heads, kv_heads, d, torch.bfloat16, seed=3)
    pools = [torch.full((16, 16, kv_heads, d), float("nan"), dtype=torch.bfloat16, device=CUDA) for _ in range(4)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        k_rope_kv.rope_kv_(qkv.clone(), cos, sin_rot, pools[0], pools[1], heads, positions, slots=slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_rope_kv.rope_kv_(qkv, cos, sin_rot, pools[0], pools[1], heads, positions, slots=slots)
    for rep in range(3):
        new_qkv, _, _, new_positions, new_slots = _rope_case(t, heads, kv_heads, d, torch.bfloat16, seed=10 + rep)
        new_slots[rep] = -1
        qkv.copy_(new_qkv)
        positions.copy_(new_positions)
        slots.copy_(new_slots)
        for p in pools:
            p.fill_(float("nan"))
        ref_qkv = qkv.clone()
        graph.replay()
        k_rope_kv.rope_kv_ref_(ref_qkv, cos, sin_rot, pools[2], pools[3], heads, positions, slots=slots)
        _rope_compare(qkv, ref_qkv, pools, heads, kv_heads)
