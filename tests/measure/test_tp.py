"""Tensor parallelism on the CPU (gloo): the shard plan's exact slices, weights loaded shard by shard, the refusals,
tp=1 through the collectives in this process, and tp=2 / tp=4 in spawned ranks equal to one device (tokens
identical, logits within 1e-5 in float32) for a tiny model of each family; `run --tp` and `generate --tp` end to end;
the merged summary's columns on synthetic rows."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from kvscope.cli import main
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig, RunPlan, RunSpec
from kvscope.engine.tp import TensorParallel, check_devices, free_port, init_group, leave_group
from kvscope.errors import KvscopeError
from kvscope.measure.tp_generate import Generated, rank_generate
from kvscope.measure.tp_launch import RankContext, run_ranks
from kvscope.measure.tp_run import MERGED_COLUMNS, merge_summary, rank_run, step_skew
from kvscope.model.config import ModelArgs, RopeScaling
from kvscope.model.source import ModelSource
from kvscope.model.tp import ShardPlan, check_tp, local_args
from kvscope.model.weights import load_model
from kvscope.profiler.instrument import Instrument
from kvscope.schema import COLLECTIVE_OPS

CPU = torch.device("cpu")
LOGITS_ATOL = 1e-5
PROMPTS = [[1, 5, 9, 33, 7, 2], [100, 2, 3]]  # a ragged batch
GEN = 3

# one tiny float32 model per family, each dividing tp=2 and tp=4 (heads, KV heads, MLP width, vocabulary)
FAMILIES = {
    # Llama with attention_bias: q/k/v and o_proj biases (the o_proj bias must be added once), llama3 RoPE scaling
    "llama": ModelArgs("tp-llama", "llama", dim=64, n_layers=2, n_heads=8, n_kv_heads=4, intermediate_size=128,
                       vocab_size=256, max_position_embeddings=256, rope_theta=500000.0, qkv_bias=True, o_bias=True,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
    # Qwen2: q/k/v bias, tied embeddings (one vocabulary shard serves the embedding and the lm_head), GQA 2:1
    "qwen2": ModelArgs("tp-qwen2", "qwen2", dim=64, n_layers=2, n_heads=8, n_kv_heads=4, intermediate_size=96,
                       vocab_size=128, max_position_embeddings=256, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                       tie_word_embeddings=True),
    # Mistral: no bias, head_dim given apart from dim / n_heads
    "mistral": ModelArgs("tp-mistral", "mistral", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=64,
                         vocab_size=192, max_position_embeddings=256, head_dim=32, rope_theta=1e6),
}


def _plan(args: ModelArgs, prompts: list[list[int]] = PROMPTS, gen: int = GEN) -> RunPlan:
    seq = max(len(p) for p in prompts)
    spec = RunSpec(model=args.name, batch_size=len(prompts), seq=seq, gen_tokens=gen, dtype="float32", device="cpu",
                   graphs=False, kernels=False)
    cfg = RunConfig(len(prompts), seq + gen, torch.float32, CPU)
    return RunPlan(spec, ModelSource("config", args.name, args), cfg, "cpu", False, False, False, None)


def _one_device(plan: RunPlan) -> Generated:
    model, _ = load_model(plan.source, CPU, torch.float32, seed=plan.spec.seed)
    engine = Engine(model, plan.cfg)
    out = [engine.prefill(*pad_prompts(PROMPTS, plan.source.args.vocab_size, CPU)).clone()]
    logits = [engine.logits.clone()]
    for _ in range(GEN - 1):
        out.append(engine.decode_step().clone())
        logits.append(engine.logits.clone())
    return Generated(torch.stack(out, dim=1).tolist(), logits, 0.0)


def _tp4_and_tp2(ctx: RankContext, plans: dict[str, RunPlan]) -> dict[tuple[int, str], Generated]:
    """Four ranks: every family at tp=4 over all of them, then at tp=2 over ranks {0, 1} and {2, 3} (subgroups),
    so one start of the ranks serves both degrees. Keys (tp, family)."""
    out = {(4, name): rank_generate(ctx, plan, PROMPTS, GEN, True) for name, plan in plans.items()}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group, in the same order
    pair = RankContext(ctx.rank % 2, 2, ctx.device, pairs[ctx.rank // 2])
    out.update({(2, name): rank_generate(pair, plan, PROMPTS, GEN, True) for name, plan in plans.items()})
    return out


# ---- the shard plan -----------------------------------------------------------------------------------------------
SMALL = ModelArgs("small", "qwen2", dim=8, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=6, vocab_size=10,
                  max_position_embeddings=16, qkv_bias=True)  # head_dim 2: q rows 0-7, k rows 8-11, v rows 12-15


def test_shard_plan_slices_each_block_of_the_fused_matrices() -> None:
    r0, r1 = ShardPlan(SMALL, 2, 0), ShardPlan(SMALL, 2, 1)
    assert r0.qkv_index() == [0, 1, 2, 3, 8, 9, 12, 13]
    assert r1.qkv_index() == [4, 5, 6, 7, 10, 11, 14, 15]
    assert r0.w13_index() == [0, 1, 2, 6, 7, 8]
    assert r1.w13_index() == [3, 4, 5, 9, 10, 11]
    assert (r1.q_rows, r1.kv_rows, r1.ff_rows, r1.vocab_rows) == ((4, 8), (2, 4), (3, 6), (5, 10))
    rows = torch.arange(16.0).unsqueeze(1)  # (16, 1): row i holds i
    assert r1.param_slice("layers.0.attention.wqkv.weight", rows).flatten().tolist() == [4, 5, 6, 7, 10, 11, 14, 15]
    assert r1.param_slice("layers.0.attention.wqkv.bias", torch.arange(16.0)).tolist() == [4, 5, 6, 7, 10, 11, 14,
                                                                                            15]
    cols = torch.arange(8.0).unsqueeze(0)  # (1, 8): column j holds j
    assert r1.param_slice("layers.0.attention.wo.weight", cols).tolist() == [[4, 5, 6, 7]]
    assert r0.param_slice("layers.0.feed_forward.w2.weight", torch.arange(6.0).unsqueeze(0)).tolist() == [[0, 1, 2]]
    assert r1.param_slice("tok_embeddings.weight", torch.arange(10.0).unsqueeze(1)).flatten().tolist() == [5, 6, 7,
                                                                                                           8, 9]
    bias = torch.arange(8.0)
    assert r1.param_slice("layers.0.attention.wo.bias", bias) is bias  # whole; rank 0 alone adds it
    assert r1.param_slice("norm.weight", bias) is bias
    assert [r1.checkpoint_slice(n) for n in (
        "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.bias", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight",
        "model.layers.0.self_attn.o_proj.bias")] == [
        (0, 5, 10), (0, 5, 10), (0, 4, 8), (0, 4, 8), (0, 2, 4), (0, 2, 4), (1, 4, 8), (0, 3, 6), (0, 3, 6),
        (1, 3, 6), None, None, None]
    local = local_args(SMALL, 2)
    assert (local.n_heads, local.n_kv_heads, local.intermediate_size, local.vocab_size, local.head_dim,
            local.dim) == (2, 1, 3, 5, 2, 8)


def test_refusals_name_the_numbers() -> None:
    tiny = ModelArgs.from_preset("tiny")  # 4 heads, 2 KV heads, intermediate 160, vocabulary 512
    with pytest.raises(KvscopeError) as e:
        check_tp(tiny, 4)
    assert str(e.value) == ("--tp 4 does not divide tiny's 2 KV heads (n_kv_heads); tensor parallelism shards them "
                            "evenly (choose a tp that divides 2)")
    with pytest.raises(KvscopeError) as e:
        check_tp(FAMILIES["qwen2"], 3)  # 8 heads would not split either, but the KV heads are named first
    assert str(e.value).startswith("--tp 3 does not divide tp-qwen2's 4 KV heads (n_kv_heads)")
    odd_mlp = ModelArgs("odd", "llama", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=50,
                        vocab_size=64, max_position_embeddings=16)
    with pytest.raises(KvscopeError, match=r"^--tp 4 does not divide odd's 2 KV heads"):
        check_tp(odd_mlp, 4)
    with pytest.raises(KvscopeError, match=r"^--tp 2 does not divide odd's 25 intermediate_size"):
        check_tp(ModelArgs("odd", "llama", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=25,
                           vocab_size=64, max_position_embeddings=16), 2)
    with pytest.raises(KvscopeError, match=r"^--tp 2 does not divide odd's 65 vocab_size"):
        check_tp(ModelArgs("odd", "llama", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=50,
                           vocab_size=65, max_position_embeddings=16), 2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(KvscopeError, match=r"^--tp must be an integer from 1 to 1024"):
            check_tp(tiny, bad)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(KvscopeError) as e:
            check_devices(torch.device("cuda"), 2)
        assert str(e.value) == "--tp 2 needs 2 GPUs on this host, torch sees 0"


def test_cli_refuses_an_uneven_tp_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "--model", "tiny", "--tp", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvscope: error: --tp 4 does not divide tiny's 2 KV heads (n_kv_heads); tensor parallelism "
                   "shards them evenly (choose a tp that divides 2)"]
    assert not (tmp_path / "r").exists()
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2", "--tp", "3"]) == 2
    assert "--tp 3 does not divide tiny's 2 KV heads" in capsys.readouterr().err
    assert main(["run", "--model", "tiny", "--tp", "2", "--engine", "transformers", "--out", str(tmp_path / "h")]) == 2
    assert capsys.readouterr().err.strip() == "kvscope: error: --tp needs kvscope's engine, not --engine transformers"


def _rank1_fails(ctx: RankContext) -> int:
    if ctx.rank == 1:
        raise KvscopeError("rank 1: a checkpoint tensor holds NaN")
    dist.barrier()  # rank 0 waits for a rank that is gone: it is ended, not left waiting
    return 0


def test_an_error_in_one_rank_comes_back_as_its_line() -> None:
    with pytest.raises(KvscopeError) as e:
        run_ranks(2, CPU, _rank1_fails, start_method="fork")
    assert str(e.value) == "rank 1: a checkpoint tensor holds NaN"
    with pytest.raises(KvscopeError, match=r"^ranks start by spawn, or by fork on the CPU; got 'fork' on cuda$"):
        run_ranks(2, torch.device("cuda"), _rank1_fails, start_method="fork")


# ---- weights, shard by shard ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_shards_are_slices_of_the_one_device_weights(family: str) -> None:
    args = FAMILIES[family]
    source = ModelSource("config", args.name, args)
    full, _ = load_model(source, CPU, torch.float32, seed=7)
    whole = dict(full.named_parameters())
    for tp in (2, 4):
        for rank in range(tp):
            shard = ShardPlan(args, tp, rank)
            part, _ = load_model(source, CPU, torch.float32, seed=7, shard=shard)
            for name, p in part.named_parameters():
                assert torch.equal(p, shard.param_slice(name, whole[name])), (family, tp, rank, name)


def _hf_state(model: torch.nn.Module, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our fused parameters under their Hugging Face names (the inverse of the loader's targets)."""
    q, kv, f = args.q_size, args.kv_size, args.intermediate_size
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        p, att, mlp = f"model.layers.{i}.", layer.attention, layer.feed_forward
        for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
            fused = getattr(att.wqkv, kind)
            out.update({p + f"self_attn.q_proj.{kind}": fused[:q], p + f"self_attn.k_proj.{kind}": fused[q:q + kv],
                        p + f"self_attn.v_proj.{kind}": fused[q + kv:]})
        out[p + "self_attn.o_proj.weight"] = att.wo.weight
        if args.o_bias:
            out[p + "self_attn.o_proj.bias"] = att.wo.bias
        out.update({p + "mlp.gate_proj.weight": mlp.w13.weight[:f], p + "mlp.up_proj.weight": mlp.w13.weight[f:],
                    p + "mlp.down_proj.weight": mlp.w2.weight,
                    p + "input_layernorm.weight": layer.attention_norm.weight,
                    p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def test_checkpoint_shards_read_only_their_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvscope.model import weights
    from kvscope.model.source import resolve_model

    args = FAMILIES["llama"]
    full, _ = load_model(ModelSource("config", args.name, args), CPU, torch.float32, seed=3)
    state = _hf_state(full, args)
    names = sorted(state)
    save_file({k: state[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[len(names) // 2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if i < len(names) // 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}))
    whole_reads: list[str] = []

    def opener(path: object, **kw: object) -> object:  # records every tensor read whole
        handle = safe_open(path, **kw)

        class Spy:
            def __enter__(self) -> Spy:
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                handle.__exit__(*exc)

            def keys(self) -> list[str]:
                return self.f.keys()

            def get_slice(self, key: str) -> object:
                return self.f.get_slice(key)

            def get_tensor(self, key: str) -> torch.Tensor:
                whole_reads.append(key)
                return self.f.get_tensor(key)

        return Spy()

    monkeypatch.setattr("safetensors.safe_open", opener)
    source = resolve_model(str(tmp_path))
    assert source.kind == "checkpoint"
    whole = dict(full.named_parameters())
    for rank in range(2):
        shard = ShardPlan(args, 2, rank)
        whole_reads.clear()
        part, _ = weights.load_model(source, CPU, torch.float32, shard=shard)
        for name, p in part.named_parameters():
            assert torch.equal(p, shard.param_slice(name, whole[name])), (rank, name)
        # only the norms and the o_proj biases (replicated) are read whole
        assert sorted(whole_reads) == sorted(k for k in names if k.endswith(("norm.weight", "o_proj.bias")))


# ---- tp=1 through the collectives, in this process -----------------------------------------------------------------
def test_tp1_in_process_is_the_one_device_run_exactly() -> None:
    args = FAMILIES["llama"]
    plan = _plan(args)
    expect = _one_device(plan)
    init_group(0, 1, CPU, f"tcp://127.0.0.1:{free_port()}")
    try:
        shard = ShardPlan(args, 1, 0)
        model, _ = load_model(plan.source, CPU, torch.float32, shard=shard)
        ins = Instrument("op", CPU, nvtx=False)
        engine = Engine(model, plan.cfg, ins, tp=TensorParallel(shard))
        ins.start_clock()
        out = [engine.prefill(*pad_prompts(PROMPTS, args.vocab_size, CPU)).clone()]
        assert torch.equal(engine.logits, expect.logits[0])
        for step in range(1, GEN):
            out.append(engine.decode_step().clone())
            assert torch.equal(engine.logits, expect.logits[step])
        rows = ins.collect()
    finally:
        leave_group()
    assert torch.stack(out, dim=1).tolist() == expect.tokens
    names = {r["name"] for r in rows if r["level"] == "op" and r["op"] in COLLECTIVE_OPS}
    assert names == {"L00.allreduce_attn", "L00.allreduce_mlp", "L01.allreduce_attn", "L01.allreduce_mlp"}
    # every step (the prefill and the decode steps) opens both all-reduces of both layers once
    assert sum(r["op"] in COLLECTIVE_OPS for r in rows if r["level"] == "op") == GEN * 2 * 2


# ---- ranks in processes (gloo): tp=2 and tp=4 equal one device ------------------------------------------------
def test_tp2_and_tp4_ranks_equal_one_device_for_every_family() -> None:
    plans = {name: _plan(args) for name, args in FAMILIES.items()}
    got = run_ranks(4, CPU, _tp4_and_tp2, plans, start_method="fork").value  # the CLI tests below spawn theirs
    for name, plan in plans.items():
        expect = _one_device(plan)
        for tp in (2, 4):
            mine = got[(tp, name)]
            assert mine.tokens == expect.tokens, (tp, name)
            assert len(mine.logits) == GEN
            for a, b in zip(mine.logits, expect.logits, strict=True):
                assert a.shape == b.shape == (len(PROMPTS), plan.source.args.vocab_size)
                assert torch.allclose(a, b, rtol=0, atol=LOGITS_ATOL), (tp, name, float((a - b).abs().max()))


def test_generate_tp_cli_under_torchrun_gives_the_tokens_of_one_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A process started as torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): it is the
    one rank itself, no process is spawned."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(FAMILIES["qwen2"].to_hf_config()))
    ids = "1,5,9,33;100,2"
    assert main(["generate", "--model", str(cfg), "--prompt-ids", ids, "--max-new-tokens", "4", "--json"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)
    assert main(["generate", "--model", str(cfg), "--prompt-ids", ids, "--max-new-tokens", "4", "--json",
                 "--tp", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == one
    assert "on 1 ranks (cpu)" in err
    assert main(["generate", "--model", str(cfg), "--prompt-ids", ids, "--tp", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("kvscope: error: --tp 2 under a launcher of 1 processes "
                                               "(WORLD_SIZE=1); they must agree")


def test_run_tp_writes_one_folder_with_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--tp", "2", "--seq", "8", "--gen-tokens", "3", "--reps", "2",
                 "--warmup", "1", "--granularity", "op", "--out", str(out), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(line["run_folder"]) == out
    timings = pd.read_parquet(out / "timings.parquet")
    assert list(timings.columns[:2]) == ["run_id", "rank"]
    assert sorted(timings["rank"].unique()) == [0, 1]
    per_rank = timings.groupby("rank").size()
    assert per_rank[0] == per_rank[1]
    comm = timings[timings["op"].isin(COLLECTIVE_OPS)]
    # 2 reps x (prefill + 2 decode steps) x 2 layers x 2 all-reduces, on each rank
    assert comm.groupby("rank").size().tolist() == [2 * 3 * 2 * 2] * 2
    ranks = pd.read_parquet(out / "rank_summary.parquet")
    assert ranks["rank"].tolist() == [0, 1]
    # tiny: 2 layers x K,V x 1 KV head per rank x head_dim 16 x (8 + 3) positions x 4 bytes
    assert ranks["kv_cache_bytes"].tolist() == [2 * 2 * 1 * 16 * 11 * 4] * 2
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(summary) == 1 and set(MERGED_COLUMNS) <= set(summary.columns)
    assert int(summary["tp"].iloc[0]) == 2
    slow = int(ranks["decode_p50_ms_per_tok"].to_numpy().argmax())
    assert int(summary["slowest_rank"].iloc[0]) == slow
    assert summary["decode_p50_ms_per_tok"].iloc[0] == ranks["decode_p50_ms_per_tok"].max()
    assert summary["ttft_max_ms"].iloc[0] == ranks["ttft_ms"].max()
    assert 0 < summary["allreduce_share_pct"].iloc[0] < 100
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert sorted({e["pid"] for e in spans}) == [100, 101]  # one trace process per rank
    assert [sum(e["pid"] == 100 + r for e in spans) for r in (0, 1)] == per_rank.tolist()


def _socket_fds() -> int:
    """Sockets this process holds open (a gloo group holds one per peer pair and its store's)."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            n += fd.readlink().as_posix().startswith("socket:")
    return n


def _run_then_leave(ctx: RankContext, plan: RunPlan) -> tuple[int, int]:
    """A whole rank's run (model built, measured, results gathered), then the group left: (sockets in the group,
    sockets after leaving it)."""
    inside = _socket_fds()
    rank_run(ctx, plan, None, "sockets")
    leave_group()
    return inside, _socket_fds()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts sockets through /proc")
def test_a_rank_leaves_its_group_closed_after_a_run() -> None:
    # CI once aborted a rank at exit ("terminate called without an active exception"): the group outlived
    # destroy_process_group and a gloo thread dropped the gather's tensor while the interpreter was finalising.
    plan = _plan(FAMILIES["llama"])
    inside, after = run_ranks(2, CPU, _run_then_leave, plan).value
    assert inside > 0
    assert after == 0


def test_building_a_model_imports_no_meta_kernels() -> None:
    # a random draw on the meta device imports torch._dynamo and its ~800 modules, which held the process group
    code = ("import sys, torch\n"
            "from kvscope.model.config import ModelArgs\n"
            "from kvscope.model.weights import empty_model\n"
            "empty_model(ModelArgs.from_preset('tiny'), 'cpu', torch.float32)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_run_tp_under_torchrun_is_the_rank_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--tp", "1", "--seq", "8", "--gen-tokens", "3", "--reps", "2",
                 "--warmup", "1", "--out", str(out)]) == 0
    assert f"run folder: {out}" in capsys.readouterr().out
    summary = pd.read_parquet(out / "summary.parquet")
    assert (int(summary["tp"].iloc[0]), int(summary["slowest_rank"].iloc[0])) == (1, 0)
    assert summary["step_skew_max_ms"].iloc[0] == 0.0  # one rank: no spread
    assert set(pd.read_parquet(out / "timings.parquet")["rank"]) == {0}


# ---- the merged summary on synthetic rows ---------------------------------------------------------------------
def test_merged_summary_takes_the_slowest_rank_and_the_step_skew() -> None:
    ranks = pd.DataFrame({"rank": [0, 1, 2], "decode_p50_ms_per_tok": [2.0, 3.5, 3.0], "ttft_ms": [9.0, 7.0, 8.0],
                          "model": ["m", "m", "m"]})
    rows = []
    for rank, durs in ((0, [1.0, 2.0]), (1, [1.5, 2.5]), (2, [1.25, 4.0])):  # step 1 and step 2 of rep 0
        for step, d in zip((1, 2), durs, strict=True):
            rows.append({"rank": rank, "rep": 0, "level": "step", "phase": "decode", "step": step, "op": None,
                         "dur_ms": d})
        rows.append({"rank": rank, "rep": 0, "level": "op", "phase": "decode", "step": 1, "op": "allreduce_attn",
                     "dur_ms": 0.5})
        rows.append({"rank": rank, "rep": 0, "level": "op", "phase": "decode", "step": 2, "op": "allreduce_mlp",
                     "dur_ms": 0.25})
    timings = pd.DataFrame(rows)
    assert step_skew(timings).tolist() == [0.5, 2.0]  # step 1: 1.5 - 1.0; step 2: 4.0 - 2.0
    row = merge_summary(ranks, timings)
    assert len(row) == 1
    got = row.iloc[0]
    assert (got["rank"], got["slowest_rank"], got["tp"], got["ttft_slowest_rank"]) == (1, 1, 3, 0)
    assert (got["decode_p50_ms_per_tok"], got["ttft_ms"], got["ttft_max_ms"]) == (3.5, 7.0, 9.0)
    assert (got["step_skew_p50_ms"], got["step_skew_max_ms"]) == (1.25, 2.0)
    assert got["allreduce_share_pct"] == 100 * 0.75 / 4.0  # rank 1: 0.75 ms of all-reduce in 1.5 + 2.5 ms of steps
    no_ops = timings[timings["level"] == "step"]
    assert math.isnan(merge_summary(ranks, no_ops)["allreduce_share_pct"].iloc[0])


# ---- kv-math --tp, by hand -----------------------------------------------------------------------------------
def test_kv_math_tp_per_gpu_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-math", "--model", "qwen2.5-7b", "--tp", "2", "--seq", "8192", "--batch-size", "2",
                 "--gpu-mem-gb", "80", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # qwen2.5-7b: 28 layers, dim 3584, 28 heads / 4 KV heads of 128, intermediate 18944, vocabulary 152064, untied,
    # q/k/v bias; in bf16 (2 bytes). Per GPU at tp=2: 14 heads, 2 KV heads, intermediate 9472, vocabulary 76032.
    assert got["tp"] == 2
    assert got["kv_bytes_per_token"] == 28 * 2 * 4 * 128 * 2 == 57344
    assert got["kv_bytes_per_token_per_gpu"] == 28 * 2 * 2 * 128 * 2 == 28672
    assert got["kv_bytes_total_per_gpu"] == 28672 * 8192 * 2
    qkv = 3584 * (1792 + 2 * 256) + (1792 + 2 * 256)  # weight + bias of the rank's q, k, v rows
    layer = qkv + 1792 * 3584 + 3 * 3584 * 9472 + 2 * 3584  # + o_proj columns, gate/up/down, two norms
    params = 28 * layer + 2 * 76032 * 3584 + 3584  # embedding and lm_head rows, final norm
    assert got["weights_bytes_per_gpu"] == params * 2 == 7615820800
    # decode workspace: each sequence's widest activations of the rank, and the full (gathered) float32 logits
    per_seq = (2 * 9472 + 1792 + 2 * 256 + 3 * 3584) * 2 + 152064 * 4
    assert got["workspace_bytes_per_gpu"] == 2 * per_seq
    budget = 80 * 2**30 - params * 2 - 2**30  # the GPU, less the rank's weights, less the 1 GiB reserve
    assert got["budget_bytes"] == budget
    assert got["max_batch"] == budget // (28672 * 8192 + per_seq)
    assert got["max_seq"] == min(32768, (budget - 2 * per_seq) // (28672 * 2))
    assert main(["kv-math", "--model", "qwen2.5-3b", "--tp", "4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kvscope: error: --tp 4 does not divide qwen2.5-3b's 2 KV heads (n_kv_heads); tensor parallelism shards them "
        "evenly (choose a tp that divides 2)")
