"""kvscope's split-KV decode attention against its torch reference (marked `gpu`, skipped without CUDA): batch 1 to
64, lengths 1 to 32k (lengths that are multiples of no tile, ragged lengths in one batch, 0 and past S_max), head
sizes 64 and 128, 1 to 12 query heads per KV head, bfloat16 / float16 / float32, outputs and the splits' partial
results NaN-poisoned before every launch; replayed from a CUDA graph with the lengths changed between replays; the
engine's `--attn kvscope` switch; a sliding window (each sequence its last W positions) over these. Every test runs
twice: with the separate merge kernel and with the merge fused into the main kernel (DECODE_ATTENTION_FUSED_MERGE,
which the engine's calls also take), whose arrival counters must be zero again after every launch and replay. The
host-side choices and boundary checks: tests/kernels/test_decode_attention.py."""

from __future__ import annotations

import pytest
import torch

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.model.config import ModelArgs
from kvscope.model.source import resolve_model
from kvscope.model.weights import empty_model, init_random, load_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True, params=[False, True], ids=["merge-kernel", "fused-merge"])
def fused(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The default merge of every call in the test (the engine's too), and a fresh set of kept counters."""
    monkeypatch.setattr(k_decode_attention, "DECODE_ATTENTION_FUSED_MERGE", request.param)
    monkeypatch.setattr(k_decode_attention, "_DECODE_COUNTERS", {})
    return request.param


def _counters_zero() -> None:
    """Every kept counter is back at zero (the kernel's contract; a named sync reads them)."""
    for key, c in k_decode_attention._DECODE_COUNTERS.items():
        assert int(c.count_nonzero()) == 0, f"counters {key} left non-zero: {c.tolist()}"


@pytest.fixture(autouse=True)
def _poisoned_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The splits' partial outputs and log-sum-exps start as NaN: a value the merge reads but no split wrote shows."""
    plain = k_decode_attention._decode_workspace

    def poisoned(b: int, h: int, splits: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_o, part_lse = plain(b, h, splits, d, device)
        return part_o.fill_(float("nan")), part_lse.fill_(float("nan"))

    monkeypatch.setattr(k_decode_attention, "_decode_workspace", poisoned)


def _case(b: int, s_max: int, hkv: int, group: int, d: int, dtype: torch.dtype, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, D), k/v caches (B, S_max, H_kv, D) of fresh random values."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q = torch.randn(b, hkv * group, d, device=CUDA, generator=g).to(dtype)
    k = torch.randn(b, s_max, hkv, d, device=CUDA, generator=g).to(dtype)
    v = torch.randn(b, s_max, hkv, d, device=CUDA, generator=g).to(dtype)
    return q, k, v


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, splits: int | None = None,
           tensor_cores: bool | None = None, window: int | None = None) -> None:
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)  # (B, H, D) poisoned
    got = k_decode_attention.split_kv_decode(q, k, v, lengths, splits=splits, out=out, tensor_cores=tensor_cores,
                                             window=window)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "an output element was not written (or a NaN partial was read)"
    torch.testing.assert_close(got, k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window),
                               **k_decode_attention.DECODE_ATTENTION_TOLERANCE[q.dtype])
    _counters_zero()


KERNELS = [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False), (torch.float16, False),
           (torch.float32, False)]  # (dtype, tensor cores): both kernels for 16-bit dtypes


