"""The generation behind `kvscope generate`: plan, load and run greedy generation with the plan's loop (kvscope's or
transformers', `--engine`), on one device or split over `tp` ranks (`kvscope.measure.tp_generate`); and the prompts'
tokens from a checkpoint folder's own tokenizer (local files only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvscope.engine.greedy import check_prompts
from kvscope.engine.plan import RunSpec, prepare
from kvscope.errors import KvscopeError
from kvscope.measure.run import load_for, make_engine
from kvscope.measure.tp_generate import generate_tp
from kvscope.model.dtypes import dtype_name
from kvscope.model.source import one_line


@dataclass(frozen=True)
class Generation:
    """The new tokens (one list per prompt) and where and how fast the model was ready."""

    tokens: list[list[int]]
    ready_s: float
    where: str


def generate(spec: RunSpec, prompts: list[list[int]], max_new_tokens: int, tp: int | None = None,
             log: Callable[[str], None] | None = None) -> Generation | None:
    """Greedy generation of `max_new_tokens` per prompt (one ragged batch); `log` hears when the model is ready.
    None in a torchrun rank other than 0 (rank 0 holds the tokens)."""
    if max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    plan = prepare(replace(spec, gen_tokens=max_new_tokens), prompts=prompts)
    source, cfg = plan.source, plan.cfg
    check_prompts(prompts, source.args.vocab_size)
    say = log or (lambda _msg: None)
    if tp is not None:
        done = generate_tp(plan, prompts, max_new_tokens, tp)
        if done is None:
            return None
        where = f"{tp} ranks ({cfg.device.type})"
        say(_ready(plan.source, where, dtype_name(cfg.dtype), done.ready_s))
        return Generation(done.tokens, done.ready_s, where)
    model, ready_s = load_for(plan)
    say(_ready(plan.source, str(cfg.device), dtype_name(cfg.dtype), ready_s))
    return Generation(make_engine(model, plan).generate(prompts, max_new_tokens), ready_s, str(cfg.device))


def _ready(source: Any, where: str, dtype: str, ready_s: float) -> str:
    weights = ", random weights" if source.random_weights else ""
    return f"{source.args.name} ({source.kind}{weights}) on {where} in {dtype}, ready in {ready_s:.2f} s"


def load_tokenizer(folder: Path | None, spec: str) -> Any:
    """The tokenizer of a checkpoint folder (a transformers tokenizer), loaded from local files only."""
    if folder is None:
        raise KvscopeError(f"--prompt needs a checkpoint folder with a tokenizer; {spec} has none (use --prompt-ids)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, AttributeError... for a bad file
        detail = one_line(str(exc), 400) or "no message"
        raise KvscopeError(f"cannot load a tokenizer from {folder} ({type(exc).__name__}): {detail}") from None
