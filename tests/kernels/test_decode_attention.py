"""CPU side of kvscope's decode-attention kernel: the split and head-chunk choice on the host, the checks at the
kernel boundary (they run before the CUDA check), the torch reference against hand-computed answers and against the
engine's own masked path, and the `--attn kvscope` switch's one-line refusal without CUDA."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from kvscope.cli import main
from kvscope.engine.plan import RunConfig, RunSpec, default_attn, prepare
from kvscope.errors import KvscopeError
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.model.attention import ATTN_IMPLS, DecodeMeta, decode_attention, prefill_attention
from kvscope.model.config import PRESETS
from kvscope.schema import HF_EAGER_ENGINE, KVSCOPE_ENGINE

CPU = torch.device("cpu")
H200_SMS = 132


@pytest.mark.parametrize(("group", "expect"), [(1, (1, 1)), (2, (2, 1)), (3, (4, 1)), (4, (4, 1)), (5, (8, 1)),
                                               (7, (8, 1)), (8, (8, 1)), (12, (8, 2)), (16, (8, 2)), (17, (8, 3))])
def test_group_chunk(group: int, expect: tuple[int, int]) -> None:
    assert k_decode_attention.decode_group_chunk(group) == expect
    # the mma's 16 rows
    assert k_decode_attention.decode_group_chunk(group, tensor_cores=True) == (16, 1 if group <= 16 else 2)


@pytest.mark.parametrize(("blocks", "s_max", "expect"), [
    (2, 32_768 + 64, 132),  # batch 1, 2 KV heads, 32k: 264 blocks, two per SM
    (32, 4096 + 64, 9),  # batch 16 at 4k: ceil(264 / 32)
    (2, 512 + 32, 4),  # batch 1 at 512: splits of at least 128 positions (544 // 128)
    (2, 31, 1),  # shorter than one split
    (128, 544, 3),  # batch 64 at 512
    (264, 100_000, 1),  # enough blocks without splitting
    (1, 10**6, 264),
])
def test_split_choice_on_an_h200(blocks: int, s_max: int, expect: int) -> None:
    assert k_decode_attention.decode_splits(blocks, s_max, H200_SMS) == expect


def test_split_choice_bounds() -> None:
    assert k_decode_attention.decode_splits(1, 10**7, 4096) == k_decode_attention.DECODE_ATTENTION_MAX_SPLITS
    for blocks in (1, 3, 7, 64, 1000):
        for s_max in (1, 33, 4096, 40_000):
            n = k_decode_attention.decode_splits(blocks, s_max, H200_SMS)
            assert 1 <= n <= max(1, s_max // k_decode_attention.DECODE_ATTENTION_MIN_SPLIT_TOKENS)
            # no more than needed
            assert n == 1 or blocks * (n - 1) < H200_SMS * k_decode_attention.DECODE_ATTENTION_BLOCKS_PER_SM
    for bad in ((0, 10, 1), (1, 0, 1), (1, 10, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            k_decode_attention.decode_splits(*bad)
    with pytest.raises(ValueError, match="0 query heads"):
        k_decode_attention.decode_group_chunk(0)


@pytest.mark.parametrize(("blocks", "s_max", "expect"), [
    (2, 32_768 + 64, 64),  # batch 1, 2 KV heads, 32k: 32_832 // 512 (one wave would be 132)
    (2, 4096 + 64, 8),  # batch 1 at 4k
    (32, 4096 + 64, 8),  # batch 16 at 4k: 4160 // 512 (ceil(264 / 32) = 9)
    (2, 512 + 64, 1),  # batch 1 at 512: one split, no merge
    (128, 544, 1),  # batch 64 at 512
    (1, 10**6, 264),  # one wave
])
def test_long_split_choice_on_an_h200(blocks: int, s_max: int, expect: int) -> None:
    assert k_decode_attention.decode_splits_long(blocks, s_max, H200_SMS) == expect
    assert (k_decode_attention.decode_splits_long(blocks, s_max, H200_SMS)
            <= k_decode_attention.decode_splits(blocks, s_max, H200_SMS))


def test_long_split_choice_bounds() -> None:
    assert k_decode_attention.decode_splits_long(1, 10**7, 4096) == k_decode_attention.DECODE_ATTENTION_MAX_SPLITS
    assert k_decode_attention.decode_splits_long(2, 32_832, H200_SMS, min_split_tokens=1024) == 32
    for blocks in (1, 3, 7, 64, 1000):
        for s_max in (1, 33, 4096, 40_000):
            n = k_decode_attention.decode_splits_long(blocks, s_max, H200_SMS)
            assert 1 <= n <= max(1, s_max // k_decode_attention.DECODE_ATTENTION_LONG_MIN_SPLIT_TOKENS)
            assert n == 1 or blocks * (n - 1) < (H200_SMS * k_decode_attention.DECODE_ATTENTION_BLOCKS_PER_SM
                                                 * k_decode_attention.DECODE_ATTENTION_LONG_WAVES)
    for bad in ((0, 10, 1), (1, 0, 1), (1, 10, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            k_decode_attention.decode_splits_long(*bad)
    with pytest.raises(ValueError, match="min_split_tokens 0 must be positive"):
        k_decode_attention.decode_splits_long(1, 10, 1, min_split_tokens=0)


def test_defaults_are_the_measured_choices() -> None:
    """What the H200 measured in the decode step (docs/benchmarks.md): the separate merge everywhere; the long split
    rule from 16 blocks or 16,384 positions, the first rule below (batch 1 at 512 and 4,096 positions)."""
    assert k_decode_attention.DECODE_ATTENTION_FUSED_MERGE is False
    assert k_decode_attention.DECODE_ATTENTION_LONG_SPLITS is None
    # qwen2.5-3b: 2 KV heads, one block of 16 query rows each
    assert k_decode_attention.prefers_long_splits(1 * 2, 512 + 40) is False
    assert k_decode_attention.prefers_long_splits(1 * 2, 4096 + 40) is False
    assert k_decode_attention.prefers_long_splits(1 * 2, 32000 + 40) is True
    assert k_decode_attention.prefers_long_splits(16 * 2, 4096 + 40) is True
    assert k_decode_attention.prefers_long_splits(64 * 2, 512 + 40) is True
    assert k_decode_attention.prefers_long_splits(8 * 2, 1024) is True
    assert k_decode_attention.prefers_long_splits(7 * 2, 16383) is False


def _inputs(b: int = 2, h: int = 8, hkv: int = 2, d: int = 64, s_max: int = 16, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b * h * d + s_max)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    k = torch.randn(b, s_max, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, s_max, hkv, d, generator=g).to(dtype)
    return q, k, v, torch.full((b,), s_max, dtype=torch.int64)


@pytest.mark.parametrize(("change", "match"), [
    (lambda q, k, v, n: (q[0], k, v, n), r"q must be \(B, H, D\).*got q \(8, 64\)"),
    (lambda q, k, v, n: (q, k, v[:, :8], n), r"caches.*k \(2, 16, 2, 64\) v \(2, 8, 2, 64\)"),
    (lambda q, k, v, n: (q[:1], k, v, n), r"q \(1, 8, 64\) does not fit caches \(2, 16, 2, 64\)"),
    (lambda q, k, v, n: (q[:, :7], k, v, n), r"q \(2, 7, 64\) does not fit.*multiple of H_kv"),
    (lambda q, k, v, n: (q, k[:, :0], v[:, :0], n), r"S_max >= 1"),
    (lambda q, k, v, n: (q[..., :32], k[..., :32], v[..., :32], n), r"head size 32 \(q \(2, 8, 32\)\) not built"),
    (lambda q, k, v, n: (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, n), r"must be contiguous"),
    (lambda q, k, v, n: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, n), r"unit stride on D"),
    (lambda q, k, v, n: (torch.randn(2, 8, 65)[..., 1:], k, v, n), r"16-byte aligned"),
    (lambda q, k, v, n: (q, k, v, n.int()), r"lengths must be int64 \(2,\).*torch.int32"),
    (lambda q, k, v, n: (q, k, v, n[:1]), r"lengths must be int64 \(2,\).*\(1,\)"),
    (lambda q, k, v, n: (q, k, v, torch.ones(2, dtype=torch.int64, device="meta")), r"lengths .* on meta"),
])
def test_boundary_checks_with_the_shapes(change, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        k_decode_attention.split_kv_decode(*change(*_inputs()))


def test_boundary_checks_of_the_options_and_the_device() -> None:
    q, k, v, n = _inputs()
    with pytest.raises(ValueError, match="softmax scale nan is not finite"):
        k_decode_attention.split_kv_decode(q, k, v, n, scale=math.nan)
    for splits in (0, k_decode_attention.DECODE_ATTENTION_MAX_SPLITS + 1):
        with pytest.raises(ValueError, match=f"splits {splits} outside"):
            k_decode_attention.split_kv_decode(q, k, v, n, splits=splits)
    with pytest.raises(ValueError, match=r"tensor-core kernel takes bfloat16/float16, got q torch\.float32"):
        k_decode_attention.split_kv_decode(q, k, v, n, tensor_cores=True)
    with pytest.raises(ValueError, match=r"out must be contiguous torch.float32 \(2, 8, 64\).*\(2, 8, 32\)"):
        k_decode_attention.split_kv_decode(q, k, v, n, out=torch.empty(2, 8, 32))
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):  # every shape fits: only the device is wrong
        k_decode_attention.split_kv_decode(q, k, v, n)


@pytest.mark.parametrize(("counters", "match"), [
    (torch.zeros(4, dtype=torch.int64), r"counters must be contiguous int32 with at least 4 elements on cpu \(2 "
                                        r"sequences x 2 head groups\), got torch.int64 \(4,\)"),
    (torch.zeros(3, dtype=torch.int32), r"at least 4 elements.*got torch.int32 \(3,\)"),
    (torch.zeros(8, dtype=torch.int32)[::2], r"at least 4 elements.*\(4,\)"),  # not contiguous
    (torch.zeros(4, dtype=torch.int32, device="meta"), r"on cpu .* on meta"),
])
def test_counters_checked_at_the_boundary(counters: torch.Tensor, match: str) -> None:
    """The fused merge's counters: int32, contiguous, on q's device, one per (sequence, head group); checked before
    the device (so here, on the CPU)."""
    q, k, v, n = _inputs()  # 2 sequences, 8 heads over 2 KV heads: CUDA-core kernel, one chunk of 4 heads each
    with pytest.raises(ValueError, match=match):
        k_decode_attention.split_kv_decode(q, k, v, n, fused_merge=True, counters=counters)
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # enough counters: only the device is wrong
        k_decode_attention.split_kv_decode(q, k, v, n, fused_merge=True, counters=torch.zeros(4, dtype=torch.int32))


def test_kept_counters_zeroed_once_per_device_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """One zeroed buffer per (device, size), returned again on later calls; another size gets its own."""
    monkeypatch.setattr(k_decode_attention, "_DECODE_COUNTERS", {})
    a = k_decode_attention._decode_counters(6, CPU, 0)
    assert a.dtype == torch.int32 and a.shape == (6,) and int(a.count_nonzero()) == 0
    assert k_decode_attention._decode_counters(6, CPU, 0) is a
    b = k_decode_attention._decode_counters(7, CPU, 0)
    assert b is not a and b.shape == (7,)
    assert set(k_decode_attention._DECODE_COUNTERS) == {(0, 6), (0, 7)}


def test_reference_against_a_hand_computed_softmax() -> None:
    """Ragged lengths (0, 1, a middle one, past S_max: clamped), GQA grouping h -> h // G, float64 by hand."""
    q, k, v, _ = _inputs(b=4, h=6, hkv=2, d=64, s_max=9)
    lengths = torch.tensor([0, 1, 5, 12])
    got = k_decode_attention.split_kv_decode_ref(q, k, v, lengths, scale=0.3)
    assert got.shape == (4, 6, 64) and got.dtype == torch.float32
    for b in range(4):
        n = min(int(lengths[b]), 9)
        for h in range(6):
            if n == 0:
                assert torch.equal(got[b, h], torch.zeros(64))
                continue
            kk, vv = k[b, :n, h // 3].double(), v[b, :n, h // 3].double()  # (n, D)
            w = torch.softmax(kk @ q[b, h].double() * 0.3, dim=0)  # (n,)
            torch.testing.assert_close(got[b, h].double(), w @ vv, atol=1e-6, rtol=1e-6)


def test_reference_groups_by_kv_head_exactly() -> None:
    """V constant per (sequence, KV head): every query head of that group gets exactly that constant."""
    q, k, _, _ = _inputs(b=3, h=8, hkv=2, d=64, s_max=20)
    consts = torch.tensor([[0.5, -2.0], [1.25, 3.0], [-0.75, 0.25]])  # (B, H_kv)
    v = consts.view(3, 1, 2, 1).expand(3, 20, 2, 64).contiguous()  # (B, S, H_kv, D)
    got = k_decode_attention.split_kv_decode_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.tensor([3, 20, 7]))
    want = consts.repeat_interleave(4, dim=1).view(3, 8, 1).expand(3, 8, 64).bfloat16()
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_reference_matches_the_engines_masked_path(impl: str) -> None:
    """The same semantics as the engine's decode attention: the key mask `pos <= position of the new token`, i.e.
    lengths = positions + 1."""
    q, k, v, _ = _inputs(b=3, h=8, hkv=2, d=64, s_max=24)
    pos = torch.tensor([0, 9, 23])
    mask = (torch.arange(24).view(1, 24) <= pos.view(3, 1)).view(3, 1, 1, 24)
    theirs = decode_attention(q, k, v, DecodeMeta(span=24, key_mask=mask), impl)
    torch.testing.assert_close(k_decode_attention.split_kv_decode_ref(q, k, v, pos + 1), theirs, atol=1e-5, rtol=1e-5)