@pytest.mark.parametrize(("dtype", "tensor_cores"), KERNELS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_dtypes_head_sizes_and_groups(dtype: torch.dtype, tensor_cores: bool, d: int, group: int) -> None:
    """Three ragged sequences (1 position, one that is no multiple of any tile, the full cache), default splits."""
    q, k, v = _case(3, 1000, 2, group, d, dtype, seed=d * group)
    _check(q, k, v, torch.tensor([1, 517, 1000], device=CUDA), tensor_cores=tensor_cores)


@pytest.mark.parametrize(("b", "s_max", "lengths"), [
    (1, 32_768, [32_768]),
    (1, 32_768, [32_767]),
    (1, 32_768 + 64, [20_001]),
    (1, 544, [1]),
    (1, 544, [513]),
    (2, 4133, [4133, 77]),
    (4, 32_768, [1, 12_345, 32_768, 20_001]),
    (16, 4096 + 64, "random"),
    (64, 544, "random"),
    (64, 4096, "random"),
])
def test_batches_and_lengths_at_qwen25_3b_shapes(b: int, s_max: int, lengths: list[int] | str) -> None:
    """16 query heads over 2 KV heads, d=128, bfloat16 (the engine's default model)."""
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=b * s_max)
    if lengths == "random":
        g = torch.Generator(device=CUDA).manual_seed(b)
        n = torch.randint(1, s_max + 1, (b,), device=CUDA, generator=g)
    else:
        n = torch.tensor(lengths, device=CUDA)
    _check(q, k, v, n)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 7, 300, k_decode_attention.DECODE_ATTENTION_MAX_SPLITS])
def test_forced_split_counts_including_empty_splits(splits: int, tensor_cores: bool) -> None:
    """Any split count gives the same result, also when most splits get no position (length < splits)."""
    q, k, v = _case(3, 2000, 2, 8, 128, torch.float16, seed=splits)
    _check(q, k, v, torch.tensor([3, 1999, 250], device=CUDA), splits=splits, tensor_cores=tensor_cores)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(14, 2, 64), (28, 4, 128), (24, 2, 128), (32, 8, 128),
                                                      (40, 2, 64)])
