"""CPU side of the paged KV cache in kvscope's kernels: the torch references (`paged_split_kv_decode_ref`, and
`rope_kv_ref_` with slots) equal the token-major references over the same data, bit for bit, whatever the table's
order and whatever lies in the blocks and entries no position attends; the served block sizes; the checks at the
kernel boundary (they run before the CUDA check, so the CPU reaches them); the launch's arguments without a GPU.
The kernels against these references: tests/kernels/test_paged_kernels_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.model.config import PRESETS
from kvscope.model.layers import rope_tables

CPU = torch.device("cpu")
H200_SMS = 132


def paged_copy(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, block_size: int, window: int | None,
               g: torch.Generator, spare: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token-major caches k / v (B, S_max, H_kv, D), S_max a multiple of `block_size`, laid into pools
    (n_blocks, block_size, H_kv, D) through a shuffled int32 table (B, S_max / block_size). Only blocks holding an
    attended position get a place; every other entry is -1, and every pool row no position attends (past a length,
    before the window, the spare blocks) is NaN: a reference or kernel that reads one shows it."""
    b, s_max, hkv, d = k.shape
    max_blocks = s_max // block_size
    table = torch.full((b, max_blocks), -1, dtype=torch.int32)
    used = []
    for i, n in enumerate(lengths.clamp(0, s_max).tolist()):
        lo = max(0, n - window) if window else 0
        used += [(i, j) for j in range(max_blocks) if j * block_size < n and (j + 1) * block_size > lo]
    n_blocks = len(used) + spare
    places = torch.randperm(n_blocks, generator=g)[:len(used)]
    pools = [torch.full((n_blocks, block_size, hkv, d), float("nan"), dtype=k.dtype) for _ in range(2)]
    for (i, j), at in zip(used, places.tolist(), strict=True):
        table[i, j] = at
        n = int(lengths[i].clamp(0, s_max))
        lo = max(0, n - window) if window else 0
        for t in range(j * block_size, min((j + 1) * block_size, n)):
            if t >= lo:
                pools[0][at, t - j * block_size] = k[i, t]
                pools[1][at, t - j * block_size] = v[i, t]
    return pools[0], pools[1], table


def _case(b: int, s_max: int, hkv: int, group: int, d: int, dtype: torch.dtype, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, d, generator=g).to(dtype)  # (B, H, D)
    k = torch.randn(b, s_max, hkv, d, generator=g).to(dtype)  # (B, S_max, H_kv, D)
    v = torch.randn(b, s_max, hkv, d, generator=g).to(dtype)
    return q, k, v, g


def test_served_block_sizes() -> None:
    """Powers of two from 8 to 256 (16, vLLM's default, among them); anything else refused."""
    assert k_decode_attention.PAGED_BLOCK_SIZES == (8, 16, 32, 64, 128, 256)
    assert all(k_decode_attention.paged_block_size_ok(n) for n in (8, 16, 32, 64, 128, 256))
    assert not any(k_decode_attention.paged_block_size_ok(n) for n in (0, 1, 2, 4, 12, 24, 48, 100, 512, 1024))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16, 64])
@pytest.mark.parametrize(("hkv", "group", "window"), [(2, 8, None), (4, 1, None), (1, 6, None), (2, 4, 5),
                                                      (2, 8, 37), (2, 8, 1)])
def test_paged_reference_equals_the_contiguous_one(dtype: torch.dtype, block_size: int, hkv: int, group: int,
                                                   window: int | None) -> None:
    """Ragged lengths (0, 1, a block boundary and one past it, the full cache, past it and negative: clamped), a
    shuffled table, -1 entries and NaN rows wherever no position attends: the same output bit for bit."""
    s_max = 8 * block_size
    q, k, v, g = _case(8, s_max, hkv, group, 64, dtype, seed=block_size * group + (window or 0))
    lengths = torch.tensor([0, 1, block_size, block_size + 1, 3 * block_size - 1, s_max, s_max + 9, -4])
    k_pool, v_pool, table = paged_copy(k, v, lengths, block_size, window, g)
    got = k_decode_attention.paged_split_kv_decode_ref(q, k_pool, v_pool, table, lengths, window=window)
    want = k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window)
    assert not got.isnan().any()
    assert torch.equal(got, want)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[7], torch.zeros_like(got[7]))