def test_attn_switch_kvscope_prefill_is_sdpa_and_decode_is_refused_here() -> None:
    assert "kvscope" in ATTN_IMPLS
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 6, 64, generator=g) for n in (4, 2, 2))
    torch.testing.assert_close(prefill_attention(q, k, v, "kvscope"), prefill_attention(q, k, v, "sdpa"))
    qd, kc, vc, _ = _inputs()
    with pytest.raises(ValueError, match=r"kvscope switch runs kvscope\.kernels\.decode_attention\.split_kv_decode "):
        decode_attention(qd, kc, vc, DecodeMeta(span=16), "kvscope")


def test_attn_kvscope_needs_cuda_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RunConfig(1, 64, torch.float32, CPU, "kvscope")
    with pytest.raises(KvscopeError, match=r"--attn kvscope needs a CUDA device.*got cpu float32 head_dim"):
        cfg.check(PRESETS["tiny"])
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--attn", "kvscope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attn kvscope needs a CUDA device" in err[0]
    assert not out.exists()


def test_supported_shapes() -> None:
    assert k_decode_attention.split_kv_decode_supported(torch.bfloat16, 128, 16, 2)
    assert k_decode_attention.split_kv_decode_supported(torch.float32, 64, 14, 2)
    assert not k_decode_attention.split_kv_decode_supported(torch.bfloat16, 96, 16, 2)
    assert not k_decode_attention.split_kv_decode_supported(torch.float64, 128, 16, 2)
    assert not k_decode_attention.split_kv_decode_supported(torch.bfloat16, 128, 15, 2)


