"""The HTTP front driven by the official `openai` client (tiny preset, CPU): completions and chat completions,
streamed and not, prompts as text and as token ids. The token counts the client sees equal the records, and the
times it measures match the records on one clock (client and server share this process's `perf_counter`):

- each event the client sees happens after the server made it, to within the clock's resolution, and at most
  `TRANSPORT_S` later (the transport: from the HTTP client's request hook through loopback TCP and uvicorn's
  parsing to the app; on the way back, from the body handed to uvicorn's transport to the client having read and
  parsed it);
- hence the client's TTFT and end-to-end latency equal the server's (from the request's HTTP arrival to the first
  token read on the host / to the last byte written) plus a transport of 0 to 2 x `TRANSPORT_S`, and are at least
  the engine's TTFT and e2e (from the moment the request was parsed).

An end-of-sequence token ends a request (finish_reason "stop", recorded finished with fewer tokens than asked)
unless it asks `ignore_eos`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import pytest
from http_server import running

from kvscope.measure.serve.http import EOS_REASON
from kvscope.profiler import nvtx
from kvscope.schema import HTTP_REQUEST_COLUMNS, REQUEST_COLUMNS

RES_S = time.get_clock_info("perf_counter").resolution
# loopback TCP in one process (the client, the server and the loop's thread share the GIL); observed: 0.5 to 3 ms
TRANSPORT_S = 0.1
PROMPT_IDS = [5, 17, 99, 3, 250, 7, 81, 12]


def _client(url: str, sent: list[float] | None = None) -> openai.OpenAI:
    """The client; `sent` collects when each request goes out (the HTTP client's request hook: after the openai
    client built it, before it is written)."""
    hooks = {"request": [lambda _r: sent.append(time.perf_counter())]} if sent is not None else {}
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(event_hooks=hooks))


def _streamed(stream: Any, t_send: float) -> dict[str, Any]:
    seen: dict[str, Any] = {"t_send": t_send, "t_first": None, "tokens": 0, "text": "", "finish": None,
                            "usage": None, "rid": None}
    for chunk in stream:
        now = time.perf_counter()
        extra = chunk.model_extra or {}
        if "kvscope" in extra:
            seen["rid"] = extra["kvscope"]["request_id"]
        if chunk.usage is not None:
            seen["usage"] = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text = choice.delta.content if hasattr(choice, "delta") else choice.text
        seen["text"] += text or ""
        if choice.finish_reason is None:
            seen["tokens"] += 1
            seen["t_first"] = seen["t_first"] or now
        else:
            seen["finish"] = choice.finish_reason
    seen["t_done"] = time.perf_counter()
    return seen


def _whole(response: Any, t_send: float) -> dict[str, Any]:
    t_done = time.perf_counter()
    choice = response.choices[0]
    text = choice.message.content if hasattr(choice, "message") else choice.text
    return {"t_send": t_send, "t_first": None, "t_done": t_done, "tokens": response.usage.completion_tokens,
            "text": text, "finish": choice.finish_reason, "usage": response.usage,
            "rid": response.model_extra["kvscope"]["request_id"]}


def _calls(client: openai.OpenAI, sent: list[float]) -> list[dict[str, Any]]:
    """Completions (text, whole), completions (ids, streamed with usage), chat (whole), chat (streamed)."""
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo, wörld"}]
    seen = [_whole(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12,
                                             temperature=0), sent[-1])]
    stream = client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    seen.append(_streamed(stream, sent[-1]))
    seen.append(_whole(client.chat.completions.create(model="tiny", messages=chat, max_tokens=9), sent[-1]))
    stream = client.chat.completions.create(model="tiny", messages=chat, max_tokens=15, stream=True,
                                            stream_options={"include_usage": True})
    seen.append(_streamed(stream, sent[-1]))
    return seen


def _check_times(seen: dict[str, Any], row: pd.Series, abs_: Any) -> None:
    http_arrival, last_byte = abs_(row["http_arrival_s"]), abs_(row["http_last_byte_s"])
    assert seen["t_send"] - RES_S <= http_arrival <= seen["t_send"] + TRANSPORT_S
    assert last_byte - RES_S <= seen["t_done"] <= last_byte + TRANSPORT_S
    client_e2e = seen["t_done"] - seen["t_send"]
    server_e2e = last_byte - http_arrival
    assert server_e2e - 2 * RES_S <= client_e2e <= server_e2e + 2 * TRANSPORT_S
    assert client_e2e >= row["e2e_ms"] / 1e3 - 2 * RES_S
    if seen["t_first"] is not None:
        first = abs_(row["first_token_s"])
        assert first - RES_S <= seen["t_first"] <= first + TRANSPORT_S
        client_ttft = seen["t_first"] - seen["t_send"]
        assert first - http_arrival - 2 * RES_S <= client_ttft <= first - http_arrival + 2 * TRANSPORT_S
        assert client_ttft >= row["ttft_ms"] / 1e3 - 2 * RES_S


def test_openai_client_counts_and_times(tmp_path: Path) -> None:
    sent: list[float] = []
    with running(tmp_path / "srv", max_seqs=8) as server:
        client = _client(server.url, sent)
        _calls(client, sent)  # the client's first use of each call imports and builds its types
        seen = _calls(client, sent) + _calls(client, sent)
        run = server.finish()
    req = run.requests.set_index("request_id")
    assert list(run.requests.columns) == [*REQUEST_COLUMNS, *HTTP_REQUEST_COLUMNS]
    assert len(req) == 12 and (req["status"] == "finished").all()
    for s, asked in zip(seen, (12, 20, 9, 15) * 2, strict=True):
        row = req.loc[s["rid"]]
        assert s["usage"].completion_tokens == row["generated_tokens"] == row["output_tokens"] == asked == s["tokens"]
        assert s["usage"].prompt_tokens == row["prompt_tokens"]
        assert s["usage"].total_tokens == row["prompt_tokens"] + row["generated_tokens"]
        assert s["finish"] == "length"
        _check_times(s, row, server.abs)
    assert req.loc[seen[1]["rid"], "prompt_tokens"] == len(PROMPT_IDS)
    assert req.loc[seen[0]["rid"], "prompt_tokens"] == len(b"The quick brown fox")  # the stand-in: one id a byte
    assert (req["server_overhead_ms"] >= 0).all() and run.http["server_overhead_ms"]["n"] == 12
    assert run.http["tokenizer"] == "stand-in bytes" and run.http["rejected"] == {}


def test_tokenizer_named_and_models_listed(tmp_path: Path) -> None:
    with running(tmp_path / "srv", served_model_name="kv-tiny") as server:
        client = _client(server.url)
        models = client.models.list()
        assert [m.id for m in models.data] == ["kv-tiny"]
        assert models.data[0].model_extra["kvscope"]["tokenizer"] == "stand-in bytes"
        raw = client.completions.with_raw_response.create(model="kv-tiny", prompt=[1, 2, 3], max_tokens=3)
        assert raw.headers["x-kvscope-tokenizer"] == "stand-in bytes"
        assert raw.parse().model_extra["kvscope"]["tokenizer"] == "stand-in bytes"
        try:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
            raise AssertionError("an unknown model was served")
        except openai.NotFoundError as exc:
            assert exc.body["param"] == "model" and exc.body["code"] == "model_not_found"
        server.finish()


def test_end_of_sequence_ends_a_request_unless_ignored(tmp_path: Path) -> None:
    """Greedy tokens of one prompt, alone each time: the third token made an end-of-sequence id ends the next
    request there (finish_reason stop); `ignore_eos` runs it to max_tokens."""
    with running(tmp_path / "srv") as server:
        client = _client(server.url)
        ask = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 10}
        first = client.completions.with_raw_response.create(**ask)
        rid0 = int(first.headers["x-kvscope-request-id"])
        tokens = server.front.loop.by_id[rid0].output
        server.front.tok.stop_ids = frozenset({tokens[2]})
        stop_at = tokens.index(tokens[2]) + 1
        stopped = client.completions.create(**ask)
        ignored = client.completions.create(**ask, extra_body={"ignore_eos": True})
        run = server.finish()
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == stop_at
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 10
    req = run.requests.set_index("request_id")
    row = req.loc[stopped.model_extra["kvscope"]["request_id"]]
    assert row["status"] == "finished" and row["reason"] == EOS_REASON and row["generated_tokens"] == stop_at
    assert run.http["finished_at_eos"] == 1
    assert server.front.loop.sched.pool.used == 0


class _Domain:
    """A stand-in NVTX domain: the ranges the server starts and ends (the instrument's push/pop ones ignored)."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}
        self.ended: list[str] = []

    def get_event_attributes(self, message: str, **_: Any) -> str:
        return message

    def start_range(self, attrs: str) -> int:
        self.open[len(self.open) + len(self.ended)] = attrs
        return len(self.open) + len(self.ended) - 1

    def end_range(self, range_id: int) -> None:
        self.ended.append(self.open.pop(range_id))

    def push_range(self, _attrs: str) -> None:  # the instrument's ranges (`iter N`, ...)
        pass

    def pop_range(self) -> None:
        pass


def test_nvtx_range_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    domain = _Domain()
    monkeypatch.setattr(nvtx, "open_domain", lambda: domain)
    with running(tmp_path / "srv", nvtx=True) as server:
        client = _client(server.url)
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=3)
        list(client.completions.create(model="tiny", prompt=[3, 4], max_tokens=3, stream=True))
        server.finish()
    assert sorted(domain.ended) == ["req 0", "req 1"] and domain.open == {}


def test_no_request_no_folder(tmp_path: Path) -> None:
    with running(tmp_path / "srv") as server:
        assert server.finish() is None
    assert not (tmp_path / "srv").exists()