def test_paged_reference_with_a_scale_and_one_block_per_sequence() -> None:
    """max_blocks 1 (the whole cache in one block) and a softmax scale of the caller's."""
    q, k, v, g = _case(3, 16, 2, 2, 128, torch.float32, seed=5)
    lengths = torch.tensor([16, 7, 1])
    k_pool, v_pool, table = paged_copy(k, v, lengths, 16, None, g, spare=0)
    assert table.shape == (3, 1)
    got = k_decode_attention.paged_split_kv_decode_ref(q, k_pool, v_pool, table, lengths, scale=0.3)
    assert torch.equal(got, k_decode_attention.split_kv_decode_ref(q, k, v, lengths, scale=0.3))


def test_rope_kv_reference_with_slots_equals_the_contiguous_one() -> None:
    """A decode step of 3 sequences at ragged positions as T = 3 tokens with slots into shuffled pools, plus two
    padding tokens (slot -1): qkv rotated the same, every written row the same as the token-major cache's, no row
    written for the padding, every other pool row untouched."""
    args = PRESETS["tiny"]
    h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
    cos, sin_rot = rope_tables(args, 64, CPU, torch.float32)  # (64, D)
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([5, 0, 47])
    qkv = torch.randn(3, 1, h + 2 * hkv, d, generator=g)  # (B, 1, H+2H_kv, D)
    k_cache, v_cache = torch.zeros(3, 64, hkv, d), torch.zeros(3, 64, hkv, d)  # (B, S_max, H_kv, D)
    want = qkv.clone()
    k_rope_kv.rope_kv_ref_(want, cos, sin_rot, k_cache, v_cache, h, positions)

    block_size, n_blocks = 16, 12
    table = torch.randperm(n_blocks, generator=g)[:3 * 4].view(3, 4)  # (B, 4 blocks of 16)
    slots = table[torch.arange(3), positions // block_size] * block_size + positions % block_size  # (B,)
    pad = torch.randn(2, 1, h + 2 * hkv, d, generator=g)
    tokens = torch.cat((qkv, pad))  # (T = 5, 1, H+2H_kv, D)
    lengths = torch.cat((positions, torch.tensor([0, 3])))  # (T,)
    slots = torch.cat((slots, torch.tensor([-1, -1])))
    k_pool = torch.full((n_blocks, block_size, hkv, d), 7.0)
    v_pool = torch.full((n_blocks, block_size, hkv, d), 7.0)
    k_rope_kv.rope_kv_ref_(tokens, cos, sin_rot, k_pool, v_pool, h, lengths, slots=slots)
    assert torch.equal(tokens[:3], want)
    rows_k, rows_v = k_pool.view(-1, hkv, d), v_pool.view(-1, hkv, d)  # (n_blocks * block_size, H_kv, D)
    for i in range(3):
        assert torch.equal(rows_k[slots[i]], k_cache[i, positions[i]])
        assert torch.equal(rows_v[slots[i]], v_cache[i, positions[i]])
    untouched = torch.ones(n_blocks * block_size, dtype=torch.bool)
    untouched[slots[:3]] = False
    assert (rows_k[untouched] == 7).all() and (rows_v[untouched] == 7).all()


def _paged_inputs(b: int = 2, block_size: int = 16, max_blocks: int = 4, n_blocks: int = 10
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(b, 8, 64)  # (B, H, D)
    k_pool, v_pool = torch.randn(n_blocks, block_size, 2, 64), torch.randn(n_blocks, block_size, 2, 64)
    table = torch.arange(b * max_blocks, dtype=torch.int32).view(b, max_blocks) % n_blocks
    return q, k_pool, v_pool, table, torch.full((b,), 20, dtype=torch.int64)


PAGED_BAD = [
    (lambda q, k, v, t, n: (q, k, v, t.long(), n), r"block_table must be contiguous int32 \(2, max_blocks >= 1\).*"
                                                   r"torch.int64 \(2, 4\)"),
    (lambda q, k, v, t, n: (q, k, v, t[:1], n), r"block_table must be.*got torch.int32 \(1, 4\)"),
    (lambda q, k, v, t, n: (q, k, v, t[:, :0], n), r"block_table must be.*\(2, 0\)"),
    (lambda q, k, v, t, n: (q, k, v, t.t().contiguous().t(), n), r"block_table must be.*strides \(1, 2\)"),
    (lambda q, k, v, t, n: (q, k, v, t.view(-1), n), r"block_table must be.*\(8,\)"),
    (lambda q, k, v, t, n: (q, k, v[:, :8], t, n), r"pools.*k \(10, 16, 2, 64\) v \(10, 8, 2, 64\)"),
    (lambda q, k, v, t, n: (q, k[..., :32], v[..., :32], t, n), r"q \(2, 8, 64\) does not fit pools \(10, 16, 2, 32\)"),
    (lambda q, k, v, t, n: (q[:, :7], k, v, t, n), r"q \(2, 7, 64\) does not fit pools.*multiple of H_kv"),
    (lambda q, k, v, t, n: (q, k[:0], v[:0], t, n), r"does not fit pools \(0, 16, 2, 64\).*n_blocks >= 1"),
    (lambda q, k, v, t, n: (q, k[:, :12], v[:, :12], t, n), r"block size 12 \(pools \(10, 12, 2, 64\)\) is not served"),
    (lambda q, k, v, t, n: (q, k[:, :4], v[:, :4], t, n), r"block size 4 .* is not served; one of \(8, 16"),
    (lambda q, k, v, t, n: (q, k.repeat(1, 32, 1, 1), v.repeat(1, 32, 1, 1), t, n), r"block size 512 .*not served"),
    (lambda q, k, v, t, n: (q[0], k, v, t, n), r"q must be \(B, H, D\) and the pools"),
    (lambda q, k, v, t, n: (q, k, v, t, n.int()), r"lengths must be int64 \(2,\)"),
    (lambda q, k, v, t, n: (q, k, v, t, n[:1]), r"lengths must be int64 \(2,\).*\(1,\)"),
]


@pytest.mark.parametrize(("change", "match"), PAGED_BAD)
def test_paged_boundary_checks_name_the_shapes(change, match: str) -> None:
    """The kernel call and the reference refuse the same inputs, each with a ValueError naming the shapes; the
    kernel call checks them before the CUDA check."""
    args = change(*_paged_inputs())
    with pytest.raises(ValueError, match=match):
        k_decode_attention.split_kv_decode(args[0], args[1], args[2], args[4], block_table=args[3])
    with pytest.raises(ValueError, match=match):
        k_decode_attention.paged_split_kv_decode_ref(*args)


def test_paged_checks_also_the_pools_layout_and_reach_the_cuda_check() -> None:
    """The kernel takes contiguous pools only; inputs that pass every check meet the CUDA check on the CPU."""
    q, k, v, t, n = _paged_inputs()
    with pytest.raises(ValueError, match=r"caches k \(10, 16, 2, 64\) strides .* must be contiguous"):
        k_decode_attention.split_kv_decode(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, n, block_table=t)
    with pytest.raises(ValueError, match=r"needs CUDA tensors"):
        k_decode_attention.split_kv_decode(q, k, v, n, block_table=t)
    q, k, v, _, n = _paged_inputs(b=1, block_size=256, n_blocks=2)
    too_long = torch.empty(1, 2**31 // 256, dtype=torch.int32)  # (1, 8,388,608): 2^31 positions, never read
    with pytest.raises(ValueError, match=r"\(1, 8388608\) x block size 256 = 2147483648 positions exceed 2147483647"):
        k_decode_attention.paged_split_kv_decode_ref(q, k, v, too_long, n)


def _launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, int, int], list]]:
    launches: list[tuple[str, tuple[int, int, int], list]] = []
    monkeypatch.setattr(k_decode_attention, "need_cuda", lambda *a: None)
    monkeypatch.setattr(k_decode_attention, "sm_count_of", lambda index: H200_SMS)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(k_decode_attention, "launch",
                        lambda entry, variant, dtype, device, grid, block, args, **kw: launches.append(
                            (variant, grid, args)))
    return launches


