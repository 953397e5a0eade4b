"""The engine picks what runs once (kvscope/engine: options, layer_ops, decode_attn): the strategy chosen for each
(device, kernels, gemv, tensor parallelism, rows) combination, frozen and checked options, the same regions in the
same order whichever strategy runs, and the same logits as the torch path on the CPU for every option set (each
kernel stood in for by its torch reference, float32)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kvscope.engine import decode_attn
from kvscope.engine import options as engine_options
from kvscope.engine.decode_attn import FlashDecode, MaskedDecode, SplitKVDecode, make_decode_attention
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.layer_ops import (
    GEMV_NORM_MAX_ROWS,
    GemvNormFirstOps,
    GemvOps,
    KernelOps,
    TensorParallelOps,
    TorchOps,
    choose_ops,
)
from kvscope.engine.loop import Engine
from kvscope.engine.options import AttentionOptions, EngineOptions, GemvLaunchOptions
from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.kernels import common as k_common
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.kernels import gemv as k_gemv
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.config import PRESETS
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import Transformer
from kvscope.model.weights import empty_model, init_random
from kvscope.profiler.instrument import Instrument

CPU = torch.device("cpu")
PROMPTS = [[7, 1, 8, 2, 8], [3, 1]]


def _tiny(seed: int = 4) -> Transformer:
    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=seed)
    return model


@pytest.fixture
def kernel_refs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every kernel stood in for by its torch reference, the gemv kernels taking the CPU's tensors; returns the log
    of kernel calls."""
    calls: list[str] = []

    def logged(name: str, fn: Any, drop: tuple[str, ...] = ()) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            calls.append(name)
            return fn(*a, **{k: v for k, v in kw.items() if k not in drop})
        return call

    launch = ("stamp", "pipelined", "split_blocks_per_sm")
    monkeypatch.setattr(k_common, "supported", lambda device, dtype: True)
    monkeypatch.setattr(k_rms_norm, "rms_norm", logged("rms_norm", k_rms_norm.rms_norm_ref, ("stamp",)))
    monkeypatch.setattr(k_silu_mul, "silu_mul", logged("silu_mul", k_silu_mul.silu_mul_ref))
    monkeypatch.setattr(k_rope_kv, "rope_kv_", logged("rope_kv", k_rope_kv.rope_kv_ref_))
    monkeypatch.setattr(k_gemv, "gemv_fits", lambda x, w: x.dim() == 2 and x.shape[0] <= k_gemv.GEMV_MAX_ROWS)
    monkeypatch.setattr(k_gemv, "gemv", logged("gemv", k_gemv.gemv_ref, launch))
    monkeypatch.setattr(k_gemv, "gemv_silu_mul", logged("gemv_silu_mul", k_gemv.gemv_silu_mul_ref, launch))
    monkeypatch.setattr(k_gemv, "gemv_residual_", logged("gemv_residual_", k_gemv.gemv_residual_ref_, launch))
    return calls


# ---- which strategy runs ------------------------------------------------------------------------------------------
def test_the_torch_path_without_kernels_and_the_kernel_path_on_a_device_gemv_cannot_take() -> None:
    eng = Engine(_tiny(), RunConfig(2, 16, torch.float32, CPU))
    assert type(eng.step_ops) is TorchOps and eng.ops.gemv is None
    assert all(type(eng.ops.pick(rows)) is TorchOps for rows in (1, 4, 5, 16, 10_000))
    assert type(eng.decode_attn) is MaskedDecode and not eng.flash_decode


