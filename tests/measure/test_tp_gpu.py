"""Tensor parallelism on CUDA (NCCL): tp=1 through the collectives on one GPU, with CUDA graphs and kvscope's
kernels, equals the one-GPU engine bit for bit; tp=2 (two GPUs or more) equals tp=1 within float32 tolerance; and
`kvscope run --tp` writes its all-reduce regions from inside the captured decode step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvscope.cli import main
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunSpec, prepare
from kvscope.measure.tp_generate import generate_tp
from kvscope.model.weights import load_model
from kvscope.schema import COLLECTIVE_OPS

pytestmark = pytest.mark.gpu
PROMPTS = [[11, 7, 500, 3, 9, 41], [2, 90, 17]]
GEN = 6


def _one_gpu(spec: RunSpec, gemv: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    plan = prepare(spec, prompts=PROMPTS)
    model, _ = load_model(plan.source, plan.cfg.device, plan.cfg.dtype, seed=plan.spec.seed)
    # gemv as the tensor-parallel path runs it: cuBLAS products, never the gemv kernels
    engine = Engine(model, plan.cfg, options=EngineOptions(graphs=plan.graphs, kernels=plan.kernels, gemv=gemv))
    out = [engine.prefill(*pad_prompts(PROMPTS, plan.source.args.vocab_size, plan.cfg.device)).clone()]
    logits = [engine.logits.float().cpu()]
    for _ in range(GEN - 1):
        out.append(engine.decode_step().clone())
        logits.append(engine.logits.float().cpu())
    return torch.stack(out, dim=1).tolist(), logits


def test_tp1_nccl_graphs_and_kernels_equal_one_gpu_exactly() -> None:
    spec = RunSpec(model="qwen2.5-0.5b", device="cuda", dtype="bfloat16", gen_tokens=GEN)  # graphs, kernels on
    tokens, logits = _one_gpu(spec, gemv=False)
    plan = prepare(spec, prompts=PROMPTS)
    assert plan.graphs and plan.kernels
    got = generate_tp(plan, PROMPTS, GEN, 1, keep_logits=True)
    assert got is not None and got.tokens == tokens
    for a, b in zip(got.logits, logits, strict=True):
        assert torch.equal(a, b)  # rank 0 of 1: the same products, an all-reduce and a gather of one rank


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_nccl_equals_one_gpu_in_float32() -> None:
    spec = RunSpec(model="qwen2.5-0.5b", device="cuda", dtype="float32", gen_tokens=GEN, kernels=False)
    tokens, logits = _one_gpu(replace(spec, graphs=False), gemv=False)
    got = generate_tp(prepare(spec, prompts=PROMPTS), PROMPTS, GEN, 2, keep_logits=True)  # graphs on
    assert got is not None and got.tokens == tokens
    for a, b in zip(got.logits, logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-4), float((a - b).abs().max())


def test_run_tp1_on_one_gpu_times_the_all_reduces_inside_the_graph(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", "qwen2.5-0.5b", "--tp", "1", "--seq", "128", "--gen-tokens", "8", "--reps", "3",
                 "--granularity", "op", "--out", str(out)]) == 0
    t = pd.read_parquet(out / "timings.parquet")
    assert set(t["rank"]) == {0}
    comm = t[t["op"].isin(COLLECTIVE_OPS)]
    layers = 24
    assert len(comm) == 3 * 8 * layers * 2  # 3 reps x (prefill + 7 steps) x 24 layers x 2 all-reduces
    assert set(comm.loc[comm["phase"] == "decode", "clock"]) == {"cuda-graph"}
    assert (comm["dur_ms"] > 0).all()
    summary = pd.read_parquet(out / "summary.parquet")
    assert int(summary["tp"].iloc[0]) == 1 and bool(summary["cuda_graphs"].iloc[0])
