"""Hostile model configs and checkpoints: every bad input ends as one `KvscopeError` line (exit code 2 at the CLI),
never a traceback, never accepted garbage (NaN logits, negative bytes, a tensor silently taken from the wrong file)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_CONFIGS

from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.model.config import MAX_SIZE, ModelArgs, RopeScaling
from kvscope.model.layers import rope_tables
from kvscope.model.source import one_line, resolve_model
from kvscope.model.weights import empty_model, hf_targets, load_hf_tensors, load_model

CPU = torch.device("cpu")
LLAMA = TINY_CONFIGS["llama"]


# ---- helpers ----------------------------------------------------------------------------------------------------
def raises_one_line(match: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Call fn; it must raise KvscopeError matching `match` whose message is one line; returns the message."""
    with pytest.raises(KvscopeError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg and msg == msg.strip() and msg, msg
    return msg


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI: exit code 2 and exactly one `kvscope: error:` line on stderr, which is returned."""
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("kvscope: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def parse(change: dict[str, Any], base: dict[str, Any] = LLAMA) -> ModelArgs:
    return ModelArgs.from_hf_config({**base, **change}, name="hostile")


def random_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named random tensors of every parameter `config` implies (no transformers needed)."""
    model = empty_model(ModelArgs.from_hf_config(config), "cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(hi - lo, *p.shape[1:], generator=gen) * 0.05
            for name, (p, lo, hi) in sorted(hf_targets(model).items())}


def write_checkpoint(folder: Path, config: dict[str, Any] = LLAMA, shards: int = 1,
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint folder: config.json and `shards` safetensors files (an index when more than one)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = random_state(config) if state is None else state
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def load(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return load_model(resolve_model(str(folder)), CPU, dtype)[0]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt")


def test_the_fixture_checkpoint_loads(ckpt: Path, tmp_path: Path) -> None:
    assert load(ckpt).args.dim == 64
    sharded = write_checkpoint(tmp_path / "sharded", shards=3)
    a, b = load(ckpt), load(sharded)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ---- 1. truncated, corrupt or empty .safetensors ------------------------------------------------------------------
def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


CORRUPTIONS = {
    "empty file": lambda d: b"",
    "shorter than the header length": lambda d: d[:5],
    "header length only": lambda d: d[:8],
    "header length larger than the file": lambda d: struct.pack("<Q", len(d) * 4) + d[8:],
    "absurd header length": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "garbage JSON header": lambda d: d[:8] + b"{" + b"#" * (_header_len(d) - 1) + d[8 + _header_len(d):],
    "header is a JSON list": lambda d: d[:8] + b"[" + b" " * (_header_len(d) - 2) + b"]" + d[8 + _header_len(d):],
    "truncated header": lambda d: d[:8 + _header_len(d) // 2],
    "truncated tensor data": lambda d: d[:-17],
    "one byte of tensor data missing": lambda d: d[:-1],
    "trailing garbage": lambda d: d + b"\x00" * 13,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_safetensors_is_one_line_naming_the_file(kind: str, ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    msg = raises_one_line(r"safetensors file .*model\.safetensors is (empty|truncated or corrupt)", load, ckpt)
    assert str(path) in msg
    if kind == "empty file":
        assert msg == f"safetensors file {path} is empty"


def _raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("header", [
    {"model.norm.weight": {"dtype": "XYZ", "shape": [2], "data_offsets": [0, 8]}},  # unknown dtype
    {"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
     "lm_head.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},  # overlapping data
    {"model.norm.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},  # shape larger than its data
    {"model.norm.weight": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},  # negative shape
    {"__metadata__": {"format": 5}, "model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
])
def test_inconsistent_safetensors_header_is_one_line(header: dict[str, Any], ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(_raw_safetensors(header, b"\0" * 8))
    msg = raises_one_line("safetensors file .* is truncated or corrupt", load, ckpt)
    assert str(path) in msg and len(msg) < 400


def test_complex_weights_are_refused(ckpt: Path) -> None:
    state = random_state(LLAMA)
    state["model.norm.weight"] = torch.ones(64, dtype=torch.complex64)
    folder = write_checkpoint(ckpt.parent / "complex", state=state)
    raises_one_line(r"model\.norm\.weight has dtype complex64, expected floating-point weights", load, folder)


def test_corrupt_second_shard_is_named(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "sharded", shards=3)
    bad = folder / "model-00002-of-00003.safetensors"
    bad.write_bytes(bad.read_bytes()[:-40])
    msg = raises_one_line("truncated or corrupt", load, folder)
    assert str(bad) in msg and "model-00001" not in msg and "model-00003" not in msg


def test_a_shard_that_is_a_folder_is_refused(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    raises_one_line(r"has no \*\.safetensors weights", resolve_model, str(ckpt))


def test_non_float_weights_are_refused(tmp_path: Path) -> None:
    state = random_state(LLAMA)
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    folder = write_checkpoint(tmp_path / "int", state=state)
    raises_one_line(r"model\.norm\.weight has dtype int32, expected floating-point weights", load, folder)
    state["model.norm.weight"] = torch.ones(64, dtype=torch.bool)
    folder = write_checkpoint(tmp_path / "bool", state=state)
    raises_one_line(r"model\.norm\.weight has dtype bool", load, folder)


@pytest.mark.parametrize("command", ["generate", "run"])
def test_cli_on_a_corrupt_checkpoint_exits_2(command: str, ckpt: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    extra = (["--prompt-ids", "1,2,3", "--max-new-tokens", "2"] if command == "generate" else
             ["--seq", "8", "--gen-tokens", "2", "--warmup", "0", "--reps", "1", "--out", str(tmp_path / "out")])
    err = cli_error([command, "--model", str(ckpt), "--device", "cpu", *extra], capsys)
    assert f"safetensors file {path} is truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


# ---- 2. config values of the wrong type or out of range ----------------------------------------------------------
WRONG_TYPE = [
    ({"rope_scaling": "linear"}, "rope_scaling must be a JSON object or null, got 'linear'"),
    ({"rope_scaling": [8.0, "llama3"]}, r"rope_scaling must be a JSON object or null, got \[8.0, \"llama3\"\]"),
    ({"rope_scaling": 8.0}, "rope_scaling must be a JSON object or null, got 8.0"),
    ({"rope_scaling": True}, "rope_scaling must be a JSON object or null, got true"),
    ({"rope_parameters": "garbage"}, "rope_parameters must be a JSON object or null, got 'garbage'"),
    ({"rope_parameters": [1]}, r"rope_parameters must be a JSON object or null, got \[1\]"),
    ({"rope_parameters": 0}, "rope_parameters must be a JSON object or null, got 0"),
    ({"rope_theta": "10000"}, "rope_theta must be a number, got '10000'"),
    ({"rope_theta": True}, "rope_theta must be a number, got true"),
    ({"rope_theta": [10000]}, r"rope_theta must be a number, got \[10000\]"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "8"}}, "rope_scaling.factor must be a number, got '8'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "8"}}, "rope_parameters.factor must be a number, got '8'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": "1e4"}},
     "rope_parameters.rope_theta must be a number, got '1e4'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32.5}},
     "rope_scaling.original_max_position_embeddings must be an integer, got 32.5"),
    ({"rope_scaling": {"rope_type": ["llama3"], "factor": 8.0}}, r"rope_type \[\"llama3\"\] is not supported"),
    ({"hidden_size": math.inf}, "hidden_size must be an integer, got Infinity"),
    ({"hidden_size": -math.inf}, "hidden_size must be an integer, got -Infinity"),
    ({"hidden_size": math.nan}, "hidden_size must be an integer, got NaN"),
    ({"hidden_size": 1e300}, r"hidden_size must be an integer in \[1, 2147483647\], got 1e\+300"),
    ({"hidden_size": 10**30}, r"hidden_size must be an integer in \[1, 2147483647\], got 1000000000000000000000000"),
    ({"hidden_size": 64.7}, "hidden_size must be an integer, got 64.7"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"hidden_size": None}, "config.json key 'hidden_size' is null, and it is required"),
    ({"hidden_size": [64]}, r"hidden_size must be an integer, got \[64\]"),
    ({"max_position_embeddings": True}, "max_position_embeddings must be an integer, got true"),
    ({"max_position_embeddings": False}, "max_position_embeddings must be an integer, got false"),
    ({"max_position_embeddings": 2**31}, r"max_position_embeddings must be an integer in \[1, 2147483647\]"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers must be an integer in \[1, 2147483647\], got 0"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be an integer, got '4'"),
    ({"num_attention_heads": -4}, r"num_attention_heads must be an integer in \[1, 2147483647\], got -4"),
    ({"num_key_value_heads": 0}, r"num_key_value_heads must be an integer in \[1, 2147483647\], got 0"),
    ({"num_key_value_heads": 2.2}, "num_key_value_heads must be an integer, got 2.2"),
    ({"intermediate_size": {}}, "intermediate_size must be an integer, got {}"),
    ({"intermediate_size": 2**30 + 1}, r"gate \+ up rows 2 \* intermediate_size = 2147483650 exceeds 2147483647"),
    ({"vocab_size": None}, "config.json key 'vocab_size' is null, and it is required"),
    ({"vocab_size": -320}, r"vocab_size must be an integer in \[1, 2147483647\], got -320"),
    ({"head_dim": -16}, r"head_dim must be an integer in \[1, 2147483647\], got -16"),
    ({"head_dim": 0}, r"head_dim must be an integer in \[1, 2147483647\], got 0"),
    ({"head_dim": 16.5}, "head_dim must be an integer, got 16.5"),
    ({"head_dim": 2**30}, r"q \+ 2 kv rows \(n_heads \+ 2 n_kv_heads\) \* head_dim = 8589934592 exceeds"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false, got 0"),
    ({"attention_bias": 1}, "attention_bias must be true or false, got 1"),
    ({"mlp_bias": "no"}, "mlp_bias must be true or false, got 'no'"),
    ({"hidden_act": ["silu"]}, r"hidden_act \[\"silu\"\] is not supported"),
]


@pytest.mark.parametrize(("change", "message"), WRONG_TYPE, ids=[str(c) for c, _ in WRONG_TYPE])
def test_wrong_type_or_range_is_refused_naming_key_and_value(change: dict[str, Any], message: str) -> None:
    msg = raises_one_line(message, parse, change)
    assert msg.startswith("hostile: ") or msg.startswith("model 'hostile': ")


def test_wrong_type_in_qwen2_flags() -> None:
    raises_one_line("use_sliding_window must be true or false, got 'false'", parse,
                    {"use_sliding_window": "false"}, TINY_CONFIGS["qwen2"])


ACCEPTED = [
    ({"hidden_size": 64.0}, "dim", 64),  # a number with no fraction is an integer (JSON does not tell them apart)
    ({"num_hidden_layers": 2.0}, "n_layers", 2),
    ({"head_dim": None}, "head_dim", 16),  # null: derived, as transformers does
    ({"num_key_value_heads": None}, "n_kv_heads", 4),  # null: as many as the query heads
    ({"max_position_embeddings": None}, "max_position_embeddings", 2048),
    ({"rope_scaling": None}, "rope_scaling", None),
    ({"rope_scaling": {}}, "rope_scaling", None),
    ({"rope_parameters": None}, "rope_theta", 10000.0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_theta", 5e5),
    ({"rope_theta": 500000}, "rope_theta", 500000.0),
    ({"tie_word_embeddings": None}, "tie_word_embeddings", False),
]


@pytest.mark.parametrize(("change", "field", "value"), ACCEPTED, ids=[str(c) for c, _, _ in ACCEPTED])
def test_lossless_spellings_are_accepted(change: dict[str, Any], field: str, value: Any) -> None:
    got = getattr(parse(change), field)
    assert got == value and type(got) is type(value)


HOSTILE_VALUES = [None, True, False, "", "64", [], [64], {}, {"a": 1}, -1, 0, 1.5, -0.0, math.inf, -math.inf,
                  math.nan, 1e300, 2**31, 2**64, 10**400]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_key_with_every_hostile_value_is_refused_or_sane(family: str) -> None:
    """No value of any key read ends in anything but a one-line KvscopeError or a sane ModelArgs."""
    base = TINY_CONFIGS[family]
    keys = sorted({*base, "head_dim", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
                   "use_sliding_window", "num_key_value_heads", "rope_theta"})
    for key in keys:
        for value in HOSTILE_VALUES:
            try:
                args = ModelArgs.from_hf_config({**base, key: value}, name="fuzz")
            except KvscopeError as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 400, (key, value, str(exc))
                continue
            for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                      "max_position_embeddings"):
                v = getattr(args, f)
                assert type(v) is int and 1 <= v <= MAX_SIZE, (key, value, f, v)
            assert math.isfinite(args.norm_eps) and args.norm_eps > 0 and math.isfinite(args.rope_theta)
            assert type(args.tie_word_embeddings) is bool and type(args.qkv_bias) is bool
            w = args.sliding_window
            assert w is None or (type(w) is int and 1 <= w <= MAX_SIZE), (key, value, w)


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("sub", ["rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings", "rope_theta"])
def test_every_rope_subkey_with_every_hostile_value(where: str, sub: str) -> None:
    for value in HOSTILE_VALUES:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, sub: value}
        try:
            args = parse({where: scaling})
        except KvscopeError as exc:
            assert "\n" not in str(exc), str(exc)
            continue
        cos, sin = rope_tables(args, args.max_position_embeddings, CPU, torch.float32)
        assert bool(torch.isfinite(cos).all() and torch.isfinite(sin).all()), (where, sub, value)


# ---- 3. values that make NaN logits or negative bytes ------------------------------------------------------------
NAN_MAKERS = [
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number >= 1.18e-38 .*, got 0"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number >= 1.18e-38 .*, got -1e-05"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps must be .*, got NaN"),
    ({"rms_norm_eps": math.inf}, "rms_norm_eps must be .*, got Infinity"),
    ({"rms_norm_eps": 1e-300}, "rms_norm_eps must be .*, got 1e-300"),  # 0 in float32
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number, got '1e-5'"),
    ({"rope_theta": 0}, "rope_theta must be a finite number > 0, got 0"),
    ({"rope_theta": -10000.0}, "rope_theta must be a finite number > 0, got -10000.0"),
    ({"rope_theta": math.nan}, "rope_theta must be a finite number > 0, got NaN"),
    ({"rope_theta": math.inf}, "rope_theta must be a finite number > 0, got Infinity"),
    ({"rope_theta": 10**400}, "rope_theta must be a finite number > 0, got 1000"),
    ({"rope_theta": 1e-300}, "rope_theta=1e-300 gives RoPE angles that are not finite in float32 over 256 positions"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be a finite number > 0, got 0"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "rope_scaling.factor must be a finite number > 0, got -2.0"),
    ({"rope_scaling": {"type": "llama3", "factor": math.nan}}, "rope_scaling.factor must be .*, got NaN"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": math.inf}}, "rope_parameters.factor must be .*Infinity"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 1e-300}},
     "with linear factor 1e-300 gives RoPE angles that are not finite"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0}},
     "rope_scaling.low_freq_factor must be a finite number > 0, got 0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     r"rope_scaling.high_freq_factor \(4.0\) must be greater than rope_scaling.low_freq_factor \(4.0\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 0.5}},
     r"high_freq_factor \(0.5\) must be greater than rope_scaling.low_freq_factor \(1.0\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}},
     r"original_max_position_embeddings must be an integer in \[1, 2147483647\], got 0"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope scaling 'linear' lacks 'factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": None}}, "rope scaling 'linear' lacks 'factor'"),
]


@pytest.mark.parametrize(("change", "message"), NAN_MAKERS, ids=[str(c) for c, _ in NAN_MAKERS])
def test_nan_making_configs_are_refused(change: dict[str, Any], message: str) -> None:
    raises_one_line(message, parse, change)


def _direct(**change: Any) -> ModelArgs:
    kw: dict[str, Any] = dict(name="direct", family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=96, vocab_size=320, max_position_embeddings=256)
    return ModelArgs(**{**kw, **change})


DIRECT = [
    ({"head_dim": -16}, r"head_dim \(0: dim // n_heads\) must be an integer in \[0, 2147483647\], got -16"),
    ({"norm_eps": 0.0}, "norm_eps must be a finite number >= 1.18e-38"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number >= 1.18e-38 .*, got NaN"),
    ({"rope_theta": -1.0}, "rope_theta must be a finite number > 0, got -1.0"),
    ({"rope_theta": "1e4"}, "rope_theta must be a number, got '1e4'"),
    ({"rope_scaling": RopeScaling("linear", 0.0)}, "rope_scaling: factor must be a finite number > 0, got 0.0"),
    ({"rope_scaling": RopeScaling("llama3", 8.0, 2.0, 2.0)}, "high_freq_factor \\(2.0\\) must be greater than"),
    ({"rope_scaling": RopeScaling("default", 1.0)}, "unsupported rope_type 'default'"),
    ({"rope_scaling": RopeScaling("yarn", 4.0)}, "unsupported rope_type 'yarn'"),
    ({"max_position_embeddings": True}, "max_position_embeddings must be an integer, got true"),
    ({"dim": 64.5}, "dim must be an integer, got 64.5"),
    ({"vocab_size": 2**40}, r"vocab_size must be an integer in \[1, 2147483647\]"),
    ({"qkv_bias": 1}, "qkv_bias must be true or false, got 1"),
]


@pytest.mark.parametrize(("change", "message"), DIRECT, ids=[str(c) for c, _ in DIRECT])
def test_model_args_validates_its_own_fields(change: dict[str, Any], message: str) -> None:
    msg = raises_one_line(message, _direct, **change)
    assert msg.startswith("model 'direct': ")


def test_integral_floats_become_ints_in_model_args() -> None:
    a = _direct(dim=64.0, head_dim=16.0)
    assert type(a.dim) is int and type(a.head_dim) is int and a.q_size == 64


@pytest.mark.parametrize("change", [{"head_dim": -16}, {"rms_norm_eps": 0}, {"rope_theta": -1},
                                    {"num_key_value_heads": -2}])
def test_kv_math_refuses_instead_of_negative_bytes(change: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**LLAMA, **change}))
    err = cli_error(["kv-math", "--model", str(cfg), "--json"], capsys)
    assert next(iter(change)) in err


# ---- 4. NaN / inf weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tensor", "value"), [
    ("model.norm.weight", math.nan),
    ("model.layers.1.self_attn.k_proj.weight", math.inf),  # a slice of the fused wqkv
    ("model.layers.0.mlp.up_proj.weight", -math.inf),  # a slice of the fused w13
    ("model.embed_tokens.weight", math.nan),
    ("lm_head.weight", math.inf),
])
def test_non_finite_weights_are_refused_naming_the_tensor(tensor: str, value: float, tmp_path: Path) -> None:
    state = random_state(LLAMA)
    state[tensor].view(-1)[7] = value
    folder = write_checkpoint(tmp_path / "nan", shards=2, state=state)
    msg = raises_one_line(f"tensor {tensor} holds NaN or infinite values", load, folder)
    assert str(folder) in msg


def test_nan_in_a_bfloat16_checkpoint(tmp_path: Path) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in random_state(LLAMA).items()}
    state["model.layers.0.input_layernorm.weight"][3] = math.nan
    folder = write_checkpoint(tmp_path / "bf16", state=state)
    raises_one_line(r"tensor model\.layers\.0\.input_layernorm\.weight holds NaN", load, folder)


def test_weights_beyond_float16_range_are_refused_in_float16(tmp_path: Path) -> None:
    state = random_state(LLAMA)
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    folder = write_checkpoint(tmp_path / "big", state=state)
    assert load(folder, torch.float32) is not None
    raises_one_line(r"tensor model\.layers\.1\.self_attn\.o_proj\.weight holds values beyond the range of float16 "
                    r"\(finite in the file, as float32\)", load, folder, torch.float16)


def test_state_dict_path_checks_too() -> None:
    state = random_state(LLAMA)
    state["model.layers.1.post_attention_layernorm.weight"][0] = math.nan
    model = empty_model(ModelArgs.from_hf_config(LLAMA), "cpu", torch.float32)
    raises_one_line(r"state dict: tensor model\.layers\.1\.post_attention_layernorm\.weight holds NaN",
                    load_hf_tensors, model, state.items())
    raises_one_line(r"state dict: tensor 'model\.norm\.weight' is given twice", load_hf_tensors, model,
                    [("model.norm.weight", torch.ones(64))] * 2)


def test_cli_generate_on_nan_weights_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = random_state(LLAMA)
    state["model.norm.weight"][0] = math.nan
    folder = write_checkpoint(tmp_path / "nan", state=state)
    err = cli_error(["generate", "--model", str(folder), "--prompt-ids", "1,2", "--device", "cpu"], capsys)
    assert "tensor model.norm.weight holds NaN or infinite values" in err


# ---- 5. a tensor in two shards; index entries outside the folder --------------------------------------------------
def test_tensor_in_two_shards_without_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = write_checkpoint(tmp_path / "dup")
    save_file({"model.norm.weight": torch.zeros(64)}, str(folder / "zz-extra.safetensors"))
    msg = raises_one_line(r"tensor 'model\.norm\.weight' is in two shards: .*model\.safetensors and "
                          r".*zz-extra\.safetensors", load, folder)
    assert str(folder / "model.safetensors") in msg and str(folder / "zz-extra.safetensors") in msg


def test_tensor_in_two_shards_of_an_index(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = write_checkpoint(tmp_path / "dup", shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    shard3 = folder / "model-00003-of-00003.safetensors"
    with safe_open(str(shard3), framework="pt") as f:
        part = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    part[victim] = torch.zeros_like(random_state(LLAMA)[victim])
    save_file(part, str(shard3))
    raises_one_line(f"tensor '{victim}' is in two shards: .*model-00001-of-00003.safetensors and "
                    ".*model-00003-of-00003.safetensors", load, folder)


def _point_index_at(folder: Path, target: str) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = target
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../other/model.safetensors", "sub/../../other/model.safetensors",
                                    "/etc/passwd", "ABSOLUTE"])
def test_index_entry_outside_the_folder_is_refused(target: str, tmp_path: Path) -> None:
    other = write_checkpoint(tmp_path / "other")
    folder = write_checkpoint(tmp_path / "ckpt", shards=2)
    if target == "ABSOLUTE":
        target = str(other / "model.safetensors")
    _point_index_at(folder, target)
    msg = raises_one_line("weight_map entry .* points outside the checkpoint folder", resolve_model, str(folder))
    assert target[:60] in msg


def test_index_entry_through_a_link_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    other = write_checkpoint(tmp_path / "other")
    folder = write_checkpoint(tmp_path / "ckpt", shards=2)
    (folder / "escape.safetensors").symlink_to(other / "model.safetensors")
    _point_index_at(folder, "escape.safetensors")
    raises_one_line(r"shard escape\.safetensors resolves to .*other/model\.safetensors, outside the checkpoint "
                    "folder", resolve_model, str(folder))


def test_weights_file_linked_from_outside_is_refused_without_index(tmp_path: Path) -> None:
    other = write_checkpoint(tmp_path / "other")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    (folder / "model.safetensors").symlink_to(other / "model.safetensors")
    raises_one_line(r"weights file model\.safetensors resolves to .*, outside the checkpoint folder",
                    resolve_model, str(folder))


def test_links_inside_the_folder_and_the_hub_cache_layout_are_accepted(tmp_path: Path) -> None:
    # inside the folder
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").rename(folder / "real.bin")
    (folder / "model.safetensors").symlink_to("real.bin")
    assert load(folder).args.dim == 64
    # the Hugging Face hub cache: snapshots/<rev>/model.safetensors -> ../../blobs/<sha>
    repo = tmp_path / "models--org--tiny"
    write_checkpoint(repo / "blobs-src")
    (repo / "blobs").mkdir()
    (repo / "blobs-src" / "model.safetensors").rename(repo / "blobs" / "abc123")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA))
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "abc123")
    assert load(snap).args.dim == 64


@pytest.mark.parametrize(("index", "message"), [
    ('{"weight_map": {"model.norm.weight": 5}}', "weight_map entry 'model.norm.weight' is 5, not a file name"),
    ('{"weight_map": {"model.norm.weight": ""}}', "weight_map entry 'model.norm.weight' is '', not a file name"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "key 'a' appears twice in one object"),
    ('{"weight_map": []}', "has no weight_map"),
    ('{"weight_map": "model.safetensors"}', "has no weight_map"),
    ("[1, 2]", "does not hold a JSON object"),
    ("{", "is not valid JSON"),
])
def test_malformed_index_is_refused(index: str, message: str, ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text(index)
    raises_one_line(message, resolve_model, str(ckpt))


# ---- 6. list-valued fields given a string ------------------------------------------------------------------------
def test_architectures_as_a_string_is_a_list_of_one() -> None:
    cfg = {k: v for k, v in LLAMA.items() if k != "model_type"}
    assert ModelArgs.from_hf_config({**cfg, "architectures": "LlamaForCausalLM"}).family == "llama"
    assert ModelArgs.from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"]}).family == "llama"


@pytest.mark.parametrize(("archs", "shown"), [
    ("GPT2LMHeadModel", "architectures=GPT2LMHeadModel;"),
    (["GPT2LMHeadModel", "Other"], "architectures=GPT2LMHeadModel,Other;"),
    ([], "architectures=none;"),
    (None, "architectures=none;"),
    ("Bad\nName", r"architectures=Bad\\nName;"),
])
def test_unsupported_architectures_print_whole_names(archs: Any, shown: str) -> None:
    msg = raises_one_line("unsupported architecture", parse, {"model_type": "gpt2", "architectures": archs})
    assert shown.replace("\\\\", "\\") in msg and "G,P,T" not in msg


@pytest.mark.parametrize(("archs", "message"), [
    ([1, None], r"architectures must be a list of strings, got \[1, null\]"),
    ({"LlamaForCausalLM": 1}, r"architectures must be a list of strings, got \{\"LlamaForCausalLM\": 1\}"),
    (7, "architectures must be a list of strings, got 7"),
    ([["LlamaForCausalLM"]], "architectures must be a list of strings"),
])
def test_architectures_of_another_type_are_refused(archs: Any, message: str) -> None:
    raises_one_line(message, parse, {"model_type": None, "architectures": archs})


# ---- 7. kv-math needs only the architecture ------------------------------------------------------------------------
@pytest.fixture
def config_only(tmp_path: Path) -> Path:
    folder = tmp_path / "Llama-70B-config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, "torch_dtype": "float32"}))
    return folder


def test_kv_math_on_a_folder_with_only_config_json(config_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-math", "--model", str(config_only), "--seq", "100", "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["kv-math", "--model", str(config_only / "config.json"), "--seq", "100", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_folder == {**from_file, "model": "Llama-70B-config-only"}
    assert from_folder["dtype"] == "float32"  # torch_dtype of the config.json
    assert from_folder["weights_bytes"] == ModelArgs.from_hf_config(LLAMA).param_count() * 4
    assert from_folder["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4


def test_architecture_only_resolution(config_only: Path, tmp_path: Path) -> None:
    src = resolve_model(str(config_only), need_weights=False)
    assert src.kind == "config" and src.folder is None and src.args.dim == 64
    raises_one_line(r"has no \*\.safetensors weights \(pass its config\.json for random weights\)", resolve_model,
                    str(config_only))
    # a folder whose weights are broken still gives its architecture to kv-math, and its weights to nobody
    (config_only / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../../etc"}}')
    assert resolve_model(str(config_only), need_weights=False).kind == "checkpoint"
    raises_one_line("points outside the checkpoint folder", resolve_model, str(config_only))
    ckpt = write_checkpoint(tmp_path / "full")
    assert resolve_model(str(ckpt), need_weights=False).folder == ckpt


@pytest.mark.parametrize("command", ["generate", "run"])
def test_commands_that_load_weights_still_refuse_a_config_only_folder(
        command: str, config_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = (["--prompt-ids", "1,2"] if command == "generate" else
             ["--seq", "8", "--gen-tokens", "2", "--out", str(tmp_path / "out")])
    err = cli_error([command, "--model", str(config_only), "--device", "cpu", *extra], capsys)
    assert f"model folder {config_only} has no *.safetensors weights" in err


@pytest.mark.parametrize(("dtype", "message"), [
    ("float64", r"config.json names torch_dtype 'float64', not one of float32, bfloat16, float16; pass --dtype"),
    (5, "config.json names torch_dtype 5"),
    (["bfloat16"], r"config.json names torch_dtype \[\"bfloat16\"\]"),
])
def test_kv_math_refuses_a_dtype_it_cannot_size(dtype: Any, message: str, config_only: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (config_only / "config.json").write_text(json.dumps({**LLAMA, "torch_dtype": dtype}))
    raises_one_line(message, resolve_model(str(config_only), need_weights=False).dtype_name)
    err = cli_error(["kv-math", "--model", str(config_only)], capsys)
    assert "torch_dtype" in err and "--dtype" in err
    assert main(["kv-math", "--model", str(config_only), "--dtype", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bf16"


# ---- 8. an empty --model -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_model_is_its_own_error(spec: str) -> None:
    msg = raises_one_line(r"--model is empty \(.*\): give a preset name, a checkpoint folder or a config\.json",
                          resolve_model, spec)
    assert "has no config.json" not in msg
    raises_one_line("--model is empty", resolve_model, spec, need_weights=False)


@pytest.mark.parametrize("command", [["kv-math"], ["generate", "--prompt-ids", "1"]])
def test_cli_empty_model(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error([*command, "--model", ""], capsys)
    assert "empty" in err and "config.json" not in err.split("empty")[0]
    assert "has no config.json" not in err


@pytest.mark.parametrize("spec", ["x" * 5000, "a/" * 3000, "~no-such-user-kvscope/model", "bad\x00name"])
def test_unusable_model_paths_are_one_line(spec: str) -> None:
    msg = raises_one_line(".", resolve_model, spec)
    assert len(msg) < 500


# ---- 9. a tokenizer that cannot load -----------------------------------------------------------------------------
TOKENIZER_FILES = {
    "no tokenizer files": {},
    "tokenizer.json not JSON": {"tokenizer.json": "{garbage",
                                "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast"}'},
    "tokenizer.json of the wrong shape": {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}'},
    "tokenizer_class a number": {"tokenizer_config.json": '{"tokenizer_class": 5}'},
}


@pytest.mark.parametrize("kind", sorted(TOKENIZER_FILES))
def test_tokenizer_that_cannot_load_is_one_complete_line(kind: str, ckpt: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in TOKENIZER_FILES[kind].items():
        (ckpt / name).write_text(text)
    err = cli_error(["generate", "--model", str(ckpt), "--prompt", "hello", "--device", "cpu"], capsys)
    assert f"cannot load a tokenizer from {ckpt} (" in err
    detail = err.split("): ", 1)[1]
    assert detail and len(err) < 600
    assert not detail.endswith(":"), err  # not cut after "one of:"


def test_one_line_joins_and_cuts_at_a_sentence() -> None:
    text = "Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a slow one.\nInstall it."
    assert one_line(text) == "Couldn't instantiate the backend tokenizer from one of: (1) a file, (2) a slow one. " \
                             "Install it."
    long = "This first sentence is long enough to be kept. " + "word " * 200
    assert one_line(long, 100) == "This first sentence is long enough to be kept. ..."
    short_first = "Short. " + "word " * 200  # a sentence under a third of the limit: cut at a word instead
    assert one_line(short_first, 100).startswith("Short. word word") and len(one_line(short_first, 100)) <= 100
    no_stop = "word " * 200
    cut = one_line(no_stop, 100)
    assert len(cut) <= 100 and cut.endswith("word...") and "\n" not in cut
    assert one_line("a\r\nb\tc") == "a b c"

