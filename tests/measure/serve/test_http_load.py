"""The HTTP front under load (tiny preset, CPU): 200 concurrent streaming clients against a KV pool that holds a
fraction of them (the rest queue) all answered in full, every one in the records with its server overhead; each bad
request answered with its 4xx and an error naming the field while a load runs beside it, that load finishing whole;
a queue limit answered 429; a client that goes away mid-stream has its request cut and its blocks freed at once."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from http_server import pool_gb, running

from kvscope.measure.serve.scheduler import CUT, FINISHED

POOL_BLOCKS = 64  # 1,024 positions: fewer than the model's context (2,048), far fewer than 200 requests need


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: status, token chunks, whether [DONE] came, the usage, the request id."""
    got: dict[str, Any] = {"tokens": 0, "done": False, "usage": None}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        got["status"], got["rid"] = r.status_code, r.headers.get("x-kvscope-request-id")
        if r.status_code != 200:
            got["error"] = json.loads(await r.aread())["error"]
            return got
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                got["usage"] = event["usage"]
            if event.get("choices") and event["choices"][0]["finish_reason"] is None:
                got["tokens"] += 1
    return got


def _clients(url: str, n: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(_stream(client, {**body, "prompt": [1 + i % 500, 7, 9, 11]})
                                          for i in range(n)))
    return asyncio.run(main())


