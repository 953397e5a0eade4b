"""CPU side of the gemv kernels (kvscope/kernels/cuda/gemv.cu): the launch shape chosen on the host, the checks at
the boundary (ValueError naming the shapes, before any device work), the references against the engine's torch path,
and the tolerance: a product summed exactly (float64) and rounded where the kernel rounds stays within
`gemv_tolerance` of the float32 reference, and a wrong product does not. The kernels themselves:
tests/kernels/test_gemv_gpu.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from kvscope.kernels import common as k_common
from kvscope.kernels import gemv as k_gemv
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.config import PRESETS
from kvscope.model.layers import FeedForward, linear_residual_

H200_SMS = 132


@pytest.mark.parametrize(("rows", "variant"), [(1, "m1"), (2, "m2"), (3, "m4"), (4, "m4"), (5, "m8"), (9, "m16"),
                                               (16, "m16")])
@pytest.mark.parametrize("pipelined", [False, True])
def test_launch_tile_follows_rows(rows: int, variant: str, pipelined: bool) -> None:
    cfg = k_gemv.gemv_launch(rows, 2560, 2048, 2, H200_SMS, pipelined=pipelined)
    assert cfg.variant == variant + ("p" if pipelined else "")
    tile = int(variant[1:])
    assert k_gemv.gemv_launch(rows, 2560, 2048, 2, H200_SMS).variant.endswith("p") == k_gemv.GEMV_PIPELINED[tile]
    assert cfg.block == (128, 1, 1)
    assert cfg.grid == (320, 1, 1) and cfg.splits == 1 and cfg.kv_per_split == 256  # 2560 rows / 8 per block


def test_launch_splits_k_only_for_few_blocks() -> None:
    """One trip at a time (`pipelined=False`) and one block per SM before K is split, unless said otherwise."""
    def launch(rows: int, w_rows: int, k: int, elem: int, per_sm: int = 1) -> k_gemv.GemvLaunch:
        return k_gemv.gemv_launch(rows, w_rows, k, elem, H200_SMS, pipelined=False, split_blocks_per_sm=per_sm)

    # qwen2.5-3b at one row: every product has at least as many blocks as SMs, no split
    a = PRESETS["qwen2.5-3b"]
    for n, k in ((a.q_size + 2 * a.kv_size, a.dim), (a.dim, a.q_size), (2 * a.intermediate_size, a.dim),
                 (a.dim, a.intermediate_size), (a.vocab_size, a.dim)):
        assert launch(1, n, k, 2).splits == 1
    # its down product (256 blocks) with splits below 2 blocks per SM: ceil(528 / 256) = 3 splits of 459 vectors
    assert launch(1, a.dim, a.intermediate_size, 2, per_sm=2).grid == (256, 3, 1)
    assert launch(1, a.dim, a.intermediate_size, 2, per_sm=2).kv_per_split == 459
    # pipelined trips are 4 vectors at one row: 64 rows x 4096 bf16 -> min(33, 512 // 128 = 4) splits
    assert k_gemv.gemv_launch(1, 64, 4096, 2, H200_SMS, pipelined=True, split_blocks_per_sm=1).splits == 4
    # 64 rows of W in 8 blocks, K = 4096 bf16 = 512 vectors: two trips of 256 vectors at one row -> 2 splits
    assert launch(1, 64, 4096, 2) == k_gemv.GemvLaunch("m1", (8, 2, 1), (128, 1, 1), 2, 256)
    # one block, 8192 vectors: capped at 16 splits of 512 vectors
    assert launch(1, 8, 65536, 2) == k_gemv.GemvLaunch("m1", (1, 16, 1), (128, 1, 1), 16, 512)
    # 16 rows take 64-vector trips: 8192 / 64 = 128 possible splits, capped at 16
    assert launch(16, 8, 65536, 2).splits == 16
    # 896 rows (qwen2.5-0.5b's dim) in 112 blocks < 132 SMs, but K = 896 holds less than one trip: no split
    assert launch(1, 896, 896, 2).splits == 1
    # 300 vectors at 16 rows (64-vector trips): 4 splits of 75
    assert launch(16, 8, 2400, 2) == k_gemv.GemvLaunch("m16", (1, 4, 1), (128, 1, 1), 4, 75)
    # float32: 4 elements per vector, 1024 vectors at one row (256-vector trips): 4 splits of 256
    assert launch(1, 8, 4096, 4) == k_gemv.GemvLaunch("m1", (1, 4, 1), (128, 1, 1), 4, 256)


@pytest.mark.parametrize(("rows", "w_rows", "k", "elem"), [(0, 8, 8, 2), (17, 8, 8, 2), (1, 0, 8, 2), (1, 8, 0, 2),
                                                           (1, 8, 12, 2), (1, 8, 6, 4), (1, 8, 8, 3)])
def test_launch_refuses_what_the_kernel_cannot_run(rows: int, w_rows: int, k: int, elem: int) -> None:
    with pytest.raises(ValueError, match="gemv_launch"):
        k_gemv.gemv_launch(rows, w_rows, k, elem, H200_SMS)


def _bf(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.bfloat16)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: k_gemv.gemv(_bf(1, 64), _bf(32, 72)), r"x \(1, 64\) @ W \(32, 72\)"),
    (lambda: k_gemv.gemv(_bf(17, 64), _bf(32, 64)), r"1 <= M <= 16"),
    (lambda: k_gemv.gemv(_bf(64), _bf(32, 64)), r"x \(64,\)"),
    (lambda: k_gemv.gemv(_bf(2, 12), _bf(32, 12)), r"K = 12 .* multiple of 8"),
    (lambda: k_gemv.gemv(_bf(2, 64), _bf(64, 32).t()), r"W \(32, 64\) strides \(1, 32\)"),
    (lambda: k_gemv.gemv(_bf(64, 2).t(), _bf(32, 64)), r"x \(2, 64\) strides \(1, 2\)"),
    (lambda: k_gemv.gemv(_bf(2, 72)[:, 1:65], _bf(32, 64)), r"16-byte"),
    (lambda: k_gemv.gemv(_bf(2, 64), _bf(32, 64), _bf(31)), r"bias \(31,\)"),
    (lambda: k_gemv.gemv(_bf(2, 64), _bf(32, 64), norm_weight=_bf(32)), r"norm weight \(32,\)"),
    (lambda: k_gemv.gemv(_bf(2, 64), _bf(32, 64), stamp=torch.zeros(2, dtype=torch.int64)), r"stamp"),
    (lambda: k_gemv.gemv_silu_mul(_bf(2, 64), _bf(33, 64)), r"W13 \(33, 64\)"),
    (lambda: k_gemv.gemv_residual_(_bf(2, 31), _bf(2, 64), _bf(32, 64)), r"h \(2, 31\)"),
    (lambda: k_gemv.gemv_residual_(_bf(64, 2).t(), _bf(2, 64), _bf(64, 64)), r"h \(2, 64\) strides \(1, 2\)"),
    (lambda: k_gemv.gemv(_bf(2, 64), _bf(32, 64)), r"needs CUDA tensors"),
    (lambda: k_gemv.gemv(torch.zeros(2, 64, dtype=torch.int32), torch.zeros(32, 64, dtype=torch.int32)),
     r"needs CUDA"),
])
def test_boundary_checks(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_residual_refuses_h_overlapping_x() -> None:
    buf = _bf(2, 64)
    with pytest.raises(ValueError, match=r"h \(2, 64\) overlaps x \(2, 64\)"):
        k_gemv.gemv_residual_(buf, buf, _bf(64, 64))


def test_gemv_fits_only_on_cuda() -> None:
    assert not k_gemv.gemv_fits(_bf(1, 64), _bf(32, 64))


def test_references_equal_the_engine_torch_path() -> None:
    """float32 (no rounding in between): gemv_ref is F.linear, gemv_residual_ref_ is linear_residual_, and
    gemv_silu_mul_ref is FeedForward.hidden_act's fused path, to the bit."""
    g = torch.Generator().manual_seed(0)
    args = PRESETS["tiny"]
    ff = FeedForward(args)
    for p in ff.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(3, args.dim, generator=g)
    assert torch.equal(k_gemv.gemv_silu_mul_ref(x, ff.w13.weight), ff.hidden_act(x))
    lin = torch.nn.Linear(args.dim, 24, bias=True)
    assert torch.equal(k_gemv.gemv_ref(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
    h = torch.randn(3, 24, generator=g)
    assert torch.equal(k_gemv.gemv_residual_ref_(h.clone(), x, lin.weight, lin.bias),
                       linear_residual_(h.clone(), x, lin))
    nw = torch.rand(args.dim, generator=g) + 0.5
    assert torch.equal(k_gemv.gemv_ref(x, lin.weight, None, nw, 1e-6),
                       F.linear(k_rms_norm.rms_norm_ref(x, nw, 1e-6), lin.weight))


def _exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The product summed in float64 (another order than float32's, and exact to far below the dtype)."""
    return x.double() @ w.double().t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "k"), [(1, 896), (16, 2048), (4, 11008), (1, 18944)])
def test_tolerance_holds_for_another_summation_order(dtype: torch.dtype, m: int, k: int) -> None:
    """What a correct kernel may differ by (a different float order, rounded at the same places) is inside
    gemv_tolerance; a product with two outputs swapped, or the bias left out, is not."""
    g = torch.Generator().manual_seed(k + m)
    n = 256
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    tol = k_gemv.gemv_tolerance(x, w)
    ref = k_gemv.gemv_ref(x, w, bias)
    ok = (_exact(x, w) + bias.double()).to(dtype)
    torch.testing.assert_close(ok, ref, **tol)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ok[:, [1, 0, *range(2, n)]], ref, **tol)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_exact(x, w).to(dtype), ref, **tol)
    # SiLU * up: gate and up rounded, then SiLU and the multiply in the dtype
    gate, up = _exact(x, w).to(dtype).chunk(2, dim=-1)
    torch.testing.assert_close(F.silu(gate) * up, k_gemv.gemv_silu_mul_ref(x, w), **k_gemv.gemv_tolerance(x, w, True))
    # residual: h + x W^T rounded once
    h = torch.randn(m, n, generator=g).to(dtype)
    torch.testing.assert_close((h.double() + _exact(x, w)).to(dtype), k_gemv.gemv_residual_ref_(h.clone(), x, w),
                               **tol)


