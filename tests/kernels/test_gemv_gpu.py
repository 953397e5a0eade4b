"""kvscope's gemv kernels (kvscope/kernels/cuda/gemv.cu) against their torch references, on a GPU (marked `gpu`,
skipped without CUDA): the decode-step products of four presets at 1 to 16 rows, sizes that are no multiple of any
tile, split-K, the fused RMSNorm prologue, three dtypes, outputs poisoned before each launch; and the engine's tokens
and logits with gemv on and off inside a CUDA graph. Host-side launch shapes and boundary checks:
tests/kernels/test_gemv.py."""

from __future__ import annotations

import pytest
import torch

from kvscope.engine.layer_ops import GemvOps, KernelOps
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.kernels import gemv as k_gemv
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.model.config import PRESETS, ModelArgs
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
ROWS = [1, 2, 4, 8, 16]
MODELS = ["qwen2.5-0.5b", "qwen2.5-3b", "qwen2.5-7b", "llama-3.1-8b"]


@pytest.fixture(params=[False, True], ids=["burst", "pipelined"])
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every kernel test runs both variants: one trip of loads at a time, and pipelined."""
    monkeypatch.setattr(k_gemv, "GEMV_PIPELINED", dict.fromkeys(k_gemv.GEMV_TILES, request.param))
    return bool(request.param)


def _products(a: ModelArgs) -> dict[str, tuple[int, int]]:
    """(N, K) of W for each product of a decode step."""
    return {"qkv": (a.q_size + 2 * a.kv_size, a.dim), "o_proj": (a.dim, a.q_size),
            "w13": (2 * a.intermediate_size, a.dim), "w2": (a.dim, a.intermediate_size),
            "lm_head": (a.vocab_size, a.dim)}


def _data(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), W (N, K) scaled like a trained layer (outputs of order one), bias (N,)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(m, k, device=CUDA, generator=g).to(dtype)
    w = (torch.randn(n, k, device=CUDA, generator=g) * k ** -0.5).to(dtype)
    bias = torch.randn(n, device=CUDA, generator=g).to(dtype)
    return x, w, bias


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Free a NaN-filled block of the output's size: the caching allocator hands it to the kernel's next output
    (the tests check it did, by address). Returns its address."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=CUDA)
    ptr = t.data_ptr()
    del t
    return ptr


def _close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor, silu_mul: bool = False) -> None:
    assert torch.isfinite(got).all(), "an output was left unwritten (NaN poison) or overflowed"
    torch.testing.assert_close(got, want, **k_gemv.gemv_tolerance(x, w, silu_mul))


def _run_product(op: str, m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> None:
    x, w, bias = _data(m, n, k, dtype, seed)
    if op in ("qkv", "lm_head", "store"):
        b = bias if op == "qkv" else None
        poison = _poisoned((m, n), dtype)
        got = k_gemv.gemv(x, w, b)
        assert got.data_ptr() == poison
        _close(got, k_gemv.gemv_ref(x, w, b), x, w)
    elif op == "w13":
        poison = _poisoned((m, n // 2), dtype)
        got = k_gemv.gemv_silu_mul(x, w)
        assert got.data_ptr() == poison
        _close(got, k_gemv.gemv_silu_mul_ref(x, w), x, w, silu_mul=True)
    else:  # residual: h is a strided view whose gap columns must stay untouched
        g = torch.Generator(device=CUDA).manual_seed(seed + 1)
        base = torch.full((m, n + 8), 7.0, dtype=dtype, device=CUDA)  # (M, N+8)
        h = base[:, :n]  # (M, N), row stride N + 8
        h.copy_(torch.randn(m, n, device=CUDA, generator=g).to(dtype))
        ref = h.clone()
        k_gemv.gemv_residual_(h, x, w)
        k_gemv.gemv_residual_ref_(ref, x, w)
        _close(h, ref, x, w)
        assert (base[:, n:] == 7.0).all()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("op", ["qkv", "o_proj", "w13", "w2", "lm_head"])
@pytest.mark.parametrize("m", ROWS)
def test_preset_products_bf16(model: str, op: str, m: int, variant: bool) -> None:
    if op == "lm_head" and m not in (1, 16):
        pytest.skip("the vocabulary product at 1 and 16 rows only (1 GB weights)")
    n, k = _products(PRESETS[model])[op]
    _run_product(op, m, n, k, BF16, seed=m * 1000 + n)


@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen2.5-3b"])
@pytest.mark.parametrize("op", ["qkv", "o_proj", "w13", "w2"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_preset_products_fp16_fp32(dtype: torch.dtype, model: str, op: str, m: int, variant: bool) -> None:
    n, k = _products(PRESETS[model])[op]
    _run_product(op, m, n, k, dtype, seed=m * 1000 + n + 7)


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 8), (3, 7, 24), (5, 33, 520), (13, 1001, 4104), (16, 2, 8),
                                           (1, 8, 65536), (7, 64, 16384), (2, 1030, 12296)])
@pytest.mark.parametrize("op", ["store", "w13", "w2"])
def test_odd_sizes_and_split_k(dtype: torch.dtype, m: int, n: int, k: int, op: str, variant: bool) -> None:
    """Rows, columns and lengths that are no multiple of any tile; (1, 8, 65536) and (7, 64, 16384) split K."""
    n = 2 * n if op == "w13" else n
    _run_product(op, m, n, k, dtype, seed=m + n + k)


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_sanitizer_grid(dtype: torch.dtype, variant: bool) -> None:
    """A small grid of every call (each epilogue, the norm prologue, split-K at (2, 8, 4096)), small
    enough to run under `compute-sanitizer --tool memcheck|racecheck python3 -m pytest -q -m gpu
    tests/kernels/test_gemv_gpu.py -k sanitizer_grid`."""
    for m, n, k in ((1, 9, 24), (3, 16, 64), (16, 10, 40), (2, 8, 4096), (5, 6, 2056), (8, 4, 1032)):
        x, w, b = _data(m, n, k, dtype, seed=m * n * k)
        nw = (torch.rand(k, device=CUDA) + 0.5).to(dtype)
        xn = k_rms_norm.rms_norm_ref(x, nw, 1e-6)
        _close(k_gemv.gemv(x, w, b), k_gemv.gemv_ref(x, w, b), x, w)
        _close(k_gemv.gemv(x, w, b, nw, 1e-6), k_gemv.gemv_ref(x, w, b, nw, 1e-6), xn, w)
        w13 = w[: n - n % 2]
        _close(k_gemv.gemv_silu_mul(x, w13, nw, 1e-6), k_gemv.gemv_silu_mul_ref(x, w13, nw, 1e-6), xn, w13, True)
        h = torch.randn(m, n, device=CUDA).to(dtype)
        _close(k_gemv.gemv_residual_(h.clone(), x, w, b), k_gemv.gemv_residual_ref_(h.clone(), x, w, b), x, w)


def test_split_k_is_deterministic_and_used(variant: bool) -> None:
    x, w, _ = _data(3, 8, 65536, BF16, seed=11)
    cfg = k_gemv.gemv_launch(3, 8, 65536, 2, torch.cuda.get_device_properties(CUDA).multi_processor_count)
    assert cfg.splits > 1
    first = k_gemv.gemv(x, w)
    assert all(torch.equal(k_gemv.gemv(x, w), first) for _ in range(5))


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("m", [1, 2, 4, 16])
def test_fused_rms_norm_prologue(dtype: torch.dtype, m: int, variant: bool) -> None:
    """gemv / gemv_silu_mul normalising x themselves equal rms_norm_ref then the product (qwen2.5-3b shapes, the
    residual stream scaled up as in a deep layer); the stamp is written."""
    a = PRESETS["qwen2.5-3b"]
    g = torch.Generator(device=CUDA).manual_seed(m)
    h = (torch.randn(m, a.dim, device=CUDA, generator=g) * 30).to(dtype)
    nw = (torch.rand(a.dim, device=CUDA, generator=g) + 0.5).to(dtype)
    xn = k_rms_norm.rms_norm_ref(h, nw, 1e-6)
    for n, bias, silu in ((a.q_size + 2 * a.kv_size, True, False), (2 * a.intermediate_size, False, True),
                          (a.vocab_size, False, False)):
        _, w, b = _data(m, n, a.dim, dtype, seed=n + m)
        b = b if bias else None
        slot = torch.zeros(1, dtype=torch.int64, device=CUDA)
        if silu:
            got = k_gemv.gemv_silu_mul(h, w, nw, 1e-6, stamp=slot)
            want = k_gemv.gemv_silu_mul_ref(h, w, nw, 1e-6)
        else:
            got = k_gemv.gemv(h, w, b, nw, 1e-6, stamp=slot)
            want = k_gemv.gemv_ref(h, w, b, nw, 1e-6)
        _close(got, want, xn, w, silu)
        assert int(slot) > 0


def test_products_in_a_cuda_graph(variant: bool) -> None:
    """The three calls captured in one graph and replayed on new inputs give the eager results."""
    x, w, bias = _data(2, 512, 1024, BF16, seed=5)
    _, w13, _ = _data(2, 1024, 1024, BF16, seed=6)
    h = torch.randn(2, 1024, device=CUDA).to(BF16)
    h0 = h.clone()
    k_gemv.gemv(x, w, bias)  # compile outside the capture
    k_gemv.gemv_silu_mul(x, w13)
    k_gemv.gemv_residual_(h0.clone(), x[:, :512].contiguous(), w13[:, :512].contiguous())
    xr = x[:, :512].contiguous()
    w_r = w13[:, :512].contiguous()  # (1024, 512)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = k_gemv.gemv(x, w, bias)
        act = k_gemv.gemv_silu_mul(x, w13)
        k_gemv.gemv_residual_(h, xr, w_r)
    x.copy_(torch.randn_like(x))
    xr.copy_(x[:, :512])
    h.copy_(h0)
    graph.replay()
    torch.testing.assert_close(y, k_gemv.gemv(x, w, bias), rtol=0, atol=0)
    torch.testing.assert_close(act, k_gemv.gemv_silu_mul(x, w13), rtol=0, atol=0)
    torch.testing.assert_close(h, k_gemv.gemv_residual_(h0.clone(), xr, w_r), rtol=0, atol=0)


# ---- the engine -----------------------------------------------------------------------------------------------
def test_engine_gemv_on_and_off_agree_in_a_graph() -> None:
    """qwen2.5-0.5b, random bf16 weights, two prompts, decode steps replayed from a CUDA graph, kernels on: with
    gemv off (cuBLAS) and on, fed the same tokens step by step, the logits stay within bf16 rounding of each other
    and the greedy tokens agree wherever the reference's top-2 margin is larger than the difference; float32: the
    same greedy tokens end to end."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, BF16, seed=4)
    engines = []
    for gemv in (False, True):
        eng = Engine(model, RunConfig(2, 96, BF16, CUDA), options=EngineOptions(graphs=True, kernels=True, gemv=gemv))
        engines.append(eng)
    ref, ours = engines
    assert type(ref.step_ops) is KernelOps and type(ours.step_ops) is GemvOps  # the model's products fit the kernels
    tokens = torch.randint(0, model.args.vocab_size, (2, 40), device=CUDA, generator=torch.Generator(
        device=CUDA).manual_seed(0))
    for eng in engines:
        eng.prefill(tokens, [40, 33])
    checked = 0
    for _ in range(12):
        feed = ref.next_tokens.clone()
        for eng in engines:
            eng.decode_step(feed)
        a, b = ref.logits.float(), ours.logits.float()
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 2e-2, rel
        top2 = a.topk(2, dim=-1).values  # (B, 2)
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (a - b).abs().max()
        assert torch.equal(ref.next_tokens[clear], ours.next_tokens[clear])
        checked += int(clear.sum())
    assert checked > 0
    del engines, ref, ours, model
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, F32, seed=4)
    prompts = [list(range(10, 40)), list(range(50, 61))]
    outs = []
    for gemv in (False, True):
        eng = Engine(model, RunConfig(2, 64, F32, CUDA), options=EngineOptions(graphs=True, kernels=True, gemv=gemv))
        outs.append(eng.generate(prompts, 16))
    assert outs[0] == outs[1]