def test_200_concurrent_streaming_clients(tmp_path: Path) -> None:
    with running(tmp_path / "srv", kv_pool_gb=pool_gb(POOL_BLOCKS)) as server:
        t = time.perf_counter()
        got = _clients(server.url, 200, {"model": "tiny", "max_tokens": 16})
        wall = time.perf_counter() - t
        run = server.finish()
    assert all(g["status"] == 200 and g["done"] and g["tokens"] == 16 for g in got), [g for g in got if
                                                                                      g["status"] != 200][:3]
    assert all(g["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20} for g in got)
    req = run.requests
    assert len(req) == 200 and (req["status"] == FINISHED).all() and (req["generated_tokens"] == 16).all()
    assert sorted(int(g["rid"]) for g in got) == sorted(req["request_id"])
    overhead = req["server_overhead_ms"].to_numpy()
    assert np.isfinite(overhead).all() and (overhead >= 0).all()
    assert np.isfinite(req[["http_arrival_s", "http_last_byte_s"]].to_numpy()).all()
    assert run.http["server_overhead_ms"]["n"] == 200
    assert (run.result.meta["serve"]["n_blocks"] - 1) * 16 < 200 * 20  # the pool held a fraction: the rest queued
    print(f"200 streams in {wall:.2f} s; server overhead per request p50 {np.median(overhead):.2f} ms, "
          f"p99 {np.percentile(overhead, 99):.2f} ms")


BIG = "x" * (1 << 20)
# (body, status, the field the error names, or None); the server: tiny, context 2,048, a pool of 1,024 positions
BAD: list[tuple[Any, int, str | None]] = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny", "prompt": [1], "max_tokens": NaN}', 400, None),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": 7}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 512]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, -2]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1] * 2100, "max_tokens": 1}, 400, "prompt"),  # longer than the context
    ({"model": "tiny", "prompt": [1] * 1500, "max_tokens": 1}, 400, "prompt"),  # longer than the whole pool
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": True}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 1500}, 400, "max_tokens"),  # prompt + output > the pool
    ({"model": "tiny", "prompt": [1, 2], "temperature": 0.8}, 400, "temperature"),
    ({"model": "tiny", "prompt": [1, 2], "top_p": 0.5}, 400, "top_p"),
    ({"model": "tiny", "prompt": [1, 2], "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": [1, 2], "stop": ["\n"]}, 400, "stop"),
    ({"model": "tiny", "prompt": [1, 2], "logprobs": 2}, 400, "logprobs"),
    ({"model": "tiny", "prompt": [1, 2], "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": [1, 2], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": [1, 2], "ignore_eos": 1}, 400, "ignore_eos"),
    ({"model": "tiny", "prompt": [1, 2], "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": "hi", "pad": BIG}, 413, None),
]
BAD_CHAT: list[tuple[Any, int, str | None]] = [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
]


async def _bad(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(path, content=raw, headers={"content-type": "application/json"})


async def _chunked(client: httpx.AsyncClient) -> httpx.Response:
    """A body too large, sent without a Content-Length (chunked): cut off as it is read."""
    async def parts() -> Any:
        for _ in range(40):
            yield b" " * 65536
    return await client.post("/v1/completions", content=parts())


def test_bad_requests_beside_a_load(tmp_path: Path) -> None:
    body = {"model": "tiny", "max_tokens": 48}

    async def main(url: str) -> tuple[list[dict[str, Any]], list[tuple[Any, httpx.Response]]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            load = asyncio.gather(*(_stream(client, {**body, "prompt": [3 + i, 5, 8]}) for i in range(24)))
            await asyncio.sleep(0.05)  # the load has begun
            answers = [(case, await _bad(client, "/v1/completions", case[0])) for case in BAD]
            answers += [(case, await _bad(client, "/v1/chat/completions", case[0])) for case in BAD_CHAT]
            answers.append(((None, 413, None), await _chunked(client)))
            answers.append(((None, 405, None), await client.get("/v1/completions")))
            answers.append(((None, 404, None), await client.post("/v1/nothing", json={})))
            return await load, answers

    with running(tmp_path / "srv", kv_pool_gb=pool_gb(POOL_BLOCKS)) as server:
        got, answers = asyncio.run(main(server.url))
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        run = server.finish()
    for (case, status, param), r in answers:
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param), (case if not isinstance(case, dict) or
                                                                    "pad" not in case else "pad", r.text[:300])
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    assert all(g["status"] == 200 and g["done"] and g["tokens"] == 48 for g in got)
    req = run.requests
    assert len(req) == 24 and (req["status"] == FINISHED).all()  # nothing rejected became a request
    assert sum(run.http["rejected"].values()) == len(answers)


def test_queue_limit_answers_429(tmp_path: Path) -> None:
    async def main(url: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(_stream(client, {"model": "tiny", "prompt": [4, 5], "max_tokens": 300})
                                          for _ in range(4)))

    with running(tmp_path / "srv", max_seqs=1, queue_limit=1) as server:
        got = asyncio.run(main(server.url))
        run = server.finish()
    refused = [g for g in got if g["status"] == 429]
    assert refused and all(g["error"]["code"] == "queue_full" for g in refused)
    served = [g for g in got if g["status"] == 200]
    assert len(served) >= 1 and all(g["tokens"] == 300 for g in served)
    assert len(run.requests) == len(served) and run.http["rejected"] == {"429": len(refused)}


def test_disconnect_frees_blocks_at_once(tmp_path: Path) -> None:
    with running(tmp_path / "srv", kv_pool_gb=pool_gb(POOL_BLOCKS)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client, client.stream(
                "POST", "/v1/completions", json={"model": "tiny", "prompt": [9, 9, 9], "max_tokens": 1000,
                                                 "stream": True}) as r:
            rid = int(r.headers["x-kvscope-request-id"])
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            seq = server.front.loop.by_id[rid]
            assert seq.blocks and server.front.loop.sched.pool.used > 0
        t = time.perf_counter()
        while seq.state != CUT and time.perf_counter() - t < 5:
            time.sleep(0.001)
        freed_after = time.perf_counter() - t
        assert seq.state == CUT and seq.reason == "cancelled by the client"
        assert server.front.loop.sched.pool.used == 0 and freed_after < 0.5
        run = server.finish()
    row = run.requests.set_index("request_id").loc[rid]
    assert row["status"] == CUT and row["generated_tokens"] < 1000
    assert np.isnan(row["http_last_byte_s"]) and np.isfinite(row["http_arrival_s"])