def test_groups_that_pad_or_take_several_chunks(heads: int, kv_heads: int, d: int, tensor_cores: bool) -> None:
    """7 heads per KV head (padded to 8 / 16), 12 (two chunks of 8, the second half full), 4 (llama-3.1-8b), 20
    (two chunks of 16 rows)."""
    q, k, v = _case(2, 3000, kv_heads, heads // kv_heads, d, torch.bfloat16, seed=heads)
    _check(q, k, v, torch.tensor([2999, 1234], device=CUDA), tensor_cores=tensor_cores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_length_zero_and_past_the_cache(dtype: torch.dtype) -> None:
    """Length 0: zeros; a length past S_max (or negative) is clamped on the device."""
    q, k, v = _case(4, 300, 2, 4, 64, dtype, seed=9)
    n = torch.tensor([0, 301, -5, 10**12], device=CUDA)
    out = k_decode_attention.split_kv_decode(q, k, v, n)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    _check(q, k, v, n)


def test_query_as_a_view_of_the_fused_projection() -> None:
    """The engine's q: the first H heads of a (B, 1, H + 2 H_kv, D) projection (row stride (H + 2 H_kv) * D)."""
    g = torch.Generator(device=CUDA).manual_seed(4)
    qkv = torch.randn(5, 1, 16 + 4, 128, device=CUDA, generator=g).bfloat16()
    q = qkv[:, 0, :16]  # (B, H, D), strides (20 * 128, 128, 1)
    _, k, v = _case(5, 700, 2, 8, 128, torch.bfloat16, seed=4)
    _check(q, k, v, torch.tensor([700, 1, 64, 65, 333], device=CUDA))


def _graph_replays_match_the_reference(window: int | None, seed: int, last_length: int) -> None:
    """Captured once (split count fixed by the shapes, `window` a host int fixed at capture); the device lengths, the
    query and (last) the cache change between replays, and every replay matches the reference; the output is
    poisoned before each replay. The last replay's first sequence has `last_length` positions."""
    b, s_max = 4, 8192
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=seed)
    lengths = torch.tensor([1, 100, 8192, 4000], device=CUDA)
    out = torch.empty(b, 16, 128, dtype=torch.bfloat16, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        k_decode_attention.split_kv_decode(q, k, v, lengths, out=out, window=window)  # compiles before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_decode_attention.split_kv_decode(q, k, v, lengths, out=out, window=window)
    g = torch.Generator(device=CUDA).manual_seed(seed + 1)
    for rep in range(4):
        lengths.copy_(torch.randint(1, s_max + 1, (b,), device=CUDA, generator=g))
        if rep == 3:
            lengths[0] = last_length
            k.copy_(torch.randn(k.shape, device=CUDA, generator=g))
        q.copy_(torch.randn(q.shape, device=CUDA, generator=g))
        out.fill_(float("nan"))
        graph.replay()
        assert not out.isnan().any()
        torch.testing.assert_close(out, k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=window),
                                   **k_decode_attention.DECODE_ATTENTION_TOLERANCE[torch.bfloat16])
        _counters_zero()


def test_inside_a_cuda_graph_with_lengths_changed_between_replays() -> None:
    _graph_replays_match_the_reference(None, seed=12, last_length=1)


@pytest.mark.parametrize("long_splits", [False, True])
def test_graph_captured_before_any_counters_are_kept(fused: bool, long_splits: bool) -> None:
    """The first fused call inside a capture: the graph zeroes its own counters (not kept); eager calls after the
    replays keep a zeroed set of their own. Replays with changed lengths (1 split's worth to the full cache) and
    lengths 0 in the batch; both split rules."""
    b, s_max = 3, 6000
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=21)
    lengths = torch.tensor([6000, 1, 0], device=CUDA)
    out = torch.empty(b, 16, 128, dtype=torch.bfloat16, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # compiles before the capture
        k_decode_attention.split_kv_decode(q, k, v, lengths, out=out, fused_merge=False, long_splits=long_splits)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_decode_attention.split_kv_decode(q, k, v, lengths, out=out, long_splits=long_splits)
    assert k_decode_attention._DECODE_COUNTERS == {}
    g = torch.Generator(device=CUDA).manual_seed(22)
    for rep in range(5):
        lengths.copy_(torch.randint(0 if rep % 2 else 1, s_max + 1, (b,), device=CUDA, generator=g))
        out.fill_(float("nan"))
        graph.replay()
        assert not out.isnan().any()
        torch.testing.assert_close(out, k_decode_attention.split_kv_decode_ref(q, k, v, lengths),
                                   **k_decode_attention.DECODE_ATTENTION_TOLERANCE[torch.bfloat16])
    _check(q, k, v, lengths)
    eager_splits = k_decode_attention.decode_splits(b * 2, s_max, _sms())
    assert bool(k_decode_attention._DECODE_COUNTERS) == (fused and eager_splits > 1)  # the eager call


def _sms() -> int:
    return torch.cuda.get_device_properties(CUDA).multi_processor_count


@pytest.mark.parametrize(("b", "s_max", "lengths"), [
    (1, 32_768 + 64, [32_768]),
    (1, 4096 + 64, [4096]),
    (1, 512 + 64, [512]),
    (16, 4096 + 64, "random"),
    (64, 544, "random"),
    (5, 9000, [0, 1, 8999, 513, 9000]),
])
def test_long_split_rule(b: int, s_max: int, lengths: list[int] | str) -> None:
    """The long split rule (fewer, longer splits) at the benchmark's shapes and ragged ones, both kernels."""
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=b + s_max)
    if lengths == "random":
        g = torch.Generator(device=CUDA).manual_seed(b + 1)
        n = torch.randint(1, s_max + 1, (b,), device=CUDA, generator=g)
    else:
        n = torch.tensor(lengths, device=CUDA)
    for tc in (True, False):
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)  # (B, H, D) poisoned
        got = k_decode_attention.split_kv_decode(q, k, v, n, out=out, tensor_cores=tc, long_splits=True)
        assert not got.isnan().any()
        torch.testing.assert_close(got, k_decode_attention.split_kv_decode_ref(q, k, v, n),
                                   **k_decode_attention.DECODE_ATTENTION_TOLERANCE[q.dtype])
        _counters_zero()


