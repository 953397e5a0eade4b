"""`kvscope serve --http` as a process (tiny preset, CPU): SIGTERM stops accepting and lets the requests in flight
finish within --drain-s, then writes the records; a second SIGTERM (or --drain-s 0) cuts them, and the records are
written all the same. The command's flags: the in-process load's refused with --http, the server's without it, a
port in use refused before any model loads, each in one line with exit code 2."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from cli_checks import fail

from kvscope.schema import HTTP_REQUEST_COLUMNS, REQUESTS_FILE

ROOT = Path(__file__).resolve().parents[3]


def _start(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kvscope", "serve", "--http", "--port", "0", "--no-progress",
                             "--out", str(tmp_path / "srv"), *flags], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    err: list[str] = []
    url = None
    for line in proc.stderr:  # type: ignore[union-attr]
        err.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    assert url is not None, "".join(err)
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, url, err


def _stream(url: str, max_tokens: int, got: list[dict[str, Any]], started: threading.Semaphore) -> None:
    out: dict[str, Any] = {"tokens": 0, "done": False, "error": None}
    with httpx.Client(timeout=120) as client, client.stream("POST", url + "/v1/completions", json={
            "model": "tiny", "prompt": [2, 4, 6], "max_tokens": max_tokens, "stream": True}) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"]
                elif event["choices"][0]["finish_reason"] is None:
                    out["tokens"] += 1
                    if out["tokens"] == 1:
                        started.release()
    got.append(out)


def _load(url: str, n: int, max_tokens: int) -> tuple[list[threading.Thread], list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []
    started = threading.Semaphore(0)
    threads = [threading.Thread(target=_stream, args=(url, max_tokens, got, started), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert started.acquire(timeout=60)  # every request is streaming
    return threads, got


def test_sigterm_drains_then_writes(tmp_path: Path) -> None:
    proc, url, err = _start(tmp_path, "--drain-s", "60", "--max-seqs", "4")
    threads, got = _load(url, 3, 400)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    with pytest.raises(httpx.TransportError):  # the listening socket is closed: nothing new is accepted
        httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1], "max_tokens": 2}, timeout=5)
    assert proc.wait(120) == 0, "".join(err)
    assert all(g["done"] and g["tokens"] == 400 and g["error"] is None for g in got)
    req = pd.read_parquet(tmp_path / "srv" / REQUESTS_FILE)
    assert list(req.columns[-3:]) == list(HTTP_REQUEST_COLUMNS)
    assert len(req) == 3 and (req["status"] == "finished").all() and (req["generated_tokens"] == 400).all()
    assert req["server_overhead_ms"].notna().all()


@pytest.mark.parametrize("how", ["second-signal", "drain-0"])
def test_cut_after_the_drain_writes_the_records(tmp_path: Path, how: str) -> None:
    proc, url, err = _start(tmp_path, "--drain-s", "0" if how == "drain-0" else "120", "--max-seq", "2048")
    threads, got = _load(url, 2, 2000)
    proc.send_signal(signal.SIGTERM)
    if how == "second-signal":
        deadline = time.monotonic() + 30
        while not any("SIGTERM: stopping" in line for line in err) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first was handled (two pending signals of one kind would be one)
        proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.wait(120) == 0, "".join(err)
    assert all(not g["done"] and g["error"]["code"] == "request_cut" and 0 < g["tokens"] < 2000 for g in got)
    req = pd.read_parquet(tmp_path / "srv" / REQUESTS_FILE)
    assert len(req) == 2 and (req["status"] == "cut").all()
    why = "--drain-s 0 s ended" if how == "drain-0" else "a second stop"
    assert req["reason"].str.contains(why, regex=False).all(), list(req["reason"])
    assert "2 requests cut" in "".join(err)


@pytest.mark.parametrize(("args", "needle"), [
    (["--http", "--rps", "2"], "--rps"),
    (["--http", "--prompt-len", "64"], "--prompt-len"),
    (["--http", "--requests", "4"], "--requests"),
    (["--http", "--policy", "chunked,prefill-first"], "one --policy"),
    (["--rps", "2", "--port", "9000"], "--port"),
    (["--rps", "2", "--drain-s", "3"], "--drain-s"),
    (["--http", "--port", "70000"], "--port"),
    (["--http", "--queue-limit", "0"], "--queue-limit"),
    (["--http", "--drain-s", "-1"], "--drain-s"),
    (["--http", "--max-body-bytes", "10"], "--max-body-bytes"),
])
def test_flags_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = fail(["serve", "--out", str(tmp_path / "o"), *args], capsys)
    assert needle in line
    assert not (tmp_path / "o").exists()


def test_port_in_use_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = fail(["serve", "--http", "--port", str(port), "--out", str(tmp_path / "o")], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert not (tmp_path / "o").exists()