@pytest.mark.parametrize("block_size", [8, 16, 256])
def test_launch_passes_the_table_and_splits_over_its_positions(monkeypatch: pytest.MonkeyPatch,
                                                               block_size: int) -> None:
    """Without a GPU (launch stood in): the kernel gets the table's pointer, max_blocks and the block size after
    the lengths, S_max = max_blocks * block_size, and the default split count is the rule's at that S_max; without
    a table, a null pointer and zeros."""
    launches = _launches(monkeypatch)
    q, _, _, _, n = _paged_inputs()
    k_pool, v_pool = torch.randn(9, block_size, 2, 64), torch.randn(9, block_size, 2, 64)
    table = torch.zeros(2, 5, dtype=torch.int32)
    k_decode_attention.split_kv_decode(q, k_pool, v_pool, n, block_table=table, long_splits=False)
    s_max = 5 * block_size
    splits = k_decode_attention.decode_splits(2 * 2, s_max, H200_SMS)
    variant, grid, args = launches[0]
    assert variant == "d64_g4" and grid == (splits, 2, 2)
    assert int(args[8]) == table.data_ptr() and (int(args[9]), int(args[10])) == (5, block_size)
    assert int(args[-4]) == s_max and int(args[-3]) == splits
    launches.clear()
    k, v = torch.randn(2, s_max, 2, 64), torch.randn(2, s_max, 2, 64)
    k_decode_attention.split_kv_decode(q, k, v, n, long_splits=False)
    _, grid0, args0 = launches[0]
    assert grid0 == grid and (int(args0[8]), int(args0[9]), int(args0[10])) == (0, 0, 0) and int(args0[-4]) == s_max