@pytest.mark.parametrize("splits", [700, k_decode_attention.DECODE_ATTENTION_MAX_SPLITS])
def test_fused_merge_in_several_passes_of_heads(splits: int) -> None:
    """d=64 on the tensor cores, 16 query heads a block: the fused merge's weights of all 16 heads at 700 or 1024
    splits exceed the block's 24 KiB of shared memory, so it merges them in passes (8 + 8, and 5 + 5 + 5 + 1)."""
    q, k, v = _case(2, 3000, 2, 16, 64, torch.bfloat16, seed=splits)
    _check(q, k, v, torch.tensor([2999, 1500], device=CUDA), splits=splits, tensor_cores=True)


def test_caller_counters_and_shared_buffer_across_shapes(fused: bool) -> None:
    """Counters the caller passes (larger than needed) are used and left zero; one buffer serves calls of
    different shapes and split counts one after another on a stream."""
    counters = torch.zeros(1000, dtype=torch.int32, device=CUDA)
    for b, s_max, group, splits in ((2, 3000, 8, 40), (7, 700, 4, 3), (1, 20_000, 12, 1024), (3, 64, 1, 2)):
        q, k, v = _case(b, s_max, 2, group, 128, torch.float16, seed=b * splits)
        n = torch.randint(0, s_max + 1, (b,), device=CUDA)
        for tc in (True, False):
            out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)
            got = k_decode_attention.split_kv_decode(q, k, v, n, splits=splits, out=out, tensor_cores=tc,
                                                     counters=counters)
            torch.testing.assert_close(got, k_decode_attention.split_kv_decode_ref(q, k, v, n),
                                       **k_decode_attention.DECODE_ATTENTION_TOLERANCE[q.dtype])
    assert int(counters.count_nonzero()) == 0
    assert k_decode_attention._DECODE_COUNTERS == {}  # the caller's counters were used, none kept


