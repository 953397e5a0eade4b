"""`--engine transformers` and `transformers-compiled` (kvscope.engine.hf): transformers' own loop over the same
weights gives kvscope's greedy tokens, writes the same run folder with the same region names, measures its cache, and
refuses what it cannot do in one line. The compiled engine's tokens are checked on the GPU (torch.compile takes
15-40 s on this CPU)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_checks import fail
from helpers import TINY_CONFIGS

from kvscope.engine.hf import HfEngine
from kvscope.engine.plan import RunSpec, prepare
from kvscope.io import read_metadata
from kvscope.measure.run import execute, load_for, make_engine, measure
from kvscope.model.config import ModelArgs

GEN = 10
PROMPTS = [[5, 17, 42, 3, 99, 11, 250, 7, 64], [4, 8, 15, 16, 23, 42, 108, 1, 2]]
RAGGED = [[1, 2, 3, 4, 5, 6, 7], [200, 13], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 77]]


def _config_file(tmp_path: Path, family: str) -> str:
    """A tiny architecture of `family` as a config.json: a `--model` of random weights from kvscope's seed."""
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(TINY_CONFIGS[family]))
    return str(path)


def _tokens(model: str, engine: str, prompts: list[list[int]], seed: int = 3, attn: str = "sdpa"
            ) -> list[list[int]]:
    plan = prepare(RunSpec(model=model, dtype="float32", device="cpu", seed=seed, gen_tokens=GEN, engine=engine,
                           attn=attn), prompts=prompts)
    loaded, _ = load_for(plan)
    if engine != "kvscope":
        assert loaded.config._attn_implementation == attn  # --attn is transformers' attn_implementation
    return make_engine(loaded, plan).generate(prompts, GEN)


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3-scaled", "mistral", "mistral-window"])
def test_eager_tokens_equal_kvscope_engine(tmp_path: Path, family: str) -> None:
    """float32 on the CPU, random weights of one seed: the same greedy tokens, a uniform and a ragged batch."""
    model = _config_file(tmp_path, family)
    for prompts in (PROMPTS, RAGGED):
        ours = _tokens(model, "kvscope", prompts)
        theirs = _tokens(model, "transformers", prompts)
        assert theirs == ours, f"{family}: {theirs} != {ours}"
        assert all(len(row) == GEN for row in ours)


def test_eager_attention_tokens_equal(tmp_path: Path) -> None:
    model = _config_file(tmp_path, "qwen2")
    assert _tokens(model, "transformers", RAGGED, attn="eager") == _tokens(model, "kvscope", RAGGED, attn="eager")


def test_tiny_preset_tokens_and_seed() -> None:
    """The `tiny` preset (llama family): equal tokens for one seed; another seed makes other weights, so other
    tokens, in both engines alike."""
    a = _tokens("tiny", "transformers", PROMPTS, seed=0)
    assert a == _tokens("tiny", "kvscope", PROMPTS, seed=0)
    b = _tokens("tiny", "transformers", PROMPTS, seed=1)
    assert b == _tokens("tiny", "kvscope", PROMPTS, seed=1)
    assert a != b


def _run(tmp_path: Path, engine: str, name: str, granularity: str = "layer") -> tuple[Path, pd.DataFrame,
                                                                                    pd.DataFrame]:
    res = execute(RunSpec(model="tiny", device="cpu", batch_size=2, seq=12, gen_tokens=4, warmup=1, reps=2,
                          granularity=granularity, engine=engine, out=str(tmp_path / name)))
    return res.out_dir, pd.read_parquet(res.out_dir / "timings.parquet"), pd.read_parquet(res.out_dir /
                                                                                          "summary.parquet")


