"""Prefills replayed from CUDA graphs per length bucket (kvscope/engine/prefill_graphs.py). On the CPU: the bucket
choice, the padding of the static input, the switch and its flag, and the engine's bucketed path with a stand-in
for the graph (a replay runs the captured forward again over the static buffer): the logits of padded prompts and
the decode steps after them equal the eager prefill's. On a GPU (marked `gpu`): captured prefills against eager ones
(logits and tokens), one graph per bucket, reuse across calls, no hidden sync, and `kvscope run` both ways."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvscope.cli import build_parser, main
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig, use_prefill_graphs
from kvscope.engine.prefill_graphs import DEFAULT_BUCKETS, PrefillGraph, PrefillGraphs, bucket_for, check_buckets
from kvscope.errors import KvscopeError
from kvscope.measure.options import run_spec
from kvscope.model.config import PRESETS
from kvscope.model.layers import Transformer
from kvscope.model.weights import empty_model, init_random
from kvscope.profiler.instrument import Instrument
from kvscope.schema import CUDA_CLOCK

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _tiny(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    model = empty_model(PRESETS["tiny"], device, dtype)
    init_random(model, seed=seed)
    return model


def test_default_buckets_are_powers_of_two_up_to_4096() -> None:
    assert DEFAULT_BUCKETS == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.mark.parametrize(("s", "max_seq", "bucket"), [
    (1, 8192, 16), (16, 8192, 16), (17, 8192, 32), (512, 8192, 512), (513, 8192, 1024), (4096, 8192, 4096),
    (4097, 8192, None),
    (100, 120, 120),  # the cache holds 120 positions: the 128 bucket is cut to them
    (120, 120, 120),
    (5, 10, 10),
])
def test_bucket_choice(s: int, max_seq: int, bucket: int | None) -> None:
    assert bucket_for(s, DEFAULT_BUCKETS, max_seq) == bucket


def test_configured_buckets() -> None:
    assert check_buckets([300, 100, 300, 2000]) == (100, 300, 2000)
    assert bucket_for(101, (100, 300, 2000), 4000) == 300
    assert bucket_for(2001, (100, 300, 2000), 4000) is None
    for bad in ([], [0], [-16], [True], [2.5]):
        with pytest.raises(KvscopeError, match="prefill graph buckets"):
            check_buckets(bad)


def test_the_switch_and_its_flag(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert use_prefill_graphs(None, CUDA, graphs=True) is True
    assert use_prefill_graphs(None, CUDA, graphs=False) is False  # follows --graphs
    assert use_prefill_graphs(None, CUDA, graphs=True, own_loop=False) is False  # a transformers engine
    assert use_prefill_graphs(None, CPU, graphs=False) is False
    assert use_prefill_graphs(True, CUDA, graphs=False) is True
    assert use_prefill_graphs(False, CUDA, graphs=True) is False
    with pytest.raises(KvscopeError, match=r"^--prefill-graphs on needs a CUDA device$"):
        use_prefill_graphs(True, CPU, graphs=False)
    with pytest.raises(KvscopeError, match=r"--engine kvscope"):
        use_prefill_graphs(True, CUDA, graphs=True, own_loop=False)
    parser = build_parser()
    assert run_spec(parser.parse_args(["run", "--prefill-graphs", "off"])).prefill_graphs is False
    assert run_spec(parser.parse_args(["run", "--prefill-graphs", "on"])).prefill_graphs is True
    assert run_spec(parser.parse_args(["run"])).prefill_graphs is None
    out = tmp_path / "run"
    assert main(["run", "--device", "cpu", "--prefill-graphs", "on", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvscope: error: --prefill-graphs on needs a CUDA device"]
    assert not out.exists()
    with pytest.raises(KvscopeError, match="prefill graphs need a CUDA device"):
        PrefillGraphs(Instrument("none", CPU, nvtx=False), CPU, 1, 64)


class _ReplayedGraph:
    """Stands in for a captured graph: a replay records the static input it sees."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer, self.seen = buffer, []

    def replay(self) -> None:
        self.seen.append(self.buffer.clone())