def test_kernels_with_gemv_on_a_cpu_run_cublas_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv asked for on the CPU: the gemv kernels take no CPU tensor (real `gemv_fits`), so every row count runs
    the kernel strategy with cuBLAS products."""
    monkeypatch.setattr(k_common, "supported", lambda device, dtype: True)
    eng = Engine(_tiny(), RunConfig(2, 16, torch.float32, CPU), options=EngineOptions(kernels=True, gemv=True))
    assert eng.ops.gemv is None and type(eng.step_ops) is KernelOps
    assert all(type(eng.ops.pick(rows)) is KernelOps for rows in (1, 4, 5, 16))


@pytest.mark.usefixtures("kernel_refs")
@pytest.mark.parametrize("max_rows", [1, 4, 8, 16])
def test_gemv_strategies_follow_the_row_count(max_rows: int) -> None:
    """Up to GEMV_NORM_MAX_ROWS rows the norm is fused, then norm first up to `gemv_max_rows`, then cuBLAS; the
    decode step's strategy is the one for the batch's rows, picked at construction."""
    options = EngineOptions(kernels=True, gemv=True, gemv_max_rows=max_rows)
    for batch in (1, 2, 6):
        eng = Engine(_tiny(), RunConfig(batch, 16, torch.float32, CPU), options=options)
        for rows in range(1, 20):
            want = (KernelOps if rows > max_rows else GemvOps if rows <= GEMV_NORM_MAX_ROWS else GemvNormFirstOps)
            assert type(eng.ops.pick(rows)) is want, (rows, max_rows)
        assert eng.step_ops is eng.ops.pick(batch)


@pytest.mark.usefixtures("kernel_refs")
def test_gemv_unset_follows_gemv_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(2, 16, torch.float32, CPU)
    assert engine_options.GEMV_BY_DEFAULT is False
    assert type(Engine(_tiny(), cfg, options=EngineOptions(kernels=True)).step_ops) is KernelOps
    monkeypatch.setattr(engine_options, "GEMV_BY_DEFAULT", True)
    assert type(Engine(_tiny(), cfg, options=EngineOptions(kernels=True)).step_ops) is GemvOps
    assert type(Engine(_tiny(), cfg, options=EngineOptions(kernels=True, gemv=False)).step_ops) is KernelOps
    assert type(Engine(_tiny(), cfg).step_ops) is TorchOps  # kernels off: no gemv, whatever the default


@pytest.mark.usefixtures("kernel_refs")
@pytest.mark.parametrize("kernels", [False, True])
def test_tensor_parallelism_wraps_the_torch_or_kernel_strategy(monkeypatch: pytest.MonkeyPatch, kernels: bool
                                                              ) -> None:
    """With tp every row count runs TensorParallelOps around torch or kernel operations, never gemv (unset gemv
    stays off even where GEMV_BY_DEFAULT is on); gemv=True with tp is refused."""
    model, ins, tp = _tiny(), Instrument("none", CPU, nvtx=False), object()
    monkeypatch.setattr(engine_options, "GEMV_BY_DEFAULT", True)
    choice = choose_ops(model, ins, EngineOptions(kernels=kernels, gemv_max_rows=16), tp)  # type: ignore[arg-type]
    for rows in (1, 4, 5, 16, 100):
        ops = choice.pick(rows)
        assert type(ops) is TensorParallelOps and ops.tp is tp
        assert type(ops.inner) is (KernelOps if kernels else TorchOps)
    if kernels:
        with pytest.raises(KvscopeError, match=r"gemv kernels run on one device.*got gemv=True"):
            choose_ops(model, ins, EngineOptions(kernels=True, gemv=True), tp)  # type: ignore[arg-type]


def test_decode_attention_is_chosen_once(monkeypatch: pytest.MonkeyPatch) -> None:
    args = PRESETS["tiny"]
    cache = KVCache(args, 2, 16, torch.float32, CPU)
    cfg = RunConfig(2, 16, torch.float32, CPU)
    assert type(make_decode_attention(cfg, args.head_dim, cache, AttentionOptions())) is MaskedDecode
    kvscope = make_decode_attention(dataclasses.replace(cfg, attn="kvscope"), args.head_dim, cache,
                                    AttentionOptions(fused_merge=True))
    assert type(kvscope) is SplitKVDecode and kvscope.options == {"fused_merge": True}
    with pytest.raises(KvscopeError, match=r"attention options \{'long_splits': False\} .* got --attn eager"):
        make_decode_attention(dataclasses.replace(cfg, attn="eager"), args.head_dim, cache,
                              AttentionOptions(long_splits=False))
    monkeypatch.setattr(decode_attn, "flash_decode_ok", lambda impl, device, dtype, head_dim: True)
    assert type(make_decode_attention(cfg, args.head_dim, cache, AttentionOptions())) is FlashDecode


@pytest.mark.parametrize("window", [None, 1, 4, 7])
def test_split_kv_attention_gets_its_options_and_equals_the_masked_path(monkeypatch: pytest.MonkeyPatch,
                                                                        window: int | None) -> None:
    """The kernel (stood in for by its reference) gets the options the engine was built with and the model's
    sliding window, every call; over the same cache and positions it gives the masked path's output (eager and
    static steps), ragged lengths shorter and longer than the window."""
    got: list[dict[str, Any]] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, **kw: Any) -> torch.Tensor:
        got.append(kw)
        return k_decode_attention.split_kv_decode_ref(q, k, v, lengths, window=kw["window"])

    monkeypatch.setattr(k_decode_attention, "split_kv_decode", kernel)
    args = dataclasses.replace(PRESETS["tiny"], sliding_window=window)
    cache = KVCache(args, 3, 16, torch.float32, CPU)
    g = torch.Generator().manual_seed(0)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    cache.start([5, 2, 9])
    cfg = RunConfig(3, 16, torch.float32, CPU, attn="kvscope")
    ours = make_decode_attention(cfg, args.head_dim, cache, AttentionOptions(fused_merge=True, long_splits=False))
    masked = make_decode_attention(dataclasses.replace(cfg, attn="sdpa"), args.head_dim, cache, AttentionOptions())
    pos = cache.lengths  # (B,)
    q = torch.randn(3, args.n_heads, args.head_dim, generator=g)  # (B, H, D)
    for i in range(args.n_layers):
        for static in (False, True):
            torch.testing.assert_close(ours.attend(i, q, ours.meta(pos, static)),
                                       masked.attend(i, q, masked.meta(pos, static)), rtol=1e-5, atol=1e-6)
    assert got == [{"fused_merge": True, "long_splits": False, "window": window}] * (2 * args.n_layers)
    if window is not None:  # and the window changed the answer for the sequence longer than it
        full = k_decode_attention.split_kv_decode_ref(q, cache.k(0), cache.v(0), pos + 1)
        assert not torch.allclose(ours.attend(0, q, ours.meta(pos, False))[2], full[2])


@pytest.mark.parametrize(("host", "static", "span", "start", "masked"), [
    ([9, 9], False, 10, 6, False),  # one length: exactly the window's 4 keys, no mask
    ([2, 9], False, 10, 0, True),  # ragged: from the shortest sequence's window, masked
    ([6, 9], False, 10, 3, True),
    ([9, 9], True, 16, 0, True),  # captured: the whole cache, masked
])
def test_masked_and_flash_decode_carry_the_window(host: list[int], static: bool, span: int, start: int,
                                                  masked: bool) -> None:
    """Window 4: the masked path reads keys start .. span - 1, its mask True exactly at pos - 4 < key <= pos; flash
    gets the window for its local attention."""
    args = dataclasses.replace(PRESETS["tiny"], sliding_window=4)
    cache = KVCache(args, 2, 16, torch.float32, CPU)
    cache.start(host)
    cfg = RunConfig(2, 16, torch.float32, CPU)
    meta = MaskedDecode(cfg, cache).meta(cache.lengths, static)
    assert (meta.span, meta.start, meta.key_mask is not None) == (span, start, masked)
    if masked:
        want = [[p - 4 < key <= p for key in range(start, span)] for p in host]
        assert meta.key_mask.view(2, span - start).tolist() == want
    flash = FlashDecode(cfg, cache).meta(cache.lengths, static)
    assert flash.window == 4 and flash.seqused.tolist() == [n + 1 for n in host]
    assert FlashDecode(cfg, KVCache(PRESETS["tiny"], 2, 16, torch.float32, CPU)).meta(cache.lengths, static).window \
        is None


# ---- options: frozen and checked ------------------------------------------------------------------------------------
def test_options_are_frozen_and_so_is_the_engine_built_from_them() -> None:
    options = EngineOptions(gemv_launch=GemvLaunchOptions(pipelined=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.gemv = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.gemv_launch.pipelined = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttentionOptions().fused_merge = True  # type: ignore[misc]
    eng = Engine(_tiny(), RunConfig(1, 8, torch.float32, CPU), options=options)
    assert eng.options is options and not eng.graphs and not eng.kernels
    for name, value in (("options", EngineOptions(kernels=True)), ("kernels", True), ("graphs", True)):
        with pytest.raises(AttributeError):
            setattr(eng, name, value)
    assert eng.options is options and not eng.kernels
    assert options.gemv_launch.kwargs() == {"pipelined": True} and EngineOptions().gemv_launch.kwargs() == {}


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EngineOptions(graphs="yes"), r"EngineOptions.graphs must be True or False, got 'yes'"),
    (lambda: EngineOptions(kernels=1), r"EngineOptions.kernels must be True or False, got 1"),
    (lambda: EngineOptions(gemv=True), r"gemv=True needs kernels=True \(got kernels=False\)"),
    (lambda: EngineOptions(kernels=True, gemv="on"), r"EngineOptions.gemv must be True, False or None, got 'on'"),
    (lambda: EngineOptions(gemv_max_rows=0), r"gemv_max_rows must be an int in \[1, 16\] .*got 0"),
    (lambda: EngineOptions(gemv_max_rows=17), r"gemv_max_rows .*got 17"),
    (lambda: EngineOptions(gemv_max_rows=True), r"gemv_max_rows .*got True"),
    (lambda: EngineOptions(gemv_launch={"pipelined": True}), r"gemv_launch must be a GemvLaunchOptions, got \{"),
    (lambda: EngineOptions(attention={}), r"attention must be an AttentionOptions, got \{\}"),
    (lambda: GemvLaunchOptions(pipelined="no"), r"GemvLaunchOptions.pipelined must be True, False or None, got 'no'"),
    (lambda: GemvLaunchOptions(split_blocks_per_sm=0), r"split_blocks_per_sm must be an int >= 1 or None, got 0"),
    (lambda: GemvLaunchOptions(split_blocks_per_sm=1.5), r"split_blocks_per_sm .*got 1.5"),
    (lambda: AttentionOptions(fused_merge=1), r"AttentionOptions.fused_merge must be True, False or None, got 1"),
    (lambda: Engine(_tiny(), RunConfig(1, 8, torch.float32, CPU), options={"graphs": False}),  # type: ignore[arg-type]
     r"options must be an EngineOptions, got \{'graphs': False\}"),
])
def test_bad_options_name_the_value(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ---- same regions, same numbers --------------------------------------------------------------------------------------
OPTION_SETS = {
    "kernels": EngineOptions(kernels=True),
    "gemv fused norm": EngineOptions(kernels=True, gemv=True),
    "gemv norm first": EngineOptions(kernels=True, gemv=True, gemv_max_rows=16),
    "gemv below the batch": EngineOptions(kernels=True, gemv=True, gemv_max_rows=1),
    "gemv launch choice": EngineOptions(kernels=True, gemv=True, gemv_max_rows=16,
                                        gemv_launch=GemvLaunchOptions(pipelined=True, split_blocks_per_sm=2)),
}


def _run(options: EngineOptions | None, batch: int) -> tuple[list[torch.Tensor], list[str]]:
    """Logits of a prefill and 4 decode steps (the static one, as a graph captures it, included); region names."""
    ins = Instrument("op", CPU, nvtx=False)
    eng = Engine(_tiny(), RunConfig(batch, 16, torch.float32, CPU), ins, options=options)
    ins.start_clock()
    eng.prefill(*pad_prompts((PROMPTS * 3)[:batch], 512, CPU))
    logits = [eng.logits.clone()]
    for _ in range(3):
        eng.decode_step()
        logits.append(eng.logits.clone())
    with torch.inference_mode():
        logits.append(eng.decode_forward(static=True).clone())
    return logits, [r["name"] for r in ins.collect()]


@pytest.mark.usefixtures("kernel_refs")
@pytest.mark.parametrize("batch", [2, 6])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_every_option_set_gives_the_torch_paths_logits_and_regions(name: str, batch: int) -> None:
    want, torch_regions = _run(None, batch)
    got, regions = _run(OPTION_SETS[name], batch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # the same regions in the same order; with kernels, RoPE's kernel writes the cache (no kv_write region)
    assert regions == [r for r in torch_regions if not r.endswith(".kv_write")]


@pytest.mark.parametrize(("name", "batch", "per_step"), [
    ("kernels", 2, {"rms_norm": 5, "silu_mul": 2, "rope_kv": 2}),
    ("gemv fused norm", 2, {"gemv": 3, "gemv_silu_mul": 2, "gemv_residual_": 4, "rope_kv": 2}),
    ("gemv norm first", 6, {"rms_norm": 5, "gemv": 3, "gemv_silu_mul": 2, "gemv_residual_": 4, "rope_kv": 2}),
    ("gemv below the batch", 2, {"rms_norm": 5, "silu_mul": 2, "rope_kv": 2}),
])
def test_a_decode_step_launches_its_strategys_kernels(kernel_refs: list[str], name: str, batch: int,
                                                      per_step: dict[str, int]) -> None:
    """The kernels of one decode step of the tiny model (2 layers), per strategy, in layer order."""
    eng = Engine(_tiny(), RunConfig(batch, 16, torch.float32, CPU), options=OPTION_SETS[name])
    eng.prefill(*pad_prompts((PROMPTS * 3)[:batch], 512, CPU))
    kernel_refs.clear()
    eng.decode_step()
    assert {k: kernel_refs.count(k) for k in set(kernel_refs)} == per_step
    layer = {"kernels": ["rms_norm", "rope_kv", "rms_norm", "silu_mul"],
             "gemv fused norm": ["gemv", "rope_kv", "gemv_residual_", "gemv_silu_mul", "gemv_residual_"],
             "gemv norm first": ["rms_norm", "gemv", "rope_kv", "gemv_residual_", "rms_norm", "gemv_silu_mul",
                                 "gemv_residual_"],
             "gemv below the batch": ["rms_norm", "rope_kv", "rms_norm", "silu_mul"]}[name]
    head = {"gemv fused norm": ["gemv"], "gemv norm first": ["rms_norm", "gemv"]}.get(name, ["rms_norm"])
    assert kernel_refs == layer * 2 + head