def test_run_folder_matches_kvscope_run(tmp_path: Path) -> None:
    """Same files, same columns, same region names and counts per level at layer granularity; `engine` in the summary
    and the metadata; the cache bytes measured from transformers' DynamicCache."""
    ours_dir, ours_t, ours_s = _run(tmp_path, "kvscope", "ours")
    hf_dir, hf_t, hf_s = _run(tmp_path, "transformers", "hf")
    assert sorted(p.name for p in hf_dir.iterdir()) == sorted(p.name for p in ours_dir.iterdir())
    assert list(hf_t.columns) == list(ours_t.columns)
    assert list(hf_s.columns) == list(ours_s.columns)
    assert set(hf_t["name"]) == set(ours_t["name"])
    assert {"embed", "L00", "L01", "lm_head", "sample", "prefill", "decode", "decode step 3"} <= set(hf_t["name"])
    levels = ["run", "rep", "phase", "step", "layer"]
    assert hf_t.groupby("level").size()[levels].tolist() == ours_t.groupby("level").size()[levels].tolist()
    # per repetition: one prefill and 3 decode steps, each with embed, 2 layers, lm_head and sample
    assert hf_t.groupby("level").size()[levels].tolist() == [1, 2, 4, 6, 2 * 4 * 5]
    assert hf_s["engine"].tolist() == ["transformers"] and ours_s["engine"].tolist() == ["kvscope"]
    meta = read_metadata(hf_dir / "summary.parquet")
    assert meta["engine"] == "transformers" and meta["run"]["engine"] == "transformers"
    args = ModelArgs.from_preset("tiny")
    # the cache after the last step holds prompt + 3 decode inputs: L x (K, V) x B x 15 tokens x H_kv x D x 4 bytes
    held = args.n_layers * 2 * 2 * (12 + 3) * args.n_kv_heads * args.head_dim * 4
    assert meta["kv_cache"] == {"bytes": held, "alloc_bytes": held, "cache": "DynamicCache",
                                "shape": [args.n_layers, 2, 2, args.n_kv_heads, 15, args.head_dim]}
    assert hf_s["kv_cache_bytes"].tolist() == [held]
    # kvscope's cache is allocated for the whole context (prompt + 4 new tokens)
    assert ours_s["kv_cache_bytes"].tolist() == [args.n_layers * 2 * 2 * 16 * args.n_kv_heads * args.head_dim * 4]


def test_phase_granularity_has_no_layer_rows(tmp_path: Path) -> None:
    _, t, s = _run(tmp_path, "transformers", "phase", granularity="phase")
    assert set(t["level"]) == {"run", "rep", "phase", "step"}
    assert sorted(t.loc[t["level"] == "step", "name"].unique()) == ["decode step 1", "decode step 2",
                                                                    "decode step 3"]
    assert s["cuda_graphs"].tolist() == [False] and s["kernels"].tolist() == [False]


def test_hooks_removed_after_measure(tmp_path: Path) -> None:
    """A sweep measures one loaded model at several points: no hook of one point is left for the next."""
    plan = prepare(RunSpec(model="tiny", device="cpu", seq=6, gen_tokens=3, warmup=0, reps=1, granularity="layer",
                           engine="transformers"))
    model, _ = load_for(plan)
    layer = model.model.layers[0]
    for point in (plan, prepare(replace(plan.spec, seq=8))):
        res = measure(model, point, "hooks")
        assert (res.timings["name"] == "L00").sum() == 3  # the prefill and 2 decode steps, each once
        assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_hooks_close_their_regions_when_forward_raises() -> None:
    plan = prepare(RunSpec(model="tiny", device="cpu", seq=6, gen_tokens=3, granularity="layer", engine="transformers"))
    model, _ = load_for(plan)
    from kvscope.profiler.instrument import Instrument

    ins = Instrument("layer", plan.cfg.device, nvtx=False)
    engine = HfEngine(model, plan.cfg, ins)

    def boom(_module: torch.nn.Module, _args: object) -> None:
        raise RuntimeError("boom")

    hook = model.model.layers[1].register_forward_pre_hook(boom)
    ins.start_clock()
    with pytest.raises(RuntimeError, match="boom"):
        engine.prefill(torch.ones(1, 6, dtype=torch.int64), [6])
    hook.remove()
    assert engine._open == []
    names = [r["name"] for r in ins.collect()]
    assert names == ["embed", "L00", "L01", "prefill"]  # L01 entered before `boom` ran, closed by the engine


def test_sweep_rows_carry_engine(tmp_path: Path) -> None:
    from kvscope.measure.sweep import SweepSpec, run_sweep

    base = RunSpec(model="tiny", device="cpu", gen_tokens=3, warmup=0, reps=1, engine="transformers")
    rows = run_sweep(SweepSpec(base, (6, 8), (1, 2**40), tmp_path / "s.csv"))  # 2**40 sequences: an oom row
    assert rows["flag"].fillna("").str.contains("oom").tolist() == [False, True, False, True]
    assert rows["engine"].tolist() == ["transformers"] * 4