def test_gemv_source_has_every_entry_the_module_launches() -> None:
    """kvscope_gemv is found by name (cuda/gemv.cu) and defines one entry per row tile and the split-K reduction."""
    from kvscope.kernels.launch import kernel_file
    from kvscope.kernels.loader import nvrtc_code

    src = nvrtc_code(kernel_file("kvscope_gemv"))
    assert "#if defined(KV_BF16)" in src
    for tile in k_gemv.GEMV_TILES:
        assert f"GEMV_ENTRY({tile}, {k_gemv.GEMV_UNROLL[tile, False]}, false, )" in src
        assert f"GEMV_ENTRY({tile}, {k_gemv.GEMV_UNROLL[tile, True]}, true, p)" in src
    assert 'extern "C" __global__ void kvscope_gemv_reduce(' in src
    assert f"#define GEMV_WARPS {k_gemv.GEMV_WARPS}" in src and f"#define GEMV_ROWS {k_gemv.GEMV_ROWS_PER_WARP}" in src


@pytest.mark.parametrize("batch", [2, 6])
def test_engine_gemv_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The engine with kernels and gemv on, each kernel stood in for by its torch reference (float32): the same greedy
    tokens as with kernels off; per decode step one gemv per qkv and lm_head, one gemv_silu_mul and two
    gemv_residual_ per layer; the norm inside them up to GEMV_NORM_MAX_ROWS rows, else the RMSNorm kernel first."""
    from kvscope.engine import options as engine_options
    from kvscope.engine.layer_ops import GEMV_NORM_MAX_ROWS
    from kvscope.engine.loop import Engine
    from kvscope.engine.options import EngineOptions, GemvLaunchOptions
    from kvscope.engine.plan import RunConfig
    from kvscope.model.weights import empty_model, init_random

    calls: list[tuple[str, bool]] = []
    options: list[dict] = []  # the launch choice each gemv call was given

    def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0, stamp: torch.Tensor | None = None, **o: object
             ) -> torch.Tensor:
        calls.append(("gemv", norm_weight is not None))
        options.append(o)
        return k_gemv.gemv_ref(x, w, bias, norm_weight, eps)

    def silu(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
             stamp: torch.Tensor | None = None, **o: object) -> torch.Tensor:
        calls.append(("silu_mul", norm_weight is not None))
        options.append(o)
        return k_gemv.gemv_silu_mul_ref(x, w, norm_weight, eps)

    def residual(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, **o: object
                 ) -> torch.Tensor:
        calls.append(("residual", False))
        options.append(o)
        return k_gemv.gemv_residual_ref_(h, x, w, bias)

    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, stamp: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(("rms_norm", False))
        return k_rms_norm.rms_norm_ref(x, w, eps)

    monkeypatch.setattr(k_common, "supported", lambda device, dtype: True)
    monkeypatch.setattr(k_rms_norm, "rms_norm", rms_norm)
    monkeypatch.setattr(k_silu_mul, "silu_mul", k_silu_mul.silu_mul_ref)
    monkeypatch.setattr(k_rope_kv, "rope_kv_", k_rope_kv.rope_kv_ref_)
    monkeypatch.setattr(k_gemv, "gemv_fits", lambda x, w: x.dim() == 2 and x.shape[0] <= k_gemv.GEMV_MAX_ROWS)
    monkeypatch.setattr(k_gemv, "gemv", gemv)
    monkeypatch.setattr(k_gemv, "gemv_silu_mul", silu)
    monkeypatch.setattr(k_gemv, "gemv_residual_", residual)
    model = empty_model(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    init_random(model, seed=4)
    prompts = [[7, 1, 8, 2, 8], [3, 1], [5], [9, 9, 2], [4, 4], [6, 1, 2]][:batch]
    cfg = RunConfig(batch, 24, torch.float32, torch.device("cpu"))
    off = Engine(model, cfg).generate(prompts, 6)
    every_row = EngineOptions(kernels=True, gemv_max_rows=k_gemv.GEMV_MAX_ROWS)  # both sides of GEMV_NORM_MAX_ROWS
    assert Engine(model, cfg, options=every_row).ops.gemv is None  # GEMV_BY_DEFAULT off: gemv unset is cuBLAS
    monkeypatch.setattr(engine_options, "GEMV_BY_DEFAULT", True)
    eng = Engine(model, cfg, options=every_row)
    assert eng.ops.gemv is not None
    eng.generate(prompts, 2)  # prefill (rows batch x 5 > 16 at batch 6: cuBLAS there) and one decode step
    calls.clear()
    eng.decode_step()
    n = model.args.n_layers
    fused = batch <= GEMV_NORM_MAX_ROWS
    assert calls.count(("gemv", fused)) == n + 1 and calls.count(("silu_mul", fused)) == n
    assert calls.count(("residual", False)) == 2 * n
    assert calls.count(("rms_norm", False)) == (0 if fused else 2 * n + 1)
    assert len(calls) == 4 * n + 1 + (0 if fused else 2 * n + 1)
    assert Engine(model, cfg, options=every_row).generate(prompts, 6) == off
    assert options and all(o == {} for o in options)  # no launch choice given: the kernels' defaults
    launch = GemvLaunchOptions(pipelined=True, split_blocks_per_sm=2)  # what benchmarks/decode_gemv.py gives
    chosen = Engine(model, cfg, options=EngineOptions(kernels=True, gemv=True, gemv_max_rows=k_gemv.GEMV_MAX_ROWS,
                                                      gemv_launch=launch))
    options.clear()
    assert chosen.generate(prompts, 3) == [t[:3] for t in off]
    assert len(options) >= 4 * n + 1 and all(o == {"pipelined": True, "split_blocks_per_sm": 2} for o in options)
    for small in (EngineOptions(kernels=True, gemv=True, gemv_max_rows=batch - 1),  # above the bound: cuBLAS
                  EngineOptions(kernels=True, gemv=False, gemv_max_rows=k_gemv.GEMV_MAX_ROWS)):
        calls.clear()
        assert Engine(model, cfg, options=small).generate(prompts, 6) == off
        assert calls and set(calls) == {("rms_norm", False)}