def test_default_attention_is_kvscope_only_where_it_was_measured() -> None:
    cuda, bf16, args = torch.device("cuda"), torch.bfloat16, PRESETS["qwen2.5-3b"]
    assert default_attn(KVSCOPE_ENGINE, cuda, bf16, True, args) == "kvscope"
    assert default_attn(KVSCOPE_ENGINE, cuda, torch.float16, True, PRESETS["qwen2.5-0.5b"]) == "kvscope"
    assert default_attn(KVSCOPE_ENGINE, cuda, torch.float32, True, args) == "sdpa"  # not benchmarked in float32
    assert default_attn(KVSCOPE_ENGINE, cuda, bf16, False, args) == "sdpa"  # --kernels off: torch operations only
    assert default_attn(KVSCOPE_ENGINE, CPU, bf16, True, args) == "sdpa"
    assert default_attn(HF_EAGER_ENGINE, cuda, bf16, True, args) == "sdpa"
    odd = dataclasses.replace(args, head_dim=96)
    assert default_attn(KVSCOPE_ENGINE, cuda, bf16, True, odd) == "sdpa"


def test_the_plan_names_the_attention_that_runs() -> None:
    plan = prepare(RunSpec(model="tiny", device="cpu"))
    assert plan.spec.attn == plan.cfg.attn == "sdpa"
    assert prepare(RunSpec(model="tiny", device="cpu", attn="eager")).cfg.attn == "eager"
    with pytest.raises(KvscopeError, match="--attn kvscope is a decode kernel of kvscope's own loop; --engine "
                                           "transformers takes sdpa or eager"):
        prepare(RunSpec(model="tiny", device="cpu", attn="kvscope", engine=HF_EAGER_ENGINE))


