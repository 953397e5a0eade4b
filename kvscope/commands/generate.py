"""`kvscope generate`: greedy generation with the hand-written loop (or transformers' loop, `--engine`). Prints the
new token ids, one JSON list per prompt (`;` separates prompts, which run as one ragged batch); progress and decoded
text go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvscope.engine.greedy import check_prompts
from kvscope.engine.plan import prepare
from kvscope.errors import KvscopeError
from kvscope.measure.options import model_options
from kvscope.measure.run import load_for, make_engine
from kvscope.model.dtypes import dtype_name
from kvscope.model.source import one_line, resolve_model


def command(ns: argparse.Namespace) -> int:
    if ns.model is None:
        raise KvscopeError("generate: --model is required (a preset, a checkpoint folder or a config.json)")
    if ns.max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    tokenizer = None
    if ns.prompt is not None:
        tokenizer = _load_tokenizer(resolve_model(ns.model).folder, ns.model)
        prompts = [tokenizer.encode(text) for text in ns.prompt]
        if any(len(p) == 0 for p in prompts):
            raise KvscopeError("--prompt: a prompt encodes to no tokens")
    else:
        prompts = parse_prompt_ids(ns.prompt_ids)
    plan = prepare(replace(model_options(ns), gen_tokens=ns.max_new_tokens), prompts=prompts)
    source, cfg = plan.source, plan.cfg
    check_prompts(prompts, source.args.vocab_size)
    tp = getattr(ns, "tp", None)
    if tp is not None:  # the model split over `tp` ranks (kvscope.measure.tp_generate)
        from kvscope.measure.tp_generate import generate_tp

        done = generate_tp(plan, prompts, ns.max_new_tokens, tp)
        if done is None:  # a torchrun rank other than 0: rank 0 prints
            return 0
        tokens, ready_s, where = done.tokens, done.ready_s, f"{tp} ranks ({cfg.device.type})"
    else:
        model, ready_s = load_for(plan)
        where = str(cfg.device)
    print(f"kvscope: {source.args.name} ({source.kind}{', random weights' if source.random_weights else ''}) "
          f"on {where} in {dtype_name(cfg.dtype)}, ready in {ready_s:.2f} s", file=sys.stderr)
    if tp is None:
        tokens = make_engine(model, plan).generate(prompts, ns.max_new_tokens)
    for row in tokens:
        print(json.dumps(row))
        if tokenizer is not None:
            print(f"kvscope: text: {tokenizer.decode(row)!r}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"tokens": tokens}))
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


def _load_tokenizer(folder: Path | None, spec: str) -> Any:
    """The tokenizer of a checkpoint folder (a transformers tokenizer), loaded from local files only."""
    if folder is None:
        raise KvscopeError(f"--prompt needs a checkpoint folder with a tokenizer; {spec} has none (use --prompt-ids)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, AttributeError... for a bad file
        detail = one_line(str(exc), 400) or "no message"
        raise KvscopeError(f"cannot load a tokenizer from {folder} ({type(exc).__name__}): {detail}") from None