def test_tiny_grid_for_the_sanitizer() -> None:
    """A few small launches of every path (one split, several splits with the merge, padded and chunked groups,
    each dtype, length 0): run under compute-sanitizer's memcheck and racecheck."""
    for dtype, tensor_cores in KERNELS:
        q, k, v = _case(2, 70, 2, 8, 128, dtype, seed=1)
        for splits in (1, 3):
            _check(q, k, v, torch.tensor([70, 9], device=CUDA), splits=splits, tensor_cores=tensor_cores)
        q, k, v = _case(2, 40, 2, 6, 64, dtype, seed=2)
        _check(q, k, v, torch.tensor([0, 33], device=CUDA), splits=2, tensor_cores=tensor_cores)
    q, k, v = _case(1, 40, 1, 20, 64, torch.float16, seed=3)
    _check(q, k, v, torch.tensor([40], device=CUDA))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_attn_kvscope(dtype: torch.dtype) -> None:
    """qwen2.5-0.5b (14 query heads over 2 KV heads, d=64), ragged prompts: `--attn kvscope` decode steps, eager and
    from a CUDA graph, give the same greedy tokens; in float32 also the same as the sdpa switch."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, dtype, seed=2)
    prompts = [list(range(10, 47)), list(range(50, 57)), list(range(3, 27))]
    kernels = EngineOptions(kernels=True)
    eager = Engine(model, RunConfig(3, 96, dtype, CUDA, "kvscope"), options=kernels).generate(prompts, 24)
    graphed = Engine(model, RunConfig(3, 96, dtype, CUDA, "kvscope"), options=EngineOptions(graphs=True, kernels=True))
    assert graphed.generate(prompts, 24) == eager
    assert graphed.generate(prompts, 24) == eager  # the graph is reused after a new prefill
    if dtype == torch.float32:
        assert Engine(model, RunConfig(3, 96, dtype, CUDA, "sdpa"), options=kernels).generate(prompts, 24) == eager


# ---- the sliding window: sequence b attends max(0, L - W) .. L - 1 ---------------------------------------------------
@pytest.mark.parametrize(("dtype", "tensor_cores"), KERNELS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [1, 16, 100, 517, 4096])
def test_window_dtypes_head_sizes_and_windows(dtype: torch.dtype, tensor_cores: bool, d: int, window: int) -> None:
    """Ragged lengths shorter and longer than the window (1, one that is no multiple of any tile, the full cache),
    4 query heads per KV head, default splits (counted over min(S_max, W) positions)."""
    q, k, v = _case(3, 1000, 2, 4, d, dtype, seed=d + window)
    _check(q, k, v, torch.tensor([1, 517, 1000], device=CUDA), tensor_cores=tensor_cores, window=window)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 7, 300, k_decode_attention.DECODE_ATTENTION_MAX_SPLITS])
def test_window_forced_split_counts_including_empty_splits(splits: int, tensor_cores: bool) -> None:
    """The splits share the window's positions (from L - W on): any count gives the same result, also when most
    splits get none."""
    q, k, v = _case(3, 2000, 2, 8, 128, torch.float16, seed=splits + 1)
    _check(q, k, v, torch.tensor([3, 1999, 250], device=CUDA), splits=splits, tensor_cores=tensor_cores, window=250)


@pytest.mark.parametrize(("b", "s_max", "lengths", "window"), [
    (1, 32_768, [32_768], 4096),  # Mistral v0.1's window in a 32k cache
    (4, 32_768, [1, 4097, 32_768, 20_001], 4096),
    (16, 4096 + 64, "random", 1000),
    (5, 9000, [0, 1, 8999, 513, 9000], 512),
])
def test_window_at_long_contexts_both_split_rules(b: int, s_max: int, lengths: list[int] | str, window: int) -> None:
    """16 query heads over 2 KV heads, d=128, bfloat16, both kernels and both split rules."""
    q, k, v = _case(b, s_max, 2, 8, 128, torch.bfloat16, seed=b + window)
    if lengths == "random":
        n = torch.randint(1, s_max + 1, (b,), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(b))
    else:
        n = torch.tensor(lengths, device=CUDA)
    for tc in (True, False):
        for long_splits in (False, True):
            out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)  # (B, H, D) poisoned
            got = k_decode_attention.split_kv_decode(q, k, v, n, out=out, tensor_cores=tc, long_splits=long_splits,
                                                     window=window)
            assert not got.isnan().any()
            torch.testing.assert_close(got, k_decode_attention.split_kv_decode_ref(q, k, v, n, window=window),
                                       **k_decode_attention.DECODE_ATTENTION_TOLERANCE[q.dtype])
            _counters_zero()


def test_window_inside_a_cuda_graph_with_lengths_changed_between_replays() -> None:
    """The window (1,500) is a host int fixed at capture; the device lengths, shorter and longer than it, change
    between replays."""
    _graph_replays_match_the_reference(1500, seed=31, last_length=1499)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_attn_kvscope_with_a_window(dtype: torch.dtype) -> None:
    """A Mistral-shaped model (d=64, 8 query heads over 2 KV heads) with a 24-position window and ragged prompts
    past it: `--attn kvscope` eager and from a CUDA graph give the same greedy tokens; in float32 also the same as
    the sdpa and eager switches (their windows: tests/engine/test_parity_gpu.py)."""
    args = ModelArgs("gpu-window", "mistral", dim=512, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=1024,
                     vocab_size=1000, max_position_embeddings=512, sliding_window=24)
    model = empty_model(args, CUDA, dtype)
    init_random(model, 5)
    prompts = [list(range(10, 47)), list(range(50, 57)), list(range(3, 30))]
    kernels = EngineOptions(kernels=True)
    eager = Engine(model, RunConfig(3, 96, dtype, CUDA, "kvscope"), options=kernels).generate(prompts, 40)
    graphed = Engine(model, RunConfig(3, 96, dtype, CUDA, "kvscope"), options=EngineOptions(graphs=True, kernels=True))
    assert graphed.generate(prompts, 40) == eager
    if dtype == torch.float32:
        for attn in ("sdpa", "eager"):
            assert Engine(model, RunConfig(3, 96, dtype, CUDA, attn), options=kernels).generate(prompts, 40) == eager