# ---- the sliding window (Mistral's `sliding_window`): positions max(0, L - W) .. L - 1 -------------------------------
@pytest.mark.parametrize("window", [1, 3, 8])
def test_reference_with_a_window_against_a_hand_computed_softmax(window: int) -> None:
    """Ragged lengths (0, 1, shorter than the window, longer, past S_max: clamped first), GQA h -> h // G: each
    sequence attends exactly its last `window` positions, float64 by hand."""
    q, k, v, _ = _inputs(b=5, h=6, hkv=2, d=64, s_max=12)
    lengths = torch.tensor([0, 1, 2, 11, 20])
    got = k_decode_attention.split_kv_decode_ref(q, k, v, lengths, scale=0.3, window=window)
    for b in range(5):
        n = min(int(lengths[b]), 12)
        first = max(0, n - window)
        for h in range(6):
            if n == 0:
                assert torch.equal(got[b, h], torch.zeros(64))
                continue
            kk, vv = k[b, first:n, h // 3].double(), v[b, first:n, h // 3].double()  # (min(n, W), D)
            w = torch.softmax(kk @ q[b, h].double() * 0.3, dim=0)
            torch.testing.assert_close(got[b, h].double(), w @ vv, atol=1e-6, rtol=1e-6)


def test_reference_window_none_or_covering_the_cache_is_no_window() -> None:
    q, k, v, _ = _inputs(b=3, h=8, hkv=2, d=64, s_max=10)
    lengths = torch.tensor([1, 6, 10])
    full = k_decode_attention.split_kv_decode_ref(q, k, v, lengths)
    for window in (None, 10, 11, 2**31 - 1):
        assert torch.equal(k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window), full)
    # a shorter window changes the long sequences only
    short = k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=6)
    assert torch.equal(short[:2], full[:2]) and not torch.allclose(short[2], full[2])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_windowed_reference_matches_the_engines_masked_path(impl: str, window: int) -> None:
    """The engine's masked decode under a window: keys from the first position any sequence still sees, a mask
    `pos - W < key <= pos`; the reference at lengths = positions + 1 gives the same."""
    q, k, v, _ = _inputs(b=3, h=8, hkv=2, d=64, s_max=24)
    pos = torch.tensor([3, 9, 23])
    start = max(0, 3 + 1 - window)
    keys = torch.arange(start, 24).view(1, -1)
    mask = ((keys <= pos.view(3, 1)) & (keys > pos.view(3, 1) - window)).view(3, 1, 1, 24 - start)
    theirs = decode_attention(q, k, v, DecodeMeta(span=24, start=start, key_mask=mask), impl)
    ours = k_decode_attention.split_kv_decode_ref(q, k, v, pos + 1, window=window)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, -4, 2**31, True, 2.0, "8"])
