"""The engine (kvscope/engine: loop, rope_kv, graphs, regions). On the CPU: overflow, static buffers, the fixed-shape
decode a CUDA graph captures, both RoPE + KV-write strategies, the alternation of captured steps, and the region
names it opens. On a GPU (marked `gpu`): a decode step captured in a CUDA graph, graphs on and off, kernels on and
off, no hidden sync in timed work, and the large presets decoding."""

from __future__ import annotations

import time

import pytest
import torch

import kvscope.engine.rope_kv as rope_kv
from kvscope.engine.graphs import CapturedStep, DecodeGraphs
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.engine.regions import EngineRegions
from kvscope.errors import KvscopeError
from kvscope.kernels import common as k_common
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.config import PRESETS
from kvscope.model.kv_cache import KVCache
from kvscope.model.layers import Transformer, rope_tables
from kvscope.model.source import resolve_model
from kvscope.model.weights import empty_model, init_random, load_model
from kvscope.profiler.instrument import Instrument
from kvscope.schema import NAMED_LAYERS, OPS, parse

CPU = torch.device("cpu")


def _tiny(seed: int) -> Transformer:
    model = empty_model(PRESETS["tiny"], CPU, torch.float32)
    init_random(model, seed=seed)
    return model


def test_overflow_is_a_clear_error_before_any_write() -> None:
    eng = Engine(_tiny(1), RunConfig(2, 8, torch.float32, CPU))
    eng.prefill(*pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8]], 512, CPU))
    assert eng.cache.lengths.tolist() == [3, 5] == eng.cache.host_lengths
    for _ in range(3):
        eng.decode_step()
    assert eng.cache.lengths.tolist() == [6, 8]
    before = eng.cache.data.clone()
    with pytest.raises(KvscopeError, match="KV cache overflow: a sequence would reach 9 positions, cache holds 8"):
        eng.decode_step()
    assert torch.equal(before, eng.cache.data)


def test_decode_step_reuses_its_static_buffers() -> None:
    eng = Engine(_tiny(0), RunConfig(1, 16, torch.float32, CPU))
    eng.prefill(*pad_prompts([[1, 2]], 512, CPU))
    tokens, lengths = eng.next_tokens.data_ptr(), eng.cache.lengths.data_ptr()
    out = eng.decode_step()
    assert out.data_ptr() == tokens and eng.cache.lengths.data_ptr() == lengths


def test_static_decode_path_gives_the_same_tokens() -> None:
    """The fixed-shape decode (full cache + mask, what a CUDA graph captures) equals the eager one."""
    model = _tiny(3)
    prompts = [[5, 6, 7, 8, 9], [1, 2], [3, 3, 3, 3]]
    eager = Engine(model, RunConfig(3, 16, torch.float32, CPU)).generate(prompts, 8)
    eng = Engine(model, RunConfig(3, 16, torch.float32, CPU))
    eng.prefill(*pad_prompts(prompts, 512, CPU))
    out = [eng.next_tokens.clone()]
    with torch.inference_mode():
        for _ in range(7):
            eng.decode_forward(static=True)
            eng.cache.advance()
            out.append(eng.next_tokens.clone())
    assert torch.stack(out, dim=1).tolist() == eager


