"""The OpenAI-compatible HTTP front of a served load (`kvscope serve --http`): a Starlette app whose requests become
requests of a `ServeLoop` running in its own thread (`kvscope.measure.serve.http_run` runs both).

Endpoints: POST /v1/completions (a prompt as text or token ids), POST /v1/chat/completions (messages), each streamed
by server-sent events (`stream`, with `stream_options.include_usage`) or not; GET /v1/models, /v1/models/{name},
/health. Sampling is greedy: `temperature` 0 (or absent), and any other knob only at its neutral value; what the
engine cannot honour (temperature > 0, n > 1, stop strings, logprobs, tools, ...) is refused, never ignored.
`ignore_eos` (default false) keeps a checkpoint's end-of-sequence token from ending the request; random weights
have none. `max_tokens` defaults to 16 for completions and to the room left for chat.

Each request: its arrival stamped when the app receives it (`http_arrival_s`, request line and headers parsed), the
body read (at most `max_body_bytes`), parsed and tokenised, then a `Sequence` submitted to the loop (its `arrival_s`
is that moment), its tokens handed from the loop's thread to the request's asyncio queue (`call_soon_threadsafe`,
batched: one wake-up carries every token posted since the last), the response's last byte stamped
(`http_last_byte_s`). A client that goes away has its request cancelled at once (its blocks freed at the next
iteration boundary). Bad input is a 4xx with an OpenAI-style JSON error naming the field; nothing a client sends
makes a 500. An NVTX start/end range `req <id>` in the `kvscope` domain spans each request (when NVTX is on).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvscope.measure.serve.http_request import ApiError, Ask, Limits, parse_request, read_json
from kvscope.measure.serve.load import RequestSpec
from kvscope.measure.serve.loop import ServeLoop
from kvscope.measure.serve.scheduler import FINISHED, REFUSED, WAITING, Sequence
from kvscope.measure.serve.tokenizer import TextStream, Tokenizer
from kvscope.model.source import one_line

ARRIVAL_KEY = "kvscope.http_arrival_s"
EOS_REASON = "end-of-sequence token"
SSE_DONE = b"data: [DONE]\n\n"


# ---- the bridge between the loop's thread and the app's event loop --------------------------------------------------
@dataclass(eq=False)
class Flight:
    """One request in the server: its sequence, its queue of (token or None, last), its HTTP times."""

    rid: int
    ask: Ask
    seq: Sequence
    http_arrival_s: float
    queue: asyncio.Queue[tuple[int | None, bool]]
    text: TextStream
    end_range: Callable[[], None] | None = None
    delivered: int = 0  # tokens the loop's thread handed over (the response's tokens: seq.output[:delivered])
    at_eos: bool = False  # it ended at an end-of-sequence token (the last one delivered)
    told_last: bool = False  # the loop's thread posted the last event
    gone: bool = False  # the client went away
    done: bool = False  # the response's last byte is being sent


@dataclass
class Front:
    """The requests in flight between the app and the loop, and what the records need of them."""

    loop: ServeLoop
    tok: Tokenizer
    limits: Limits
    nvtx: Callable[[str], Callable[[], None]] | None = None
    aio: asyncio.AbstractEventLoop | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    flights: dict[int, Flight] = field(default_factory=dict)
    http_times: dict[int, tuple[float, float]] = field(default_factory=dict)  # rid -> (arrival, last byte)
    ended_at_eos: dict[int, tuple[float, float, int]] = field(default_factory=dict)  # rid -> (.., .., tokens)
    rejected: Counter[int] = field(default_factory=Counter)  # answered with an error before becoming a request
    accepting: bool = True
    stopping: str = ""
    next_id: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _handoff: deque[tuple[Flight, tuple[int | None, bool]]] = field(default_factory=deque)
    _scheduled: bool = False

    def now(self) -> float:
        return self.loop.now()

    def waiting(self) -> int:
        """Requests in the server not yet admitted (each flight's first admission sets its admitted_s)."""
        return sum(1 for f in list(self.flights.values())
                   if f.seq.state == WAITING and math.isnan(f.seq.admitted_s))

    def open(self, ask: Ask, http_arrival_s: float) -> Flight:
        """Make the request a sequence of the load and submit it (on the app's thread)."""
        with self.lock:
            if not self.accepting:
                raise ApiError(503, f"the server is stopping ({self.stopping}): no new requests", None,
                               "server_stopping", "server_error")
            limit = self.limits.queue_limit
            if limit is not None and self.waiting() >= limit:
                raise ApiError(429, f"{limit} requests already wait for admission (--queue-limit): try again later",
                               None, "queue_full", "rate_limit_error")
            rid = self.next_id
            self.next_id += 1
            arrival = self.now()
            seq = Sequence(RequestSpec(rid, arrival, len(ask.prompt), ask.max_tokens), ask.prompt, arrival,
                           on_token=self._on_token)
            flight = Flight(rid, ask, seq, http_arrival_s, asyncio.Queue(), self.tok.stream())
            if self.nvtx is not None:
                flight.end_range = self.nvtx(f"req {rid}")
            self.flights[rid] = flight
            self.loop.submit(seq)
        return flight

    def close(self, flight: Flight, last_byte_s: float) -> None:
        """The response is over (`last_byte_s` NaN when the client went away first)."""
        if flight.end_range is not None:
            flight.end_range()
        with self.lock:
            self.http_times[flight.rid] = (flight.http_arrival_s, last_byte_s)
            if flight.at_eos:
                self.ended_at_eos[flight.rid] = (flight.http_arrival_s, last_byte_s, flight.delivered)
            self.flights.pop(flight.rid, None)

    # on the loop's thread ------------------------------------------------------------------------------------------
    def _on_token(self, seq: Sequence, token: int | None, _t: float, last: bool) -> None:
        flight = self.flights.get(seq.spec.request_id)
        if flight is None or flight.told_last:
            return  # after its end (an end-of-sequence token): a token already launched is not the client's
        if token is not None:
            flight.delivered += 1
            if not last and token in self.tok.stop_ids and not flight.ask.ignore_eos:
                flight.at_eos = last = True
                self.loop.sched.abort(seq, EOS_REASON)  # its blocks freed now; recorded as finished (eos_records)
        if last:
            flight.told_last = True
        elif not flight.ask.stream:
            return  # a whole response waits for the last event only; the tokens are in seq.output
        self._post(flight, (token, last))

    def _post(self, flight: Flight, item: tuple[int | None, bool]) -> None:
        self._handoff.append((flight, item))
        if not self._scheduled and self.aio is not None:
            self._scheduled = True
            try:
                self.aio.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                self._scheduled = False

    def _flush(self) -> None:
        self._scheduled = False  # before draining: a post after this schedules another flush
        while self._handoff:
            flight, item = self._handoff.popleft()
            flight.queue.put_nowait(item)

    def ended(self, reason: str) -> None:
        """The loop has ended (on its thread, after its last callback): no new request, and every flight the loop
        never answered (submitted after its last look at its inbox) hears its end."""
        with self.lock:
            self.accepting = False
            self.stopping = self.stopping or reason
            flights = list(self.flights.values())
        for flight in flights:
            if not flight.told_last:
                flight.told_last = True
                self._post(flight, (None, True))

    def eos_records(self) -> int:
        """After the loop: each request that ended at an end-of-sequence token (cut in the scheduler to free its
        blocks at once) recorded as finished there, any token launched after it dropped. Returns how many."""
        n = 0
        for rid, (_, _, tokens) in self.ended_at_eos.items():
            seq = self.loop.by_id[rid]
            del seq.output[tokens:], seq.token_s[tokens:], seq.token_iterations[tokens:]
            seq.known = len(seq.prompt) + len(seq.output)
            seq.state, seq.reason, seq.finish_s = FINISHED, EOS_REASON, seq.token_s[-1]
            n += 1
        return n

    def stop_accepting(self, reason: str) -> None:
        with self.lock:
            self.accepting = False
            self.stopping = reason


# ---- the responses ----------------------------------------------------------------------------------------------
def _usage(flight: Flight) -> dict[str, int]:
    n_in, n_out = len(flight.seq.prompt), flight.delivered
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _finish_reason(flight: Flight) -> str | None:
    """"stop" (an end-of-sequence token), "length" (max_tokens), None: it did not finish."""
    if flight.at_eos:
        return "stop"
    return "length" if flight.seq.state == FINISHED else None


def _ending_error(flight: Flight, stopping: str) -> ApiError:
    """The error of a request that did not finish (refused by the scheduler, cut by the server's stop)."""
    seq = flight.seq
    if seq.state == REFUSED:
        return ApiError(400, f"refused: {seq.reason}", "max_tokens", "context_length_exceeded")
    why = seq.reason if seq.state != WAITING else f"the server stopped before it ran ({stopping})"
    return ApiError(503, f"cut after {len(seq.output)} tokens: {why}", None, "request_cut", "server_error")


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Answer(Response):
    """The answer to one request in flight, streamed or whole (an ASGI callable returned by the endpoint)."""

    def __init__(self, app: HttpApp, flight: Flight) -> None:
        self.app, self.flight = app, flight
        front, rid, ask = app.front, flight.rid, flight.ask
        self.kind = "chat.completion" if ask.chat else "text_completion"
        self.id = f"{'chatcmpl' if ask.chat else 'cmpl'}-{rid}"
        self.head = {"id": self.id, "object": self.kind + (".chunk" if ask.chat and ask.stream else ""),
                     "created": front.created, "model": front.limits.model}
        self.extra = {"request_id": rid, "tokenizer": front.tok.name, "sampling": "greedy"}
        self.last_byte_s = math.nan
        self.headers_out = [(b"x-kvscope-request-id", str(rid).encode()),
                            (b"x-kvscope-tokenizer", front.tok.name.encode())]

    def _choice(self, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        if not self.flight.ask.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.flight.ask.stream:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _chunk(self, text: str, first: bool, finish: str | None = None) -> bytes:
        body = {**self.head, "choices": [self._choice(text, finish, first)]}
        if first or finish is not None:
            body["kvscope"] = self.extra
        return b"data: " + _dump(body) + b"\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        flight = self.flight
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            if flight.ask.stream:
                await self._stream(send)
            else:
                await self._whole(send)
        finally:
            watcher.cancel()
            gone = flight.gone and not flight.done
            self.app.front.close(flight, math.nan if gone else self.last_byte_s)

    async def _send_last(self, send: Any, body: bytes) -> None:
        """The response's last body: stamped as it is handed to the transport (which writes it to the socket at
        once unless the socket's buffer is full), before the client can have seen it."""
        self.flight.done = True
        self.last_byte_s = self.app.front.now()
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _watch(self, receive: Any) -> None:
        """A client that goes away mid-response: its request cancelled at once."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.flight.done:
                    self.flight.gone = True
                    self.app.front.loop.cancel(self.flight.rid)
                return

    async def _start(self, send: Any, status: int, media: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media), *self.headers_out]})

    async def _whole(self, send: Any) -> None:
        flight = self.flight
        while not (await flight.queue.get())[1]:
            pass
        if flight.gone:
            return
        finish = _finish_reason(flight)
        if finish is None:
            err = _ending_error(flight, self.app.front.stopping)
            body, status = _dump(err.payload()), err.status
        else:
            text = self.app.front.tok.decode(flight.seq.output[:flight.delivered])
            body, status = _dump({**self.head, "choices": [self._choice(text, finish, True)],
                                  "usage": _usage(flight), "kvscope": self.extra}), 200
        await self._start(send, status, b"application/json")
        await self._send_last(send, body)

    async def _stream(self, send: Any) -> None:
        flight, started, sent = self.flight, False, 0
        while True:
            items = [await flight.queue.get()]
            while not flight.queue.empty():
                items.append(flight.queue.get_nowait())
            out = bytearray()
            for token, _ in items:
                if token is not None:
                    out += self._chunk(flight.text.add(token), sent == 0)
                    sent += 1
            last = items[-1][1]
            if flight.gone:
                if last:
                    return
                continue
            if last and not started and not out and _finish_reason(flight) is None:
                await self._error_whole(send)
                return
            if not started:
                await self._start(send, 200, b"text/event-stream; charset=utf-8")
                started = True
            if last:
                await self._send_last(send, bytes(out + self._ending(sent)))
                return
            await send({"type": "http.response.body", "body": bytes(out), "more_body": True})

    def _ending(self, sent: int) -> bytes:
        """The stream's last events: the finish (with the text held back), usage when asked, [DONE]; or the error
        of a request cut mid-stream."""
        flight = self.flight
        finish = _finish_reason(flight)
        if finish is None:
            err = _ending_error(flight, self.app.front.stopping)
            return b"data: " + _dump(err.payload()) + b"\n\n"
        out = self._chunk(flight.text.finish(), sent == 0, finish)
        if flight.ask.include_usage:
            out += b"data: " + _dump({**self.head, "choices": [], "usage": _usage(flight)}) + b"\n\n"
        return out + SSE_DONE

    async def _error_whole(self, send: Any) -> None:
        err = _ending_error(self.flight, self.app.front.stopping)
        await self._start(send, err.status, b"application/json")
        await self._send_last(send, _dump(err.payload()))


# ---- the app ----------------------------------------------------------------------------------------------------
class HttpApp:
    """The Starlette app over a `Front`, with each request's arrival stamped before routing."""

    def __init__(self, front: Front) -> None:
        self.front = front
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{name:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                Exception: self._server_error})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = self.front.now()
        await self.app(scope, receive, send)

    def _entry(self) -> dict[str, Any]:
        front = self.front
        return {"id": front.limits.model, "object": "model", "created": front.created, "owned_by": "kvscope",
                "max_model_len": front.limits.max_seq,
                "kvscope": {"tokenizer": front.tok.name, "sampling": "greedy",
                            "kv_pool_tokens": front.limits.pool_blocks * front.limits.block_size}}

    async def models(self, _request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._entry()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["name"] != self.front.limits.model:
            return ApiError(404, f"the model {one_line(request.path_params['name'], 80)!r} does not exist here",
                            "model", "model_not_found").response()
        return JSONResponse(self._entry())

    async def health(self, _request: Request) -> Response:
        front = self.front
        if not front.accepting:
            return JSONResponse({"status": "stopping", "reason": front.stopping}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": len(front.flights), "waiting": front.waiting()})

    async def completions(self, request: Request) -> Response:
        return await self._ask(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._ask(request, chat=True)

    async def _ask(self, request: Request, chat: bool) -> Response:
        front = self.front
        arrival = request.scope.get(ARRIVAL_KEY, front.now())
        try:
            body = await read_json(request, front.limits.max_body_bytes)
            flight = front.open(parse_request(body, chat, front.limits, front.tok), arrival)
        except ApiError as err:
            front.rejected[err.status] += 1
            return err.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        return Answer(self, flight)

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 400
        self.front.rejected[status] += 1
        detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
        return ApiError(status, str(detail), None, None if status != 404 else "not_found").response()

    async def _server_error(self, _request: Request, exc: Exception) -> Response:
        self.front.rejected[500] += 1
        return ApiError(500, f"internal error: {type(exc).__name__}: {one_line(str(exc), 200)}", None, None,
                        "server_error").response()