def test_window_checked_at_the_boundary(window: object) -> None:
    """Before the device check (so here, on the CPU), in the kernel's call and in its reference alike."""
    q, k, v, n = _inputs()
    message = rf"window must be None or an int in \[1, 2147483647\], got {re.escape(repr(window))}"
    with pytest.raises(ValueError, match="split_kv_decode: " + message):
        k_decode_attention.split_kv_decode(q, k, v, n, window=window)
    with pytest.raises(ValueError, match="split_kv_decode_ref: " + message):
        k_decode_attention.split_kv_decode_ref(q, k, v, n, window=window)


@pytest.mark.parametrize(("s_max", "window", "splits_over"), [
    (32_768 + 64, 4096, 4096),  # Mistral v0.1's window in a 32k cache: the splits share the window's positions
    (32_768 + 64, None, 32_768 + 64),
    (4096 + 64, 8192, 4096 + 64),  # a window longer than the cache: the cache's
    (600, 100, 100),  # one split: none shorter than DECODE_ATTENTION_MIN_SPLIT_TOKENS
])
def test_launch_passes_the_window_and_splits_over_it(monkeypatch: pytest.MonkeyPatch, s_max: int,
                                                     window: int | None, splits_over: int) -> None:
    """The launch logic without a GPU (device check, SM count, launch stood in): the kernel gets the window as its
    `window` argument (0 for none), between the split count and the scale, and the default split count is the
    rule's at min(S_max, window) positions."""
    launches: list[tuple[str, tuple[int, int, int], list]] = []
    monkeypatch.setattr(k_decode_attention, "need_cuda", lambda *a: None)
    monkeypatch.setattr(k_decode_attention, "sm_count_of", lambda index: H200_SMS)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(k_decode_attention, "launch",
                        lambda entry, variant, dtype, device, grid, block, args, **kw: launches.append(
                            (variant, grid, args)))
    q, k, v, n = _inputs(b=1, h=8, hkv=2, d=64, s_max=s_max)
    k_decode_attention.split_kv_decode(q, k, v, n, window=window, long_splits=False)
    splits = k_decode_attention.decode_splits(2, splits_over, H200_SMS)
    variant, grid, args = launches[0]
    assert variant == "d64_g4" and grid == (splits, 2, 1)
    assert int(args[-3]) == splits and int(args[-2]) == (window or 0) and type(args[-2]).__name__ == "int32"
    assert [v for v, _, _ in launches] == ["d64_g4"] + (["merge"] if splits > 1 else [])