def test_replay_copies_the_prompts_and_zeroes_the_padding() -> None:
    tokens = torch.full((2, 16), 7, dtype=torch.int64)  # (B, bucket), last call's content
    graph = _ReplayedGraph(tokens)
    g = PrefillGraph(graph, tokens, torch.zeros(2, 3))  # type: ignore[arg-type]
    prompts = torch.arange(10, dtype=torch.int64).view(2, 5) + 1  # (B, S)
    assert PrefillGraphs.replay(g, prompts) is g.logits
    [seen] = graph.seen
    assert torch.equal(seen[:, :5], prompts) and torch.equal(seen[:, 5:], torch.zeros(2, 11, dtype=torch.int64))
    PrefillGraphs.replay(g, torch.ones(2, 16, dtype=torch.int64))  # a full bucket: nothing to zero
    assert torch.equal(graph.seen[1], torch.ones(2, 16, dtype=torch.int64))


class _EagerPrefillGraphs(PrefillGraphs):
    """The engine's bucketed path on the CPU: "capture" keeps the forward, a "replay" runs it again over the static
    buffer and copies its logits into the graph's output, as a replay rewrites the captured buffer."""

    def __init__(self, ins: Instrument, batch: int, max_seq: int, buckets: tuple[int, ...]) -> None:
        super().__init__(ins, CUDA, batch, max_seq, buckets)  # no CUDA call is made here
        self.device = CPU
        self.captures = 0

    def _capture(self, bucket: int, forward: Callable[[torch.Tensor], torch.Tensor]) -> PrefillGraph:
        self.captures += 1
        tokens = torch.zeros(self.batch, bucket, dtype=torch.int64)
        with self.ins.paused():
            logits = forward(tokens).clone()
        owner = self

        class Graph:
            def replay(self) -> None:
                with owner.ins.paused():
                    logits.copy_(forward(tokens))

        return PrefillGraph(Graph(), tokens, logits)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompts", [[[5, 9, 2], [7, 1, 1, 3, 8, 4, 2]], [[3] * 11, [4] * 11]])
def test_bucketed_prefill_equals_the_eager_one_and_decode_ignores_the_padding(prompts: list[list[int]]) -> None:
    """Prompts padded to a 16-token bucket: same first tokens and logits as the eager prefill, and the same decode
    steps after it although the padding wrote K/V beyond each prompt."""
    model = _tiny(CPU, torch.float32)
    cfg = RunConfig(2, 24, torch.float32, CPU)
    eager = Engine(model, cfg)
    bucketed = Engine(model, cfg)
    bucketed.prefill_graphs = _EagerPrefillGraphs(bucketed.ins, 2, cfg.max_seq, (4, 16))
    tokens, lengths = pad_prompts(prompts, model.args.vocab_size, CPU)
    first_eager = eager.prefill(tokens, lengths).clone()
    first_bucketed = bucketed.prefill(tokens, lengths).clone()
    assert bucketed.prefill_graphs.captures == 1 and set(bucketed.prefill_graphs.graphs) == {16}
    assert torch.equal(first_bucketed, first_eager)
    torch.testing.assert_close(bucketed.logits, eager.logits, atol=1e-5, rtol=1e-5)
    positions = torch.arange(24)
    beyond = positions.view(1, 24) >= torch.tensor(lengths).view(2, 1)  # (B, S_max) cache positions past a prompt
    assert beyond[:, :16].any() and (bucketed.cache.data[:, :, beyond & (positions < 16)] != 0).any()
    assert torch.equal(bucketed.decode_n(6), eager.decode_n(6))
    torch.testing.assert_close(bucketed.logits, eager.logits, atol=1e-5, rtol=1e-5)
    # a second prefill in the same bucket reuses the graph
    bucketed.prefill(tokens, lengths)
    assert bucketed.prefill_graphs.captures == 1


