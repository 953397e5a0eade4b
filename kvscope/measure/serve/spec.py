"""What a served load asks for (`ServeSpec`, the flags of `kvscope serve` and the API's arguments), its checks, and
the load it makes (`load_source`: the request list of an open loop or a file, or a closed loop)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from kvscope.errors import KvscopeError
from kvscope.kernels.decode_attention import PAGED_BLOCK_SIZES, paged_block_size_ok
from kvscope.measure.serve.lengths import parse_length_dist
from kvscope.measure.serve.load import (
    ClosedLoop,
    RequestSpec,
    check_concurrency,
    check_duration,
    check_rate,
    closed_loop,
    open_loop,
    read_request_file,
)
from kvscope.schema import GRANULARITIES, POLICIES, PREEMPT_MODES

if TYPE_CHECKING:
    import argparse

DEFAULT_MAX_SEQ = 4096  # the longest sequence when a closed loop's lengths have no bound (and over HTTP: at most)
DEFAULT_MAX_BODY_BYTES = 1 << 20  # the largest request body the HTTP front reads (--max-body-bytes)
HTTP_LOAD_FLAGS = ("rps", "concurrency", "request_file", "prompt_len", "output_len", "requests", "duration")
HTTP_ONLY_FLAGS = ("host", "port", "drain_s", "queue_limit", "served_model_name", "max_body_bytes")


@dataclass(frozen=True)
class ServeSpec:
    """A served load (None: the default for the device, as `kvscope run`'s flags)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    policy: str = "chunked"
    preempt: str = "recompute"
    block_size: int = 16
    kv_pool_gb: float | None = None
    kv_pool_frac: float = 0.5  # of the device memory free after the weights load (CUDA), without --kv-pool-gb
    max_batch_tokens: int = 2048
    max_seqs: int = 64
    max_seq: int | None = None  # the longest sequence (prompt + output); None: the load's longest
    rps: float | None = None
    concurrency: int | None = None
    request_file: str | None = None
    prompt_len: str = "512"
    output_len: str = "128"
    requests: int | None = None
    duration_s: float | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    granularity: str = "phase"
    nvtx: bool | None = None
    graphs: bool | None = None
    kernels: bool | None = None
    nvml_interval_ms: float = 20.0
    out: str | None = None
    # the load over HTTP instead (`kvscope serve --http`: kvscope.measure.serve.http_run)
    http: bool = False
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port, chosen at bind
    drain_s: float = 10.0  # after SIGINT/SIGTERM: how long the running requests may finish before they are cut
    queue_limit: int | None = None  # requests waiting for admission beyond which a new one is answered 429
    served_model_name: str | None = None  # the `model` the requests name (default: the --model argument)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(value: float | None, flag: str) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value <= 0):
        raise KvscopeError(f"{flag}: must be a positive finite number, got {value!r}")


def _whole(value: int, flag: str, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise KvscopeError(f"{flag}: must be a whole number >= {low}, got {value!r}")


def check_spec(spec: ServeSpec) -> None:
    """Every check that needs neither the model nor the device; one KvscopeError for the first problem."""
    if spec.policy not in POLICIES:
        raise KvscopeError(f"--policy: unknown {spec.policy!r}; choose from {', '.join(POLICIES)}")
    if spec.preempt not in PREEMPT_MODES:
        raise KvscopeError(f"--preempt: unknown {spec.preempt!r}; choose from {', '.join(PREEMPT_MODES)}")
    if spec.granularity not in GRANULARITIES:
        raise KvscopeError(f"--granularity: unknown {spec.granularity!r}; choose from {', '.join(GRANULARITIES)}")
    _whole(spec.block_size, "--block-size")
    if not paged_block_size_ok(spec.block_size):
        raise KvscopeError(f"--block-size {spec.block_size}: the paged decode kernel serves "
                           f"{', '.join(map(str, PAGED_BLOCK_SIZES))}")
    _whole(spec.max_batch_tokens, "--max-batch-tokens")
    _whole(spec.max_seqs, "--max-seqs")
    if spec.max_seq is not None:
        _whole(spec.max_seq, "--max-seq", 2)
    _positive(spec.kv_pool_gb, "--kv-pool-gb")
    _positive(spec.slo_ttft_ms, "--slo-ttft-ms")
    _positive(spec.slo_tpot_ms, "--slo-tpot-ms")
    _positive(spec.nvml_interval_ms, "--nvml-interval-ms")
    if not (isinstance(spec.kv_pool_frac, float) and 0 < spec.kv_pool_frac <= 0.95):
        raise KvscopeError(f"--kv-pool-frac: must be a fraction in (0, 0.95], got {spec.kv_pool_frac!r}")
    sources = [s for s in (spec.rps, spec.concurrency, spec.request_file) if s is not None]
    if spec.http:
        if sources:
            raise KvscopeError("--http: the requests come over HTTP; --rps, --concurrency and --request-file do not "
                               "apply")
        _check_http(spec)
    elif len(sources) != 1:
        raise KvscopeError("the load needs exactly one of --rps, --concurrency or --request-file (or --http)")
    if spec.rps is not None:
        check_rate(spec.rps)
    if spec.concurrency is not None:
        check_concurrency(spec.concurrency)
    if spec.duration_s is not None:
        check_duration(spec.duration_s)


def _check_http(spec: ServeSpec) -> None:
    if not isinstance(spec.host, str) or not spec.host.strip() or not spec.host.isprintable():
        raise KvscopeError(f"--host: must be a host name or address, got {spec.host!r}")
    _whole(spec.port, "--port", 0)
    if spec.port > 65535:
        raise KvscopeError(f"--port: must be at most 65535, got {spec.port}")
    if (not isinstance(spec.drain_s, (int, float)) or isinstance(spec.drain_s, bool) or not math.isfinite(spec.drain_s)
            or spec.drain_s < 0):
        raise KvscopeError(f"--drain-s: must be a finite number of seconds >= 0, got {spec.drain_s!r}")
    if spec.queue_limit is not None:
        _whole(spec.queue_limit, "--queue-limit")
    _whole(spec.max_body_bytes, "--max-body-bytes", 1024)
    name = spec.served_model_name
    if name is not None and (not isinstance(name, str) or not name.strip() or not name.isprintable()):
        raise KvscopeError(f"--served-model-name: must be a printable, non-empty name, got {name!r}")
    if spec.duration_s is not None or spec.requests is not None:
        raise KvscopeError("--http: --duration and --requests describe an in-process load; the server runs until "
                           "SIGINT/SIGTERM")


def http_max_seq(spec: ServeSpec) -> int:
    """The longest sequence the HTTP front serves: --max-seq, else the model's context up to DEFAULT_MAX_SEQ."""
    if spec.max_seq is not None:
        return spec.max_seq
    from kvscope.engine.plan import DEFAULT_MODEL_CPU, DEFAULT_MODEL_CUDA, resolve_device
    from kvscope.model.source import resolve_model

    model = spec.model or (DEFAULT_MODEL_CUDA if resolve_device(spec.device).type == "cuda" else DEFAULT_MODEL_CPU)
    return min(resolve_model(model).args.max_position_embeddings, DEFAULT_MAX_SEQ)


def load_source(spec: ServeSpec) -> tuple[list[RequestSpec] | ClosedLoop, int]:
    """The load (requests in arrival order, or a closed loop) and the longest sequence the engine must hold."""
    check_spec(spec)
    if spec.http:  # no load of its own: requests come over HTTP
        return [], http_max_seq(spec)
    if spec.request_file is not None:
        specs = read_request_file(spec.request_file)
        if spec.requests is not None:
            specs = specs[:spec.requests]
        if spec.duration_s is not None:
            specs = [s for s in specs if s.arrival_s < spec.duration_s]
        longest = max((s.prompt_tokens + s.output_tokens for s in specs), default=2)
        return specs, spec.max_seq or longest
    prompt = parse_length_dist(spec.prompt_len, "--prompt-len")
    output = parse_length_dist(spec.output_len, "--output-len")
    if spec.rps is not None:
        specs = open_loop(spec.rps, spec.requests, spec.duration_s, prompt, output, spec.seed)
        longest = max((s.prompt_tokens + s.output_tokens for s in specs), default=2)
        return specs, spec.max_seq or longest
    loop = closed_loop(spec.concurrency, spec.requests, spec.duration_s, prompt, output, spec.seed)  # type: ignore
    bound = prompt.cap + output.cap
    return loop, spec.max_seq or (bound if bound <= DEFAULT_MAX_SEQ * 8 else DEFAULT_MAX_SEQ)


# ---- from the command line (`kvscope serve`, and the API through the same parser) ---------------------------------
def _list(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise KvscopeError(f"serve: {flag}: an empty item in {text!r}")
    return items


def _rates(text: str | None) -> list[float] | None:
    items = _list(text, "--rps")
    if items is None:
        return None
    out = []
    for t in items:
        try:
            out.append(check_rate(float(t)))
        except ValueError:
            raise KvscopeError(f"--rps: must be a positive finite number, got {t!r}") from None
    return out


def _users(text: str | None) -> list[int] | None:
    items = _list(text, "--concurrency")
    if items is None:
        return None
    out = []
    for t in items:
        try:
            out.append(check_concurrency(float(t)))
        except ValueError:
            raise KvscopeError(f"--concurrency: must be a whole number, got {t!r}") from None
    return out


def _http_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The --http fields of the spec; the in-process load's flags refused with --http, the server's without it."""
    http = bool(getattr(ns, "http", False))
    if http:
        given = [f"--{k.replace('_', '-')}" for k in HTTP_LOAD_FLAGS if getattr(ns, k, None) is not None]
        if given:
            raise KvscopeError(f"serve --http: {', '.join(given)} {'describes' if len(given) == 1 else 'describe'} "
                               "an in-process load; over HTTP the requests come from the clients")
    else:
        given = [f"--{k.replace('_', '-')}" for k in HTTP_ONLY_FLAGS if getattr(ns, k, None) is not None]
        if given:
            raise KvscopeError(f"serve: {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with "
                               "--http")
    fields = {k: getattr(ns, k, None) for k in HTTP_ONLY_FLAGS}
    return {"http": http, **{k: v for k, v in fields.items() if v is not None}}


def _spec(ns: argparse.Namespace, rates: list[float] | None, users: list[int] | None, policy: str) -> ServeSpec:
    if ns.engine != "kvscope" or ns.attn is not None or ns.prefill_graphs is not None:
        raise KvscopeError("serve: runs kvscope's served engine (paged decode attention, chunked prefills in SDPA): "
                           "--engine, --attn and --prefill-graphs do not apply")
    return ServeSpec(**_http_flags(ns),
        model=ns.model, device=ns.device, dtype=ns.dtype, seed=ns.seed, policy=policy, preempt=ns.preempt,
        block_size=ns.block_size, kv_pool_gb=ns.kv_pool_gb, kv_pool_frac=float(ns.kv_pool_frac),
        max_batch_tokens=ns.max_batch_tokens, max_seqs=ns.max_seqs, max_seq=ns.max_seq,
        rps=rates[0] if rates else None, concurrency=users[0] if users else None, request_file=ns.request_file,
        prompt_len=ns.prompt_len or ServeSpec.prompt_len, output_len=ns.output_len or ServeSpec.output_len,
        requests=ns.requests, duration_s=ns.duration,
        slo_ttft_ms=ns.slo_ttft_ms, slo_tpot_ms=ns.slo_tpot_ms, granularity=ns.granularity, nvtx=ns.nvtx,
        graphs=None if ns.graphs is None else ns.graphs == "on",
        kernels=None if ns.kernels is None else ns.kernels == "on", nvml_interval_ms=ns.nvml_interval_ms,
        out=ns.out)


def sweep_points(spec: ServeSpec, policies: list[str], rates: list[float] | None, users: list[int] | None
                 ) -> list[ServeSpec]:
    """The points of a sweep: every policy x every rate (or concurrency), in that order, each checked."""
    points = []
    for policy in policies:
        for r in rates or [None]:
            for c in users or [None]:
                point = replace(spec, policy=policy, rps=r if rates else spec.rps,
                                concurrency=c if users else spec.concurrency)
                check_spec(point)
                points.append(point)
    return points


def serve_points(ns: argparse.Namespace) -> list[ServeSpec]:
    """The served loads `kvscope serve`'s parsed flags ask for: one, or the points of a sweep (lists in --rps,
    --concurrency or --policy; a sweep needs --out)."""
    rates, users = _rates(ns.rps), _users(ns.concurrency)
    policies = _list(ns.policy, "--policy") or ["chunked"]
    if getattr(ns, "http", False) and len(policies) > 1:
        raise KvscopeError("serve --http: one --policy (a server is not a sweep)")
    points = sweep_points(_spec(ns, rates, users, policies[0]), policies, rates, users)
    if len(points) > 1 and ns.out is None:
        raise KvscopeError("serve: a sweep (several --rps, --concurrency or --policy values) needs --out")
    return points