@pytest.mark.parametrize(("argv", "says"), [
    (["--engine", "transformers", "--granularity", "op"], "down to --granularity layer, not op"),
    (["--engine", "transformers-compiled", "--granularity", "layer"], "down to --granularity phase, not layer"),
    (["--engine", "transformers", "--kernels", "on"], "--kernels on is kvscope's own loop"),
    (["--engine", "transformers-compiled", "--kernels", "on"], "--kernels on is kvscope's own loop"),
    (["--engine", "transformers", "--graphs", "on"], "the eager transformers loop has none"),
    (["--engine", "transformers-compiled", "--graphs", "on", "--device", "cpu"], "--graphs on needs a CUDA device"),
    (["--engine", "vllm"], "invalid choice: 'vllm'"),
])
def test_bad_combinations_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                           says: str) -> None:
    line = fail(["run", "--model", "tiny", "--seq", "8", "--gen-tokens", "2", "--out", str(tmp_path / "r"), *argv],
                capsys)
    assert says in line
    assert not (tmp_path / "r").exists()


def test_sweep_nsys_and_generate_refuse_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same checks where the run options are forwarded: `sweep`, `nsys --` (before looking for nsys) and
    `generate` (a ragged batch for the compiled engine, before the model loads)."""
    line = fail(["sweep", "--model", "tiny", "--seq", "8", "--batch-sizes", "1", "--out", str(tmp_path / "s.csv"),
                 "--engine", "transformers", "--granularity", "op"], capsys)
    assert "not op" in line and not (tmp_path / "s.csv").exists()
    line = fail(["nsys", "--out", str(tmp_path / "n"), "--", "--model", "tiny", "--engine", "transformers-compiled",
                 "--granularity", "layer"], capsys)
    assert "not layer" in line and not (tmp_path / "n").exists()
    line = fail(["generate", "--model", "tiny", "--prompt-ids", "1,2,3;4", "--engine", "transformers-compiled"],
                capsys)
    assert "needs prompts of one length" in line


def _gpu_tokens(engine: str, graphs: bool | None = None) -> list[list[int]]:
    plan = prepare(RunSpec(model="tiny", dtype="float32", device="cuda", gen_tokens=GEN, engine=engine,
                           graphs=graphs, kernels=False if engine == "kvscope" else None), prompts=PROMPTS)
    loaded, _ = load_for(plan)
    engine_ = make_engine(loaded, plan)
    engine_.generate(PROMPTS, GEN)  # the first call compiles (and records the CUDA graphs)
    return engine_.generate(PROMPTS, GEN)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_compiled_tokens_equal_kvscope_engine_gpu(graphs: bool) -> None:
    """The static cache and compiled decode step give kvscope's tokens (float32 on CUDA, the tiny preset)."""
    assert _gpu_tokens("transformers-compiled", graphs) == _gpu_tokens("kvscope", False)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["transformers", "transformers-compiled"])
def test_gpu_run_folder(tmp_path: Path, engine: str) -> None:
    """A run on the GPU: CUDA-event timings, and the cache bytes transformers' cache allocated."""
    res = execute(RunSpec(model="qwen2.5-0.5b", batch_size=2, seq=128, gen_tokens=8, warmup=2, reps=2,
                          engine=engine, out=str(tmp_path / "r")))
    s = res.summary.iloc[0]
    assert s["clock"] == "cuda" and s["engine"] == engine
    args = ModelArgs.from_preset("qwen2.5-0.5b")
    tokens = 128 + 7 if engine == "transformers" else 128 + 8  # DynamicCache: what it holds; static: its length
    assert s["kv_cache_bytes"] == args.n_layers * 2 * 2 * tokens * args.n_kv_heads * args.head_dim * 2
    assert s["cuda_graphs"] == (engine == "transformers-compiled")


def test_checkpoint_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    """A checkpoint folder: transformers' `from_pretrained` (local files) and kvscope's loader read the same weights,
    so the two engines give the same tokens."""
    from helpers import hf_model

    folder = tmp_path / "ckpt"
    hf_model(TINY_CONFIGS["qwen2"], seed=11).save_pretrained(folder)
    plan = prepare(RunSpec(model=str(folder), dtype="float32", device="cpu", gen_tokens=GEN, engine="transformers"),
                   prompts=PROMPTS)
    loaded, _ = load_for(plan)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.dtype == torch.float32
    assert _tokens(str(folder), "transformers", PROMPTS) == _tokens(str(folder), "kvscope", PROMPTS)
