"""What one request to the HTTP front asks (`kvscope.measure.serve.http`), checked field by field: its body read
under a size limit and parsed as JSON, its model, its prompt (text, token ids, or chat messages), its output budget
against the longest sequence and the whole KV pool, and every sampling knob at the one value a greedy engine can
honour. Each problem is an `ApiError`: the HTTP status and an OpenAI-style JSON error naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from kvscope.measure.serve.tokenizer import Tokenizer, check_ids
from kvscope.model.source import one_line

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request answered with an error: status, message, the field it names, OpenAI's type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


# ---- what a request asks ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    model: str
    max_seq: int
    pool_blocks: int
    block_size: int
    vocab_size: int
    max_body_bytes: int
    queue_limit: int | None


@dataclass
class Ask:
    chat: bool
    prompt: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _is_num(v: Any) -> bool:
    return type(v) in (int, float)


# fields accepted only at the value that changes nothing (None, JSON null, always accepted), and what that value is
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _is_num(v) and v == 0, "0: the engine samples greedily"),
    "top_p": (lambda v: _is_num(v) and v == 1, "1: the engine samples greedily"),
    "n": (lambda v: type(v) is int and v == 1, "1: one choice per request"),
    "best_of": (lambda v: type(v) is int and v == 1, "1"),
    "presence_penalty": (lambda v: _is_num(v) and v == 0, "0: no penalties are served"),
    "frequency_penalty": (lambda v: _is_num(v) and v == 0, "0: no penalties are served"),
    "stop": (lambda v: v == [] or v == "", "absent: stop strings are not served"),
    "echo": (lambda v: v is False, "false"),
    "suffix": (lambda v: v == "", "absent"),
    "logit_bias": (lambda v: v == {}, "absent: no logit bias is served"),
    "top_logprobs": (lambda v: type(v) is int and v == 0, "absent: no logprobs are served"),
    "tools": (lambda v: v == [], "absent: no tools are served"),
    "tool_choice": (lambda v: v == "none", "none"),
    "response_format": (lambda v: v == {"type": "text"}, "text"),
    "store": (lambda v: v is False, "false"),
}
_FREE = {"seed": (int,), "user": (str,), "parallel_tool_calls": (bool,)}  # accepted, changing nothing here
_COMMON = {"model", "max_tokens", "stream", "stream_options", "ignore_eos", "temperature", "top_p", "n", "stop",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user"}
_FIELDS = {False: _COMMON | {"prompt", "best_of", "echo", "suffix"},
           True: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                            "parallel_tool_calls", "response_format", "store"}}


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false, got {one_line(json.dumps(v), 60)}", key)
    return bool(v)


def _knobs(body: dict[str, Any], chat: bool) -> None:
    unknown = sorted(set(body) - _FIELDS[chat])
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}: this server does not serve it", unknown[0])
    for key, (ok, neutral) in _NEUTRAL.items():
        v = body.get(key)
        if key in _FIELDS[chat] and v is not None and not ok(v):
            raise ApiError(400, f"{key} {one_line(json.dumps(v), 60)} cannot be honoured; only {neutral}", key)
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise ApiError(400, "logprobs cannot be honoured: no logprobs are served", "logprobs")
    for key, types in _FREE.items():
        v = body.get(key)
        if v is not None and (not isinstance(v, types) or (types == (int,) and isinstance(v, bool))):
            raise ApiError(400, f"{key} must be {types[0].__name__}", key)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) and set(p) <= {"type", "text"}
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be text or a list of text parts", f"{where}.content")


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"{where}.{extra[0]} is not served", f"{where}.{extra[0]}")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), where)})
    return out


def _prompt(v: Any, tok: Tokenizer, vocab: int) -> list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, list) and v and all(isinstance(x, (str, list)) for x in v):
        raise ApiError(400, "one prompt per request: send several requests", "prompt")
    try:
        if isinstance(v, str):
            return tok.encode(v)
        if isinstance(v, list):
            check_ids(v, vocab)
            return list(v)
    except ValueError as exc:
        raise ApiError(400, f"prompt: {exc}", "prompt") from None
    raise ApiError(400, "prompt must be text or a list of token ids", "prompt")


def _max_tokens(body: dict[str, Any], ask_chat: bool, n_prompt: int, limits: Limits, what: str) -> int:
    """The request's output budget, checked against the longest sequence and the whole KV pool."""
    key = "max_completion_tokens" if ask_chat and body.get("max_completion_tokens") is not None else "max_tokens"
    pool_tokens = limits.pool_blocks * limits.block_size
    room = min(limits.max_seq, pool_tokens) - n_prompt
    if n_prompt == 0:
        raise ApiError(400, f"{what} is empty: it holds no token", what)
    if room < 1:
        where = (f"the longest sequence, {limits.max_seq} tokens (--max-seq)" if n_prompt >= limits.max_seq
                 else f"the whole KV pool, {limits.pool_blocks} blocks of {limits.block_size} tokens")
        raise ApiError(400, f"{what} of {n_prompt} tokens leaves no room for output under {where}", what,
                       "context_length_exceeded")
    v = body.get(key)
    if v is None:
        return room if ask_chat else min(DEFAULT_COMPLETION_TOKENS, room)
    if type(v) is not int or v < 1:
        raise ApiError(400, f"{key} must be a whole number >= 1, got {one_line(json.dumps(v), 60)}", key)
    if v > room:
        where = (f"the longest sequence, {limits.max_seq} tokens (--max-seq)" if n_prompt + v > limits.max_seq
                 else f"the whole KV pool, {limits.pool_blocks} blocks of {limits.block_size} tokens")
        raise ApiError(400, f"{what} of {n_prompt} tokens + {key} {v} exceeds {where}: at most {room}", key,
                       "context_length_exceeded")
    return v


def parse_request(body: Any, chat: bool, limits: Limits, tok: Tokenizer) -> Ask:
    """What a completion (or chat completion) request asks, checked; ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required: the name /v1/models lists", "model")
    if model != limits.model:
        raise ApiError(404, f"the model {one_line(model, 80)!r} does not exist here; this server serves "
                            f"{limits.model!r}", "model", "model_not_found")
    _knobs(body, chat)
    what = "messages" if chat else "prompt"
    if body.get(what) is None:
        raise ApiError(400, f"{what} is required", what)
    try:
        prompt = tok.chat(_messages(body["messages"])) if chat else _prompt(body["prompt"], tok, limits.vocab_size)
        if chat:
            check_ids(prompt, limits.vocab_size)
    except ValueError as exc:
        raise ApiError(400, f"{what}: {exc}", what) from None
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options takes include_usage only", "stream_options")
    include_usage = _flag(options or {}, "include_usage") if options is not None else False
    max_tokens = _max_tokens(body, chat, len(prompt), limits, what)
    return Ask(chat, prompt, max_tokens, stream, include_usage, _flag(body, "ignore_eos"))


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body of {int(declared)} bytes exceeds {limit} (--max-body-bytes)", None,
                       "body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"the body exceeds {limit} bytes (--max-body-bytes)", None, "body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {one_line(str(exc), 200)}", None, "invalid_json") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