def test_prefill_with_broadcast_rope_tables_writes_the_same_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above PREFILL_ROPE_TABLE_MAX_BYTES the prefill keeps broadcast tables and writes K and V separately; the
    cache and the tokens are the same as with materialised tables (one K|V write)."""
    model = _tiny(3)
    prompts = [[5, 9, 2, 7, 1], [4, 4, 8]]
    runs = []
    for limit in (rope_kv.PREFILL_ROPE_TABLE_MAX_BYTES, 0):
        monkeypatch.setattr(rope_kv, "PREFILL_ROPE_TABLE_MAX_BYTES", limit)
        eng = Engine(model, RunConfig(2, 12, torch.float32, CPU))
        tokens = eng.generate(prompts, 4)
        runs.append((tokens, eng.cache.data.clone()))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


def test_the_strategy_is_chosen_at_construction() -> None:
    eng = Engine(_tiny(0), RunConfig(1, 8, torch.float32, CPU))
    assert type(eng.rope_kv) is rope_kv.TorchRopeKV and eng.decode_graphs is None
    with pytest.raises(KvscopeError, match=r"kernels need a CUDA device and float32/bfloat16/float16, got cpu "
                                           r"float32 \(--kernels off\)"):
        Engine(_tiny(0), RunConfig(1, 8, torch.float32, CPU), options=EngineOptions(kernels=True))
    with pytest.raises(KvscopeError, match="CUDA graphs need a CUDA device"):
        Engine(_tiny(0), RunConfig(1, 8, torch.float32, CPU), options=EngineOptions(graphs=True))


def _strategies(b: int, s_max: int) -> tuple[rope_kv.RopeKV, rope_kv.RopeKV]:
    """The torch and the fused strategy of the tiny model over caches of their own (same tables)."""
    args = PRESETS["tiny"]
    cos, sin_rot = rope_tables(args, s_max, CPU, torch.float32)
    ins, regions = Instrument("none", CPU, nvtx=False), EngineRegions(args.n_layers, stamped=False)
    torch_way, fused = (rope_kv.make_rope_kv(kernels, args, KVCache(args, b, s_max, torch.float32, CPU), cos, sin_rot,
                                             ins, regions) for kernels in (False, True))
    return torch_way, fused


def test_fused_strategy_equals_the_torch_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel replaced by its torch reference (the GPU tests check the kernel against it), the fused
    strategy returns the same q, k, v and writes the same cache as the torch one, in prefill and at ragged decode
    positions; it builds no tables."""
    monkeypatch.setattr(k_rope_kv, "rope_kv_", k_rope_kv.rope_kv_ref_)
    args = PRESETS["tiny"]
    h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
    torch_way, fused = _strategies(3, 16)
    assert type(fused) is rope_kv.FusedRopeKV
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 5, h + 2 * hkv, d, generator=g)  # (B, S, H+2H_kv, D)
    for i in range(args.n_layers):
        got = fused.prefill(i, qkv.clone(), fused.prefill_tables(3, 5))
        want = torch_way.prefill(i, qkv.clone(), torch_way.prefill_tables(3, 5))
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert fused.prefill_tables(3, 5) == rope_kv.PrefillTables()
    pos = torch.tensor([5, 2, 9])  # (B,)
    step = torch.randn(3, 1, h + 2 * hkv, d, generator=g)  # (B, 1, H+2H_kv, D)
    for i in range(args.n_layers):
        got = fused.decode(i, step.clone(), fused.decode_tables(pos))
        torch.testing.assert_close(got, torch_way.decode(i, step.clone(), torch_way.decode_tables(pos)), rtol=0,
                                   atol=0)
    torch.testing.assert_close(fused.cache.data, torch_way.cache.data, rtol=0, atol=0)


