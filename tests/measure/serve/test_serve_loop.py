"""The served loop driven from another thread (as an HTTP front will): requests submitted while it runs, their
tokens heard through `on_token` in order with the last one flagged, a request cancelled mid-stream leaving at the
next iteration with its blocks freed, one refused at once (longer than the longest sequence), and a stop that cuts
what still runs."""

from __future__ import annotations

import threading
import time

import torch

from kvscope.engine.options import EngineOptions
from kvscope.engine.served import ServeConfig, ServedEngine
from kvscope.measure.serve.load import RequestSpec
from kvscope.measure.serve.loop import ServeLoop
from kvscope.measure.serve.scheduler import CUT, FINISHED, REFUSED, Scheduler, Sequence
from kvscope.model.paged_kv_cache import PagedKVCache
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

CPU = torch.device("cpu")


def _loop() -> ServeLoop:
    model, _ = load_model(resolve_model("tiny"), CPU, torch.float32, seed=0)
    cache = PagedKVCache(model.args, 65, 16, torch.float32, CPU)
    eng = ServedEngine(model, cache, ServeConfig(512, 8, torch.float32, CPU),
                       options=EngineOptions(graphs=False, kernels=False))
    sched = Scheduler(cache, "chunked", 64, 8, "recompute", 512)
    return ServeLoop(eng, sched, lambda spec: [1] * spec.prompt_tokens)


def test_submit_cancel_stop_from_another_thread() -> None:
    loop = _loop()
    heard: dict[int, list[tuple[int | None, bool]]] = {0: [], 1: [], 2: [], 3: []}
    second_token = threading.Event()

    def listen(seq: Sequence, token: int | None, _t: float, last: bool) -> None:
        heard[seq.spec.request_id].append((token, last))
        if seq.spec.request_id == 1 and len(heard[1]) == 2:
            second_token.set()

    stop = threading.Event()
    runner = threading.Thread(target=loop.run, kwargs={"stop": stop.is_set, "external": True})
    runner.start()
    try:
        seqs = []
        for i, (p, out) in enumerate([(12, 5), (20, 400), (7, 400), (7, 100_000)]):
            seq = Sequence(RequestSpec(i, loop.now(), p, out), list(range(1, p + 1)), loop.now(), on_token=listen)
            seqs.append(seq)
            loop.submit(seq)
        assert second_token.wait(30)
        loop.cancel(1)
        deadline = time.time() + 30
        while seqs[1].state != CUT and time.time() < deadline:
            time.sleep(0.01)
        assert seqs[1].state == CUT and seqs[1].blocks == [] and seqs[1].reason == "cancelled by the client"
        while seqs[0].state != FINISHED and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert seqs[0].state == FINISHED and [t for t, _ in heard[0]] == seqs[0].output
    assert [last for _, last in heard[0]] == [False] * 4 + [True]
    assert heard[1][-1] == (None, True) and len(heard[1]) - 1 == len(seqs[1].output) < 400
    assert seqs[2].state == CUT and heard[2][-1] == (None, True)  # cut by the stop
    assert seqs[3].state == REFUSED and heard[3] == [(None, True)] and "longest sequence" in seqs[3].reason
    assert loop.sched.pool.used == 0  # every block back
