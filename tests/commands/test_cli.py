"""The CLI: output format, the defaults in every `--help`, and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIGS

from kvscope.cli import build_parser, main
from kvscope.engine.plan import DEFAULT_MODEL_CPU, DEFAULT_MODEL_CUDA


def test_generate_prints_one_list_per_prompt_and_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--model", "tiny", "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "5",
               "--device", "cpu", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    tokens = json.loads(lines[-1])["tokens"]
    assert [json.loads(x) for x in lines[:2]] == tokens
    assert [len(t) for t in tokens] == [5, 5]


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "kvscope", "generate", "--model", "tiny", "--prompt-ids", "9,8",
                          "--max-new-tokens", "3", "--device", "cpu"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "no-such-preset", "--prompt-ids", "1"], "unknown preset 'no-such-preset'"),
    (["--model", "/no/such/folder", "--prompt-ids", "1"], "model folder or file not found"),
    (["--model", "tiny", "--prompt-ids", "1,two"], "'two' in prompt 0 is not an integer"),
    (["--model", "tiny", "--prompt-ids", "1.5"], "'1.5' in prompt 0 is not an integer"),
    (["--model", "tiny", "--prompt-ids", ""], "prompt 0 is empty"),
    (["--model", "tiny", "--prompt-ids", "1,2;"], "prompt 1 is empty"),
    (["--model", "tiny", "--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--model", "tiny", "--prompt-ids", ",".join(["1"] * 2049)], "exceeds tiny's maximum context of 2048"),
    (["--model", "tiny", "--prompt-ids", "1", "--max-new-tokens", "2048"], "exceeds tiny's maximum of 2048"),
    (["--model", "tiny", "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--model", "tiny", "--prompt-ids", "1", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["--model", "tiny", "--prompt", "hello"], "needs a checkpoint folder with a tokenizer"),
    (["--model", "tiny"], "one of the arguments --prompt-ids --prompt is required"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    rc = main(["generate", "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("kvscope: error: "), err
    assert message in err[0]


def test_unsupported_architecture_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIGS["llama"], "model_type": "gpt_neox",
                                                      "architectures": ["GPTNeoXForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "unsupported architecture: model_type='gpt_neox'" in capsys.readouterr().err


def test_cuda_requested_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_subprocess_bad_input_has_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "kvscope", "generate", "--model", "tiny", "--prompt-ids", "x"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("cmd", ["generate", "run"])
def test_graphs_need_cuda(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = ["--prompt-ids", "1,2"] if cmd == "generate" else ["--out", str(tmp_path / "r")]
    assert main([cmd, "--model", "tiny", "--device", "cpu", "--graphs", "on", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--graphs on needs a CUDA device" in err[0]
    assert list(tmp_path.iterdir()) == []


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_help_shows_the_defaults(name: str) -> None:
    parser = _subparsers()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        shown = action.default if not isinstance(action.default, (list, tuple)) else " ".join(action.default)
        assert f"default: {shown})" in text or f"(default {shown})" in text, (name, action.option_strings)
    if any("--model" in a.option_strings and a.default is None and not a.required for a in parser._actions):
        assert f"{DEFAULT_MODEL_CUDA} on CUDA, {DEFAULT_MODEL_CPU} on a CPU" in text