ROPE_BAD = [
    (lambda x, c, s, k, v, n, sl: (x.expand(3, 2, 8, 8).contiguous(), c, s, k, v, n, sl),
     r"with slots, qkv must be contiguous \(T, 1, H\+2H_kv, D\), got \(3, 2, 8, 8\)"),
    (lambda x, c, s, k, v, n, sl: (x[:, :, :7], c, s, k, v, n, sl), r"qkv must be contiguous.*strides"),
    (lambda x, c, s, k, v, n, sl: (x, c, s, k[:, :, :1], v[:, :, :1], n, sl), r"pools k \(4, 16, 1, 8\) v"),
    (lambda x, c, s, k, v, n, sl: (x, c, s, k, v[:2], n, sl), r"pools k \(4, 16, 2, 8\) v \(2, 16, 2, 8\)"),
    (lambda x, c, s, k, v, n, sl: (x, c[:, :4], s[:, :4], k, v, n, sl), r"tables cos \(32, 4\)"),
    (lambda x, c, s, k, v, n, sl: (x, c, s, k, v, None, sl), r"lengths must be int64 \(3,\).*got None"),
    (lambda x, c, s, k, v, n, sl: (x, c, s, k, v, n[:2], sl), r"lengths must be int64 \(3,\).*\(2,\)"),
    (lambda x, c, s, k, v, n, sl: (x, c, s, k, v, n, sl.int()), r"slots must be int64 \(3,\).*torch.int32"),
]


@pytest.mark.parametrize(("change", "match"), ROPE_BAD)
def test_rope_kv_slots_boundary_checks_name_the_shapes(change, match: str) -> None:
    """qkv (T, 1, 4 + 2*2 heads, 8), pools (4, 16, 2, 8), tables (32, 8), lengths and slots (T,) int64: the kernel
    call (before its CUDA check) and the reference refuse the same inputs."""
    qkv = torch.randn(3, 1, 8, 8)
    cos, sin_rot = torch.ones(32, 8), torch.ones(32, 8)
    k_pool, v_pool = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    good = (qkv, cos, sin_rot, k_pool, v_pool, torch.tensor([1, 2, 3]), torch.tensor([0, 17, -1]))
    x, c, s, k, v, n, sl = change(*good)
    with pytest.raises(ValueError, match=match):
        k_rope_kv.rope_kv_(x, c, s, k, v, 4, n, slots=sl)
    with pytest.raises(ValueError, match=match):
        k_rope_kv.rope_kv_ref_(x, c, s, k, v, 4, n, slots=sl)
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # the good inputs reach the CUDA check
        k_rope_kv.rope_kv_(*good[:5], 4, good[5], slots=good[6])
