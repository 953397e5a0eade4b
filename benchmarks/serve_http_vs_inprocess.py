"""The same served load in process and over HTTP (issue 24): what the OpenAI-compatible front costs per request and
per token. Default: qwen2.5-3b (random weights, bf16, graphs and kernels as `kvscope serve` defaults them), 200
requests arriving at 8 per second (Poisson, seeded), prompts of 512 tokens, 128 output tokens each, policy chunked.

Each round runs two fresh processes on the same GPU, one after the other (the order alternating between rounds):
- in process: `kvscope serve --rps R --requests N --prompt-len P --output-len O --max-seq P+O ...`: the loop admits
  each arrival when its clock passes it; prompts are `synthetic_prompt` draws from a generator seeded with --seed.
- over HTTP: `kvscope serve --http --port 0 --max-seq P+O ...` (same model, pool, scheduler flags) as the server;
  this process is the client: one asyncio task per request (httpx, a connection each, as many as are open at
  once), sleeping until the same arrival time (the same `open_loop` schedule), then POSTing /v1/completions with
  the very same prompt as token ids, max_tokens O, ignore_eos, streamed with usage. The client stamps
  (`time.perf_counter`) the request going out, each token's chunk and the end of the stream. After the last
  response, SIGTERM: the server writes its folder.

Reported over the finished requests (p50 / p90 / p99 / mean, ms): TTFT, TPOT and end-to-end latency in process, on
the HTTP run's engine side (its records: what the front's threads cost the engine itself), on the HTTP run's server
side (from the request's HTTP arrival to the first token / the last byte) and at the client; the records'
`server_overhead_ms` with its two parts (before the engine: `arrival_s - http_arrival_s`, body, JSON, tokenising;
after it: `http_last_byte_s - finish_s`, detokenising and writing the end); the transport (client e2e - server-side
e2e); per token, the HTTP path's cost (client e2e - in-process e2e, and client e2e - HTTP engine e2e, over the
output tokens) and the TPOT deltas; each run's output tokens per second and its iterations' median duration.

    python3 benchmarks/serve_http_vs_inprocess.py [--model qwen2.5-3b] [--requests 200] [--rps 8]
        [--prompt-len 512] [--output-len 128] [--rounds 1] [--out traces/serve-http-vs-inprocess] [--json out.json]

CPU smoke test: --model tiny --device cpu --requests 20 --rps 20 --prompt-len 32 --output-len 16.
The server needs starlette and uvicorn (and httptools for uvicorn's fast parser), the client httpx. The lent GPU
machine reaches no network: carry the wheels (Python 3.12) with `../shared/gpu/prepare-carry.sh starlette==1.10.0
uvicorn==0.55.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 typing_extensions==4.16.0 httpx==0.29.0 httpcore==1.0.9
idna==3.21 certifi==2026.5.20 httptools==0.9.0`, then `source .carry/device-env.sh; python3
benchmarks/serve_http_vs_inprocess.py --rounds 2 --json $OUT/serve_http_vs_inprocess.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvscope.measure.serve.lengths import parse_length_dist  # noqa: E402
from kvscope.measure.serve.load import open_loop, synthetic_prompt  # noqa: E402
from kvscope.model.source import resolve_model  # noqa: E402

READY_TIMEOUT_S = 600


def _common(a: argparse.Namespace) -> list[str]:
    flags = ["--model", a.model, "--policy", a.policy, "--max-seqs", str(a.max_seqs), "--max-batch-tokens",
             str(a.max_batch_tokens), "--max-seq", str(a.prompt_len + a.output_len), "--seed", str(a.seed),
             "--no-progress", "--kv-pool-frac", str(a.kv_pool_frac)]
    for name in ("device", "dtype", "graphs", "kernels"):
        value = getattr(a, name)
        if value is not None:
            flags += [f"--{name}", value]
    return flags


def _kvscope(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "kvscope", "serve", *args]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def run_inprocess(a: argparse.Namespace, out: Path) -> Path:
    cmd = _kvscope(["--rps", str(a.rps), "--requests", str(a.requests), "--prompt-len", str(a.prompt_len),
                    "--output-len", str(a.output_len), "--out", str(out), *_common(a)])
    print(f"in process: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return out


# ---- the HTTP run: the server process, this process as the client ------------------------------------------------
def _start_server(a: argparse.Namespace, out: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    cmd = _kvscope(["--http", "--port", "0", "--drain-s", "60", "--out", str(out), *_common(a)])
    print(f"over HTTP: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    err: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    for line in proc.stderr:  # type: ignore[union-attr]
        err.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
            return proc, m.group(1), err
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(err))


async def _one(client: httpx.AsyncClient, t0: float, arrival_s: float, prompt: list[int], a: argparse.Namespace
               ) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + arrival_s - time.perf_counter()))
    body = {"model": a.model, "prompt": prompt, "max_tokens": a.output_len, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    got: dict[str, Any] = {"t_send": time.perf_counter(), "token_t": [], "usage": None, "error": None}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        got["status"], got["rid"] = r.status_code, int(r.headers.get("x-kvscope-request-id", -1))
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                got["error"] = event["error"]
            elif event.get("usage"):
                got["usage"] = event["usage"]
            elif event["choices"] and event["choices"][0]["finish_reason"] is None:
                got["token_t"].append(time.perf_counter())
        if r.status_code != 200:
            got["error"] = (await r.aread()).decode(errors="replace")[:300]
    got["t_done"] = time.perf_counter()
    got["late_s"] = got["t_send"] - (t0 + arrival_s)
    return got


async def _clients(url: str, arrivals: list[float], prompts: list[list[int]], a: argparse.Namespace
                   ) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        await client.get("/health")
        t0 = time.perf_counter() + 0.05
        return await asyncio.gather(*(_one(client, t0, t, p, a) for t, p in zip(arrivals, prompts, strict=True)))


def run_http(a: argparse.Namespace, out: Path, arrivals: list[float], prompts: list[list[int]]
             ) -> tuple[Path, pd.DataFrame]:
    proc, url, err = _start_server(a, out)
    try:
        got = asyncio.run(_clients(url, arrivals, prompts, a))
    finally:
        proc.send_signal(signal.SIGTERM)
        if proc.wait(300) != 0:
            raise SystemExit("the server failed:\n" + "".join(err[-20:]))
    bad = [g for g in got if g["status"] != 200 or g["error"]]
    if bad:
        print(f"warning: {len(bad)} requests failed, e.g. {bad[0]['status']} {bad[0]['error']}", flush=True)
    rows = []
    for g in got:
        ts = g["token_t"]
        n = len(ts)
        rows.append({"request_id": g["rid"], "status": g["status"], "client_tokens": n,
                     "client_ttft_ms": (ts[0] - g["t_send"]) * 1e3 if n else np.nan,
                     "client_tpot_ms": (ts[-1] - ts[0]) * 1e3 / (n - 1) if n > 1 else np.nan,
                     "client_e2e_ms": (g["t_done"] - g["t_send"]) * 1e3, "client_late_ms": g["late_s"] * 1e3,
                     "usage_tokens": (g["usage"] or {}).get("completion_tokens", -1)})
    return out, pd.DataFrame(rows)


# ---- the report ---------------------------------------------------------------------------------------------------
def _stats(values: Any) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    return {"n": len(v), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "mean": float(v.mean())}


def _finished(folder: Path) -> pd.DataFrame:
    req = pd.read_parquet(folder / "requests.parquet")
    return req[req["status"] == "finished"].reset_index(drop=True)


def _run_numbers(folder: Path) -> dict[str, float]:
    summary = pd.read_parquet(folder / "summary.parquet").iloc[0]
    it = pd.read_parquet(folder / "iterations.parquet")
    return {"output_tok_s": float(summary["output_tok_s"]), "iterations": len(it),
            "iteration_p50_ms": float(it["dur_ms"].median()), "host_ms_p50": float(it["host_ms"].median()),
            "requests_finished": int(summary["requests_finished"])}


def compare(inproc: Path, http: Path, client: pd.DataFrame) -> dict[str, Any]:
    """Every figure of the module docstring, from the two folders and the client's stamps."""
    a, h = _finished(inproc), _finished(http)
    h = h.merge(client, on="request_id", how="left")
    server_ttft = (h["first_token_s"] - h["http_arrival_s"]) * 1e3
    server_e2e = (h["http_last_byte_s"] - h["http_arrival_s"]) * 1e3
    m = {
        "ttft_ms": {"in_process": _stats(a["ttft_ms"]), "http_engine": _stats(h["ttft_ms"]),
                    "http_server": _stats(server_ttft), "client": _stats(h["client_ttft_ms"])},
        "tpot_ms": {"in_process": _stats(a["tpot_ms"]), "http_engine": _stats(h["tpot_ms"]),
                    "client": _stats(h["client_tpot_ms"])},
        "e2e_ms": {"in_process": _stats(a["e2e_ms"]), "http_engine": _stats(h["e2e_ms"]),
                   "http_server": _stats(server_e2e), "client": _stats(h["client_e2e_ms"])},
        "server_overhead_ms": _stats(h["server_overhead_ms"]),
        "before_engine_ms": _stats((h["arrival_s"] - h["http_arrival_s"]) * 1e3),
        "after_engine_ms": _stats((h["http_last_byte_s"] - h["finish_s"]) * 1e3),
        "transport_ms": _stats(h["client_e2e_ms"] - server_e2e),
        "client_late_ms": _stats(client["client_late_ms"]),
    }
    tokens = h["generated_tokens"].to_numpy(np.float64)
    a_e2e = a.set_index("request_id")["e2e_ms"].reindex(h["request_id"]).to_numpy(np.float64)
    m["per_token_ms"] = {
        "client_e2e_minus_in_process_e2e": _stats((h["client_e2e_ms"].to_numpy() - a_e2e) / tokens),
        "client_e2e_minus_http_engine_e2e": _stats((h["client_e2e_ms"] - h["e2e_ms"]).to_numpy() / tokens),
        "tpot_client_minus_in_process_p50": m["tpot_ms"]["client"].get("p50", np.nan)
        - m["tpot_ms"]["in_process"].get("p50", np.nan),
        "tpot_http_engine_minus_in_process_p50": m["tpot_ms"]["http_engine"].get("p50", np.nan)
        - m["tpot_ms"]["in_process"].get("p50", np.nan),
    }
    counts_match = bool((h["client_tokens"] == h["generated_tokens"]).all() and (h["usage_tokens"]
                                                                                    == h["generated_tokens"]).all())
    meta = json.loads(pq.read_schema(http / "requests.parquet").metadata[b"kvscope"])
    return {"metrics": m, "in_process": _run_numbers(inproc), "http": _run_numbers(http),
            "counts_match": counts_match, "http_meta": meta.get("http", {}), "device": meta.get("device")}


