"""Round trip: a random transformers model saved in several safetensors shards loads through kvscope and matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIGS, hf_last_logits, hf_model, rel_err

from kvscope.cli import main
from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["qwen2", "llama3-scaled"])
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    hf = hf_model(TINY_CONFIGS[request.param], seed=3)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, max_shard_size="40KB")
    return folder, hf


def test_save_pretrained_writes_several_shards(sharded) -> None:
    folder, _ = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3
    assert all((folder / s).is_file() for s in shards)


def test_sharded_checkpoint_loads_and_matches(sharded) -> None:
    folder, hf = sharded
    source = resolve_model(str(folder))
    assert source.kind == "checkpoint" and not source.random_weights
    model, _ = load_model(source, CPU, torch.float32)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine = Engine(model, RunConfig(1, 32, torch.float32, CPU))
    engine.prefill(*pad_prompts([prompt], source.args.vocab_size, CPU))
    ids = [*prompt, int(engine.next_tokens[0])]
    for _ in range(4):
        engine.decode_step()
        assert rel_err(engine.logits[0], hf_last_logits(hf, ids)) < 1e-4
        ids.append(int(engine.next_tokens[0]))


def test_cli_generate_on_checkpoint_matches_transformers(sharded, capsys: pytest.CaptureFixture[str]) -> None:
    folder, hf = sharded
    prompts = [[7, 7, 7, 1], [2, 3]]
    rc = main(["generate", "--model", str(folder), "--prompt-ids", "7,7,7,1;2,3", "--max-new-tokens", "6",
               "--device", "cpu", "--dtype", "float32", "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])["tokens"]
    for p, row in zip(prompts, got, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        assert row == ref[0, len(p):].tolist()
    assert [json.loads(line) for line in out[:2]] == got


def test_missing_and_unexpected_tensors_are_named(sharded, tmp_path: Path) -> None:
    folder, hf = sharded
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in hf.state_dict().items()
             if "layers.1.mlp.up_proj" not in k and k != "lm_head.weight"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(KvscopeError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(resolve_model(str(broken)), CPU, torch.float32)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(KvscopeError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_model(resolve_model(str(broken)), CPU, torch.float32)
