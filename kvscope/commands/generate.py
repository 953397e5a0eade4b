"""`kvscope generate`: greedy generation with the hand-written loop (or transformers' loop, `--engine`), through
`kvscope.measure.generate`. Prints the new token ids, one JSON list per prompt (`;` separates prompts, which run as
one ragged batch); progress and decoded text go to stderr."""

from __future__ import annotations

import argparse
import json
import sys

from kvscope.errors import KvscopeError
from kvscope.measure.generate import generate, load_tokenizer
from kvscope.measure.options import model_options
from kvscope.model.source import resolve_model


def command(ns: argparse.Namespace) -> int:
    if ns.model is None:
        raise KvscopeError("generate: --model is required (a preset, a checkpoint folder or a config.json)")
    if ns.max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    tokenizer = None
    if ns.prompt is not None:
        tokenizer = load_tokenizer(resolve_model(ns.model).folder, ns.model)
        prompts = [tokenizer.encode(text) for text in ns.prompt]
        if any(len(p) == 0 for p in prompts):
            raise KvscopeError("--prompt: a prompt encodes to no tokens")
    else:
        prompts = parse_prompt_ids(ns.prompt_ids)
    done = generate(model_options(ns), prompts, ns.max_new_tokens, getattr(ns, "tp", None),
                    log=lambda msg: print(f"kvscope: {msg}", file=sys.stderr))
    if done is None:  # a torchrun rank other than 0: rank 0 prints
        return 0
    for row in done.tokens:
        print(json.dumps(row))
        if tokenizer is not None:
            print(f"kvscope: text: {tokenizer.decode(row)!r}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"tokens": done.tokens}))
    return 0


def parse_prompt_ids(text: str) -> list[list[int]]:
    """`--prompt-ids`: comma-separated token ids, `;` between prompts."""
    prompts: list[list[int]] = []
    for i, part in enumerate(text.split(";")):
        items = [x.strip() for x in part.split(",")]
        if items == [""]:
            raise KvscopeError(f"--prompt-ids: prompt {i} is empty")
        ids: list[int] = []
        for item in items:
            try:
                ids.append(int(item))
            except ValueError:
                raise KvscopeError(f"--prompt-ids: {item!r} in prompt {i} is not an integer token id") from None
        prompts.append(ids)
    return prompts