def test_kernels_path_of_the_loop_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine with kernels on, each kernel stood in for by its torch reference: the same greedy tokens as with
    kernels off (float32), and no `kv_write` region (the fused kernel's `rope` covers the cache write)."""
    monkeypatch.setattr(k_common, "supported", lambda device, dtype: True)
    monkeypatch.setattr(k_rms_norm, "rms_norm", lambda x, w, eps, stamp=None: k_rms_norm.rms_norm_ref(x, w, eps))
    monkeypatch.setattr(k_silu_mul, "silu_mul", k_silu_mul.silu_mul_ref)
    monkeypatch.setattr(k_rope_kv, "rope_kv_", k_rope_kv.rope_kv_ref_)
    model = _tiny(4)
    prompts = [[7, 1, 8, 2, 8], [3, 1]]
    off = Engine(model, RunConfig(2, 16, torch.float32, CPU)).generate(prompts, 6)
    ins = Instrument("op", CPU, nvtx=False)
    eng = Engine(model, RunConfig(2, 16, torch.float32, CPU), ins, options=EngineOptions(kernels=True))
    assert type(eng.rope_kv) is rope_kv.FusedRopeKV
    ins.start_clock()
    assert eng.generate(prompts, 6) == off
    ops = {r["op"] for r in ins.collect() if r["level"] == "op"}
    assert ops == set(OPS) - {"kv_write"}


def test_region_names_come_from_the_schema() -> None:
    """Every region the engine opens parses back (kvscope.schema.parse) to its own level, layer and op;
    all ops and named layers appear, once per layer and step."""
    ins = Instrument("op", CPU, nvtx=False)
    eng = Engine(_tiny(0), RunConfig(1, 8, torch.float32, CPU), ins)
    ins.start_clock()
    eng.generate([[1, 2, 3]], 3)
    rows = ins.collect()
    for r in rows:
        keys = parse(r["name"])
        assert keys is not None and keys.level == r["level"], r["name"]
        assert (keys.layer, keys.op) == (r["layer"], r["op"]), r["name"]
    names = [r["name"] for r in rows]
    assert {"prefill", "decode", "decode step 1", "decode step 2", *NAMED_LAYERS} <= set(names)
    n_layers = PRESETS["tiny"].n_layers
    assert names.count("L00.attn") == names.count("L01.kv_write") == 3  # prefill and two steps
    assert sum(r["level"] == "op" for r in rows) == 3 * n_layers * len(OPS)


class _FakeGraph:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def replay(self) -> None:
        self.log.append(f"replay {self.name}")


class _FakeInstrument:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def before_replay(self, timer: object) -> None:
        self.log.append(f"read {timer}")

    def replayed(self, timer: object) -> None:
        self.log.append(f"replayed {timer}")


def test_two_captured_steps_alternate_and_each_is_read_before_its_replay() -> None:
    """With marks, two graphs alternate; each one's marks are read just before it replays again (two steps later),
    and each replay returns its own logits buffer. One graph without marks is replayed with no read."""
    log: list[str] = []
    graphs = DecodeGraphs(_FakeInstrument(log), CPU, marks=0, stamps=False)  # type: ignore[arg-type]
    logits = [torch.zeros(1), torch.ones(1)]
    graphs.steps = [CapturedStep(_FakeGraph(log, n), x, n) for n, x in zip("ab", logits, strict=True)]  # type: ignore
    out = []
    for _ in range(4):
        out.append(graphs.replay(graphs.next_step()))
    assert log == ["read a", "replay a", "replayed a", "read b", "replay b", "replayed b"] * 2
    assert [o is x for o, x in zip(out, logits * 2, strict=True)] == [True] * 4 and graphs.replays == 4
    log.clear()
    single = DecodeGraphs(_FakeInstrument(log), CPU, marks=0, stamps=False)  # type: ignore[arg-type]
    single.steps = [CapturedStep(_FakeGraph(log, "a"), logits[0], None)]  # type: ignore[arg-type]
    for _ in range(2):
        single.replay(single.next_step())
    assert log == ["replay a"] * 2


# ---- on a GPU (marked `gpu`, skipped without CUDA) ---------------------------------------------------------------
CUDA = torch.device("cuda")
PROMPT = [151, 9906, 11, 1879, 0, 374, 264, 1273, 315, 279, 12850, 13, 576, 6722, 315, 9625]


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph() -> None:
    """A decode step (forward + length update) replays from a CUDA graph with the same tokens as eager."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.float32, seed=1)
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:12]]
    steps = 12
    eager = Engine(model, RunConfig(3, 32, torch.float32, CUDA)).generate(prompts, steps)

    eng = Engine(model, RunConfig(3, 32, torch.float32, CUDA))
    eng.prefill(*pad_prompts(prompts, model.args.vocab_size, CUDA))
    first = eng.next_tokens.clone()
    snapshot = (eng.cache.data.clone(), eng.cache.lengths.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):  # warm-up outside the graph
            eng.decode_forward(static=True)
            eng.cache.lengths.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        eng.decode_forward(static=True)
        eng.cache.lengths.add_(1)
    eng.cache.data.copy_(snapshot[0])
    eng.cache.lengths.copy_(snapshot[1])
    eng.next_tokens.copy_(first)
    out = [first]
    for _ in range(steps - 1):
        graph.replay()
        out.append(eng.next_tokens.clone())
    assert torch.stack(out, dim=1).tolist() == eager


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen2.5-3b", "llama-3.1-8b"])
def test_large_presets_initialise_and_decode(preset: str) -> None:
    """The large presets load, and their greedy tokens are the same with decode steps replayed from a CUDA graph
    and run eagerly (bf16, kvscope's kernels, flash attention over the cache in place both ways)."""
    torch.cuda.empty_cache()
    model, ready_s = load_model(resolve_model(preset), CUDA, torch.bfloat16, seed=0)
    prompts = [list(range(100, 228)), list(range(7, 71))]
    eager = Engine(model, RunConfig(2, 160, torch.bfloat16, CUDA), options=EngineOptions(kernels=True))
    t0 = time.perf_counter()
    tokens = eager.generate(prompts, 32)
    gen_s = time.perf_counter() - t0
    graphed = Engine(model, RunConfig(2, 160, torch.bfloat16, CUDA), options=EngineOptions(graphs=True, kernels=True))
    print(f"{preset}: ready in {ready_s:.2f} s, prefill 128+64 and 32 eager decode steps in {gen_s:.2f} s")
    assert ready_s < 30
    assert graphed.generate(prompts, 32) == tokens
    assert [len(row) for row in tokens] == [32, 32]
    assert len({t for row in tokens for t in row}) > 1  # not one token repeated: the logits carry information
    assert torch.isfinite(eager.logits.float()).all() and torch.isfinite(graphed.logits.float()).all()
    del eager, graphed, model
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["none", "phase"])
def test_timed_prefill_and_decode_have_no_hidden_sync(granularity: str) -> None:
    """With torch's sync debug mode set to raise, a timed prefill (KVCache.start included) and graph-replayed
    decode steps run: no operation inside them waits for the GPU."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.bfloat16, seed=3)
    ins = Instrument(granularity, CUDA, nvtx=False)
    eng = Engine(model, RunConfig(2, 96, torch.bfloat16, CUDA), ins, options=EngineOptions(graphs=True, kernels=True))
    tokens = torch.randint(0, model.args.vocab_size, (2, 48), device=CUDA)
    with ins.paused():
        eng.prefill(tokens, [48, 48])
        eng.decode_n(8)  # warm-up: compiles the kernels, captures the decode graph
    ins.start_clock()
    ins.reserve(64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with ins.region("rep 0", "rep", rep=0):
            eng.prefill(tokens, [48, 48])
            out = eng.decode_n(16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows = ins.collect()
    assert out.shape == (2, 17)
    assert len(rows) == (0 if granularity == "none" else 1 + 2 + 16)


@pytest.mark.gpu
def test_graphs_on_and_off_give_the_same_tokens() -> None:
    """Greedy tokens with decode steps replayed from a CUDA graph equal the eager loop's (float32)."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.float32, seed=2)
    prompts = [PROMPT, PROMPT[:7], PROMPT[2:]]
    off = Engine(model, RunConfig(3, 64, torch.float32, CUDA)).generate(prompts, 24)
    eng = Engine(model, RunConfig(3, 64, torch.float32, CUDA), options=EngineOptions(graphs=True))
    assert eng.generate(prompts, 24) == off
    assert eng.generate(prompts, 24) == off  # the graph is reused after a new prefill


@pytest.mark.gpu
def test_graphs_on_and_off_give_the_same_tokens_bf16_flash() -> None:
    """bfloat16 decode runs flash attention over the cache in place, eagerly and in the graph alike: same tokens."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.bfloat16, seed=2)
    prompts = [PROMPT, PROMPT[:7], PROMPT[2:]]
    off_engine = Engine(model, RunConfig(3, 64, torch.bfloat16, CUDA))
    assert off_engine.flash_decode
    off = off_engine.generate(prompts, 24)
    graphed = Engine(model, RunConfig(3, 64, torch.bfloat16, CUDA), options=EngineOptions(graphs=True))
    assert graphed.generate(prompts, 24) == off


@pytest.mark.gpu
def test_engine_kernels_on_and_off_agree() -> None:
    """float32: the same greedy tokens with kernels on and off, eagerly and from the graph; bfloat16: logits of the
    prefill and of a decode step within bf16 rounding of each other."""
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.float32, seed=3)
    prompts = [list(range(10, 40)), list(range(50, 61)), list(range(3, 27))]
    off = Engine(model, RunConfig(3, 64, torch.float32, CUDA)).generate(prompts, 20)
    for graphs in (False, True):
        on = Engine(model, RunConfig(3, 64, torch.float32, CUDA), options=EngineOptions(graphs=graphs, kernels=True))
        assert on.generate(prompts, 20) == off
    del model
    model, _ = load_model(resolve_model("qwen2.5-0.5b"), CUDA, torch.bfloat16, seed=3)
    logits = []
    for kernels in (False, True):
        eng = Engine(model, RunConfig(3, 64, torch.bfloat16, CUDA), options=EngineOptions(kernels=kernels))
        eng.generate(prompts, 2)
        logits.append(eng.logits.float())
    rel = ((logits[0] - logits[1]).norm() / logits[0].norm()).item()
    print(f"bf16 logits, kernels on vs off: relative difference {rel:.2e}")
    assert rel < 2e-2
