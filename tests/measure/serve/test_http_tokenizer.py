"""The HTTP front's tokenizers: the stand-in of random-weight models (UTF-8 bytes at ids 3..258, markers for what
is not a byte of valid UTF-8, streamed pieces that join to the whole), and a checkpoint folder's own (transformers,
local files only) with its end-of-sequence ids from the tokenizer and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope.measure.serve.tokenizer import (
    BYTE_OFFSET,
    STAND_IN_NAME,
    CheckpointTokenizer,
    StandInBytes,
    load_tokenizer,
    plain_chat,
)
from kvscope.model.config import ModelArgs
from kvscope.model.source import ModelSource

TEXT = "héllo, wörld € 𝄞 ok"


def _pieces(tok: StandInBytes | CheckpointTokenizer, ids: list[int]) -> list[str]:
    s = tok.stream()
    return [s.add(t) for t in ids] + [s.finish()]


def test_stand_in_round_trip_and_stream() -> None:
    tok = StandInBytes(512)
    ids = tok.encode(TEXT)
    assert ids == [b + BYTE_OFFSET for b in TEXT.encode()]
    assert tok.decode(ids) == TEXT
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == TEXT
    assert pieces[ids.index(ord("h") + BYTE_OFFSET)] == "h" and "" in pieces  # multi-byte characters wait


def test_stand_in_markers() -> None:
    tok = StandInBytes(512)
    ids = [0xE2 + 3, 0x82 + 3, ord("A") + 3, 300, 0xFF + 3, 1, 0xE2 + 3]  # cut sequence, non-byte ids, a tail
    assert tok.decode(ids) == "<229><133>A<300><258><1><229>"
    assert "".join(_pieces(tok, ids)) == tok.decode(ids)


def test_stand_in_small_vocabularies() -> None:
    assert StandInBytes(256).encode("A") == [65]  # no room for the offset: bytes at their own ids
    with pytest.raises(ValueError, match="token ids"):
        StandInBytes(100).encode("A")
    assert StandInBytes(512).chat([{"role": "user", "content": "hi"}]) == StandInBytes(512).encode(
        "user: hi\nassistant:")


def test_presets_get_the_stand_in() -> None:
    tok = load_tokenizer(ModelSource("preset", "tiny", ModelArgs.from_preset("tiny")), print)
    assert tok.name == STAND_IN_NAME and tok.stop_ids == frozenset()


def _checkpoint_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3, "kv": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))


def test_checkpoint_tokenizer(tmp_path: Path) -> None:
    _checkpoint_tokenizer(tmp_path)
    source = ModelSource("checkpoint", str(tmp_path), ModelArgs.from_preset("tiny"), folder=tmp_path)
    tok = load_tokenizer(source, print)
    assert isinstance(tok, CheckpointTokenizer) and tok.name.startswith(f"checkpoint {tmp_path.name}")
    assert tok.encode("hello world") == [1, 2]
    assert tok.stop_ids == frozenset({3, 4})
    assert "".join(_pieces(tok, [1, 2, 1])) == tok.decode([1, 2, 1]) == "hello world hello"
    assert tok.chat([{"role": "user", "content": "hello"}]) == tok.encode(plain_chat([{"role": "user",
                                                                                         "content": "hello"}]))


def test_checkpoint_without_tokenizer_falls_back(tmp_path: Path) -> None:
    said: list[str] = []
    source = ModelSource("checkpoint", str(tmp_path), ModelArgs.from_preset("tiny"), folder=tmp_path)
    tok = load_tokenizer(source, said.append)
    assert tok.name == STAND_IN_NAME and said and STAND_IN_NAME in said[0]
