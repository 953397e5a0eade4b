"""Text to token ids and back for the HTTP front (`kvscope serve --http`).

- A checkpoint folder: its own tokenizer (transformers' `AutoTokenizer` from the folder, local files only, nothing
  downloaded); chat messages through its chat template when it has one; its end-of-sequence ids (the tokenizer's and
  generation_config.json's) end a request unless it asks `ignore_eos`.
- A preset or a config.json (random weights, no tokenizer of their own): the stand-in `stand-in bytes`. Text is
  UTF-8; byte b is token id `BYTE_OFFSET + b` (ids 0 to 2 stay free, as in ByT5); a vocabulary under 256 + 3 ids puts
  byte b at id b, and one under 256 ids takes no text (token-id prompts only). Decoding is the inverse where an id is
  a byte of valid UTF-8; any other id, and any byte that cannot start or continue a valid UTF-8 sequence, becomes the
  marker `<id>`. It has no end of sequence. Chat messages become `role: content` lines, then `assistant:`.

Streamed text comes from `stream()`: `add(token)` gives the text that token completes (possibly "", while a
multi-byte character or a word piece is incomplete), `finish()` the rest; the pieces joined equal `decode(ids)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kvscope.model.source import ModelSource, one_line

STAND_IN_NAME = "stand-in bytes"
BYTE_OFFSET = 3  # ids 0..2 left free (ByT5's pad, eos, unk)


class TextStream(Protocol):
    def add(self, token: int) -> str: ...

    def finish(self) -> str: ...


class Tokenizer(Protocol):
    name: str
    stop_ids: frozenset[int]  # ids that end a request (unless it asks ignore_eos)

    def encode(self, text: str) -> list[int]: ...

    def chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def stream(self) -> TextStream: ...

    def decode(self, ids: list[int]) -> str: ...


def plain_chat(messages: list[dict[str, str]]) -> str:
    """Messages as `role: content` lines, then `assistant:` (the stand-in's, and a checkpoint's without a template)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class _ByteStream:
    """Incremental UTF-8 decoding of the stand-in's ids (see the module docstring)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.pending = bytearray()

    def add(self, token: int) -> str:
        b = token - self.offset
        if not 0 <= b < 256:
            return self._take(final=True) + f"<{token}>"
        self.pending.append(b)
        return self._take(final=False)

    def finish(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        out: list[str] = []
        while self.pending:
            try:
                out.append(self.pending.decode("utf-8"))
                self.pending.clear()
            except UnicodeDecodeError as exc:
                out.append(self.pending[:exc.start].decode("utf-8"))
                del self.pending[:exc.start]
                if exc.end == len(self.pending) + exc.start and exc.reason == "unexpected end of data" and not final:
                    break  # an incomplete character at the end: wait for its next byte
                out.append(f"<{self.pending[0] + self.offset}>")
                del self.pending[:1]
        return "".join(out)


class StandInBytes:
    """The stand-in tokenizer of random-weight models (see the module docstring)."""

    name = STAND_IN_NAME
    stop_ids: frozenset[int] = frozenset()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.offset = BYTE_OFFSET if vocab_size >= 256 + BYTE_OFFSET else 0

    def encode(self, text: str) -> list[int]:
        if self.vocab_size < 256:
            raise ValueError(f"the model's vocabulary of {self.vocab_size} ids cannot hold the stand-in tokenizer's "
                             "256 bytes: send token ids")
        return [b + self.offset for b in text.encode("utf-8")]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(plain_chat(messages))

    def stream(self) -> TextStream:
        return _ByteStream(self.offset)

    def decode(self, ids: list[int]) -> str:
        s = self.stream()
        return "".join(s.add(t) for t in ids) + s.finish()


class _PieceStream:
    """Incremental decoding with a transformers tokenizer: the text a token adds is the decode of the last few ids
    minus that of the ones before it, held back while it ends in an incomplete character (U+FFFD)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded and sent
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def finish(self) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class CheckpointTokenizer:
    """A checkpoint folder's own tokenizer (transformers)."""

    def __init__(self, tok: Any, folder: Path) -> None:
        self.tok = tok
        self.name = f"checkpoint {folder.name} ({type(tok).__name__})"
        self.stop_ids = frozenset(_stop_ids(tok, folder))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tok.encode(text, add_special_tokens=False))
        return self.encode(plain_chat(messages))

    def stream(self) -> TextStream:
        return _PieceStream(self.decode)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def _stop_ids(tok: Any, folder: Path) -> set[int]:
    """The tokenizer's eos id and generation_config.json's `eos_token_id` (an id or a list of them)."""
    ids: set[int] = set()
    if isinstance(getattr(tok, "eos_token_id", None), int):
        ids.add(tok.eos_token_id)
    try:
        value = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ids
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, int) and not isinstance(v, bool):
            ids.add(v)
    return ids


def load_tokenizer(source: ModelSource, say: Callable[[str], None]) -> Tokenizer:
    """The checkpoint's own tokenizer, or the stand-in for random weights (and, said, for a checkpoint folder whose
    tokenizer cannot be loaded: its requests can still give token ids)."""
    if source.kind != "checkpoint" or source.folder is None:
        return StandInBytes(source.args.vocab_size)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source.folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing or bad file
        say(f"no tokenizer loaded from {source.folder} ({type(exc).__name__}: {one_line(str(exc), 200)}); text is "
            f"served through the {STAND_IN_NAME} stand-in")
        return StandInBytes(source.args.vocab_size)
    return CheckpointTokenizer(tok, source.folder)


def check_ids(ids: list[int], vocab_size: int) -> None:
    """Token ids of a prompt: whole numbers in [0, vocab_size); ValueError naming the first that is not."""
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"token {i} is {one_line(repr(t), 40)}; ids are whole numbers from 0 to {vocab_size - 1}")