def _print(result: dict[str, Any]) -> None:
    m = result["metrics"]
    print(f"\ndevice: {result['device']}; HTTP stack: {result['http_meta'].get('protocol')}; client token counts = "
          f"records: {result['counts_match']}")
    print(f"{'figure (ms)':<44}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'n':>6}")
    for group in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for side, s in m[group].items():
            _line(f"{group} {side}", s)
    for key in ("server_overhead_ms", "before_engine_ms", "after_engine_ms", "transport_ms", "client_late_ms"):
        _line(key, m[key])
    for key, s in m["per_token_ms"].items():
        if isinstance(s, dict):
            _line(f"per token: {key}", s)
        else:
            print(f"{'per token: ' + key:<44}{s:>10.3f}")
    for side in ("in_process", "http"):
        r = result[side]
        print(f"{side}: {r['output_tok_s']:,.0f} output tok/s, {r['requests_finished']} finished, "
              f"{r['iterations']} iterations of p50 {r['iteration_p50_ms']:.2f} ms (host {r['host_ms_p50']:.2f} ms)")


def _line(name: str, s: dict[str, float]) -> None:
    if not s.get("n"):
        print(f"{name:<44}{'-':>10}")
        return
    print(f"{name:<44}{s['p50']:>10.3f}{s['p90']:>10.3f}{s['p99']:>10.3f}{s['mean']:>10.3f}{s['n']:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-3b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--graphs", default=None, choices=["on", "off"])
    ap.add_argument("--kernels", default=None, choices=["on", "off"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rps", type=float, default=8.0)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--policy", default="chunked")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--kv-pool-frac", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("traces") / time.strftime("serve-http-vs-inprocess-%Y%m%d-%H%M%S"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    specs = open_loop(a.rps, a.requests, None, parse_length_dist(str(a.prompt_len), "--prompt-len"),
                      parse_length_dist(str(a.output_len), "--output-len"), a.seed)
    rng = np.random.default_rng(a.seed)  # as `kvscope serve` draws each arrival's prompt, in arrival order
    vocab = resolve_model(a.model).args.vocab_size
    prompts = [synthetic_prompt(rng, s.prompt_tokens, vocab) for s in specs]
    rounds = []
    for i in range(a.rounds):
        first_http = i % 2 == 1
        if first_http:
            http, client = run_http(a, a.out / f"r{i}-http", [s.arrival_s for s in specs], prompts)
        inproc = run_inprocess(a, a.out / f"r{i}-inprocess")
        if not first_http:
            http, client = run_http(a, a.out / f"r{i}-http", [s.arrival_s for s in specs], prompts)
        client.to_parquet(a.out / f"r{i}-client.parquet")
        result = compare(inproc, http, client)
        _print(result)
        rounds.append({"round": i, "order": "http first" if first_http else "in process first", **result})
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rounds": rounds},
                                     indent=1, default=float))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