def test_prompts_longer_than_every_bucket_and_finer_timing_run_eagerly() -> None:
    model = _tiny(CPU, torch.float32)
    cfg = RunConfig(1, 40, torch.float32, CPU)
    eng = Engine(model, cfg)
    eng.prefill_graphs = _EagerPrefillGraphs(eng.ins, 1, cfg.max_seq, (8,))
    eng.prefill(torch.ones(1, 9, dtype=torch.int64), [9])
    assert eng.prefill_graphs.captures == 0
    assert eng.prefill_graphs.usable(8)
    eng.prefill_graphs.ins = Instrument("layer", CPU, nvtx=False)
    eng.prefill_graphs.ins.clock = CUDA_CLOCK  # what graph_timed() looks at: layer regions on CUDA events
    assert not eng.prefill_graphs.usable(8)


# ---- GPU ------------------------------------------------------------------------------------------------------
def _gpu_engines(dtype: torch.dtype, kernels: bool, batch: int, max_seq: int) -> tuple[Engine, Engine]:
    model = _tiny(CUDA, dtype)
    options = EngineOptions(kernels=kernels)
    graphs = Engine(model, RunConfig(batch, max_seq, dtype, CUDA, prefill_graphs=True), options=options)
    eager = Engine(model, RunConfig(batch, max_seq, dtype, CUDA), options=options)
    return graphs, eager


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [False, True])
def test_gpu_captured_prefill_equals_eager(dtype: torch.dtype, kernels: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if kernels:
        pytest.importorskip("cupy")
    graphs, eager = _gpu_engines(dtype, kernels, batch=3, max_seq=80)
    vocab = graphs.args.vocab_size
    g = torch.Generator().manual_seed(3)
    for lengths in ([5, 13, 9], [20, 33, 27]):  # buckets 16 and 64
        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
        tokens, lens = pad_prompts(prompts, vocab, CUDA)
        for _ in range(2):  # the first call captures, the second replays the same graph
            got = graphs.prefill(tokens, lens).clone()
        # exact against the eager prefill over the same padded shape (the same kernels run)
        bucket = max(graphs.prefill_graphs.graphs)
        padded = torch.zeros(3, bucket, dtype=torch.int64, device=CUDA)
        padded[:, :tokens.shape[1]] = tokens
        want = eager.prefill(padded, lens).clone()
        assert torch.equal(got, want)
        assert torch.equal(graphs.logits, eager.logits)
        # against the unpadded eager prefill: other matmul shapes, so within rounding; greedy tokens equal
        want_unpadded = eager.prefill(tokens, lens).clone()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(graphs.logits.float(), eager.logits.float(), atol=tol, rtol=tol)
        if dtype == torch.float32:
            assert torch.equal(got, want_unpadded)
            assert torch.equal(graphs.decode_n(5), eager.decode_n(5))
    assert sorted(graphs.prefill_graphs.graphs) == [16, 64]


@pytest.mark.gpu
def test_gpu_replayed_prefill_has_no_hidden_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    graphs, _ = _gpu_engines(torch.bfloat16, False, batch=2, max_seq=600)
    tokens = torch.randint(0, graphs.args.vocab_size, (2, 500), device=CUDA)
    graphs.prefill(tokens, [500, 500])  # captures the 512 bucket
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphs.prefill(tokens, [500, 500])  # equal lengths: the cache's lengths are a fill, no copy
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert list(graphs.prefill_graphs.graphs) == [512]


@pytest.mark.gpu
@pytest.mark.parametrize("flag", ["on", "off"])
def test_gpu_run_with_and_without_prefill_graphs(tmp_path, flag: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import pandas as pd

    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--seq", "100", "--gen-tokens", "4", "--warmup", "1", "--reps", "3",
                 "--prefill-graphs", flag, "--out", str(out)]) == 0
    summary = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert summary["prefill_p50_ms"] > 0
    timings = pd.read_parquet(out / "timings.parquet")
    assert (timings["name"] == "prefill").sum() == 3
