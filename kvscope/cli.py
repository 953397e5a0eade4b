"""The `kvscope` command line: parses the arguments and hands them to their command in `kvscope.commands`. Bad input
ends in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from kvscope.argtypes import GIB_MAX, NVML_INTERVAL_MAX_MS, UINT64_MAX, FloatArg, IntArg, TextArg
from kvscope.errors import KvscopeError
from kvscope.io import check_path, os_reason
from kvscope.schema import ENGINES, GRANULARITIES, KVSCOPE_ENGINE

EXIT_BAD_INPUT = 2
PROG = "kvscope"
ERROR_PREFIX = f"{PROG}: error: "



class _InputPath(TextArg):
    """A path the command reads (or a name that may be one, as `--model`): a `TextArg`, and what the system says of
    it checked now (`kvscope.io.check_path`), so that a name too long, a loop of links or a file where a folder is
    expected is one line naming the flag (`align: argument export: <path>: File name too long`) before any work. A
    path that does not exist passes: its reader says so in its own words."""

    def __call__(self, text: str) -> str:
        text = super().__call__(text)
        try:
            check_path(text)
        except KvscopeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text


_INT = IntArg()  # any int flag: 64 bits; its domain (>= 1, ...) is checked where the value is used
_SEED = IntArg(0, UINT64_MAX)  # what torch.Generator.manual_seed takes, negatives excluded
_TEXT = TextArg()  # any path or name: not empty
_INPUT = _InputPath()  # a path read (an output path is checked by its writer: kvscope.io)
_GIB = FloatArg(GIB_MAX, "GiB")  # memory sizes: their bytes fit in 64 bits
_PER_S = FloatArg(1e9)  # --rps and --latency-s: their product (the concurrency) fits in 64 bits
_FINITE = FloatArg()


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (the default prints the whole usage first).

    The message names the subcommand (`run: argument --seq: ...`), never the program: `main` adds the one
    `kvscope: error: ` prefix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()
        raise KvscopeError(f"{command}: {message}" if command else message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: `(default: X)` added unless the help already says it; an option without
    a default of its own (None: decided later, which its help then says) or a switch gets none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class _SubParser(_Parser):
    """A subcommand's parser: arguments it does not know are an error named by the subcommand
    (`run: unrecognized arguments: --bogus`), not handed back to the top-level parser, which would report them
    under `kvscope` alone. Its help shows every option's default (`_HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and how it runs: every command that loads the model (`generate`, and the run options)."""
    p.add_argument("--model", type=_INPUT, default=None,
                   help="preset name, Hugging Face checkpoint folder, or config.json (random weights) (default: "
                        "qwen2.5-3b on CUDA, tiny on a CPU: engine.plan's DEFAULT_MODEL_*)")
    p.add_argument("--dtype", type=_TEXT, default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on "
                                                             "CUDA, float32 on CPU)")
    p.add_argument("--device", type=_TEXT, default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of random weights, 0 to 2**64-1 (default 0)")
    p.add_argument("--attn", default=None, choices=["sdpa", "eager", "kvscope"],
                   help="attention implementation; kvscope: decode steps through kvscope's split-KV kernel (CUDA), "
                        "prefills as sdpa (default: kvscope for kvscope's loop on CUDA in bfloat16/float16 with "
                        "--kernels on, else sdpa)")
    p.add_argument("--graphs", default=None, choices=["on", "off"],
                   help="replay each decode step from a captured CUDA graph (default: on for CUDA)")
    p.add_argument("--kernels", default=None, choices=["on", "off"],
                   help="kvscope's CUDA kernels for RMSNorm, SiLU*up and RoPE + KV write (default: on for CUDA "
                        "with CuPy installed)")
    p.add_argument("--prefill-graphs", default=None, choices=["on", "off"],
                   help="replay each prefill from a CUDA graph captured per length bucket, 16 to 4096 tokens "
                        "(default: on where --graphs is on)")
    p.add_argument("--engine", default=KVSCOPE_ENGINE, choices=ENGINES,
                   help="the loop: kvscope's, transformers' eager forward over a DynamicCache, or transformers' "
                        "static cache with its compiled decode step (kvscope.engine.hf)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a measured run, shared by `run`, `sweep` and the run arguments of `nsys`: the model and how it
    runs, the new tokens, the warm-up and timed repetitions, the granularity of the timed regions."""
    _add_model_args(p)
    p.add_argument("--gen-tokens", type=_INT, default=32, help="new tokens per sequence (the first from prefill)")
    p.add_argument("--warmup", type=_INT, default=2, help="untimed repetitions before the timed ones")
    p.add_argument("--reps", type=_INT, default=5, help="timed repetitions (prefill + decode each)")
    p.add_argument("--granularity", default="phase", choices=GRANULARITIES,
                   help="which regions get CUDA events (NVTX ranges are emitted at every level)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Where the time of one LLM token goes.")
    from kvscope import __version__

    parser.add_argument("--version", action="version", version=f"kvscope {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_SubParser, required=True)

    g = sub.add_parser("generate", help="greedy generation with the hand-written loop; prints new token ids")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids; ';' separates prompts (one ragged batch)")
    src.add_argument("--prompt", action="append", help="prompt text (needs a tokenizer in the model folder); "
                                                       "repeat for a batch")
    g.add_argument("--max-new-tokens", type=_INT, default=16, help="new tokens per prompt")
    _add_tp(g, "generate")
    g.add_argument("--json", action="store_true", help='last line of stdout: {"tokens": [[...], ...]}')

    _add_run(sub)
    _add_sweep(sub)
    _add_serve(sub)

    c = sub.add_parser("calibrate", help="measure copy bandwidth, bf16 matmul rate and the decode matvec chain")
    c.add_argument("--device", type=_TEXT, default="cuda", help="the GPU to measure")
    c.add_argument("--model", type=_TEXT, default="qwen2.5-3b", help="preset whose batch-1 matvec chain is timed")
    c.add_argument("--json", action="store_true")

    _add_report(sub)
    _add_diff(sub)
    _add_capacity(sub)

    _add_kv_math(sub.add_parser("kv-math", help="KV-cache memory maths: bytes per token, capacity, Little's law, "
                                                "paging"))

    a = sub.add_parser("align", help="project an nsys export's NVTX ranges onto kernels and align with timings")
    a.add_argument("export", type=_INPUT, help="nsys export: .sqlite, parquetdir folder, or .nsys-rep (needs nsys)")
    a.add_argument("--timings", type=_INPUT, default=None, help="the kvscope run folder profiled in the export")
    a.add_argument("--out", type=_TEXT, required=True,
                   help="folder for ranges/kernels/range_summary.parquet (any export) and align/steps/"
                        "kernel_classes.parquet (kvscope runs, or with --phase-map)")
    a.add_argument("--nsys", type=_INPUT, default=None, help="nsys executable (for .nsys-rep input)")
    a.add_argument("--domain", default=None, help="keep the ranges of this NVTX domain only ('' for the default "
                                                  "domain)")
    a.add_argument("--range", default=None, metavar="RE", help="keep the ranges whose name matches RE (re.search, "
                                                               "the name without its domain)")
    a.add_argument("--start", default=None, metavar="T", help="keep ranges and GPU operations that end at or after T: "
                                                              "ns on the export's clock, or seconds as 1.5s")
    a.add_argument("--end", default=None, metavar="T", help="keep ranges and GPU operations that start at or before "
                                                            "T (ns, or seconds as 2s)")
    a.add_argument("--pid", type=_INT, default=None, help="keep the ranges and GPU operations of this process")
    a.add_argument("--phase-map", default=None, metavar="KEY=RE,...",
                   help="label another engine's ranges: prefill=RE,decode=RE,step=RE,layer=RE (any subset), so the "
                        "step table and the kernel-class breakdown work on them")
    a.add_argument("--classes", type=_INPUT, default=None, metavar="FILE",
                   help="kernel-class rules (TOML or JSON) tried before the built-in ones")
    roof = a.add_argument_group("the class roofline (class_roofline.parquet: each kernel class's bytes and FLOPs "
                                "against its time; written when the model and the shape are known)")
    roof.add_argument("--model", type=_INPUT, default=argparse.SUPPRESS,
                      help="preset name, Hugging Face checkpoint folder, or config.json of the model that ran "
                           "(default: the --timings run folder's model)")
    roof.add_argument("--dtype", type=_TEXT, default=None,
                      help="float32 | bfloat16 | float16 | fp8: the width of weights, activations and KV cache "
                           "(default: the run's, else the config.json's, else bfloat16)")
    roof.add_argument("--batch", "--batch-size", dest="batch", type=_INT, default=None,
                      help="sequences per batch (default: the export's kvscope run range; a foreign export needs it)")
    roof.add_argument("--seq", type=_INT, default=None,
                      help="prompt tokens per sequence (default: the export's kvscope run range; a foreign export "
                           "needs it)")
    roof.add_argument("--ctx", type=_INT, default=None,
                      help="positions in the KV cache at a decode step (default: seq + N for decode step N, the "
                           "low median over the steps)")
    roof.add_argument("--ceilings", type=_TEXT, default=None, metavar="GB_S,TFLOP_S",
                      help="the GPU's copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s), as `kvscope calibrate` "
                           "prints them; without them the shares of the ceilings are empty")
    _add_json(a, "the output folder, its files and the kernel time by class")

    _add_nsys(sub)
    return parser



def _add_run(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="instrumented prefill + decode run; writes a run folder of Parquet files")
    add_run_options(r)
    r.add_argument("--batch-size", type=_INT, default=1, help="sequences per batch")
    r.add_argument("--seq", type=_INT, default=512, help="prompt tokens per sequence")
    r.add_argument("--no-nvtx", action="store_true", help="no NVTX ranges (also KVSCOPE_NVTX=0)")
    r.add_argument("--nvml-interval-ms", type=FloatArg(NVML_INTERVAL_MAX_MS, "ms"), default=20.0,
                   help="NVML polling interval for metrics the driver does not buffer (ms)")
    r.add_argument("--out", type=_TEXT, default=None, help="run folder (default traces/<time>-<model>-bs<B>-seq<L>/)")
    _add_tp(r, "run")
    _add_json(r, "the run folder, its files and the summary's key numbers")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="a served load: requests arriving over time, continuous batching over a paged "
                                     "KV cache; writes a run folder of per-request and per-iteration records")
    _add_model_args(s)
    load = s.add_argument_group("the load (exactly one of --rps, --concurrency, --request-file)")
    load.add_argument("--rps", type=_TEXT, default=None, metavar="R[,R...]",
                      help="open loop: Poisson arrivals at R requests per second, seeded; a list makes a sweep")
    load.add_argument("--concurrency", type=_TEXT, default=None, metavar="N[,N...]",
                      help="closed loop: N users, each sending its next request when the last one finishes")
    load.add_argument("--request-file", type=_INPUT, default=None, metavar="FILE",
                      help="replay requests: CSV (arrival_s,prompt_tokens,output_tokens[,request_id]) or JSONL")
    load.add_argument("--prompt-len", type=_TEXT, default=None,
                      help="prompt tokens: N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA, each with optional :max=N "
                           "(default 512)")
    load.add_argument("--output-len", type=_TEXT, default=None,
                      help="output tokens (same forms as --prompt-len; default 128)")
    load.add_argument("--requests", "--num-requests", dest="requests", type=_INT, default=None,
                      help="stop after this many requests (with --duration: whichever comes first)")
    load.add_argument("--duration", type=_FINITE, default=None, metavar="S", help="stop arrivals after S seconds")
    web = s.add_argument_group("over HTTP (--http: an OpenAI-compatible server in place of the in-process load)")
    web.add_argument("--http", action="store_true",
                     help="serve /v1/completions, /v1/chat/completions, /v1/models and /health until SIGINT/SIGTERM; "
                          "each HTTP request is a request of the load, recorded as in-process ones are")
    web.add_argument("--host", type=_TEXT, default=None, help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=_INT, default=None, help="port to listen on (default 8000; 0: a free one)")
    web.add_argument("--drain-s", type=_FINITE, default=None, metavar="S",
                     help="after SIGINT/SIGTERM, stop accepting and let running requests finish for S seconds, then "
                          "cut the rest (default 10; a second signal cuts at once)")
    web.add_argument("--queue-limit", type=_INT, default=None, metavar="N",
                     help="answer 429 while N requests wait for admission (default: no limit, requests queue)")
    web.add_argument("--served-model-name", type=_TEXT, default=None, metavar="NAME",
                     help="the model name requests give and /v1/models lists (default: the --model argument)")
    web.add_argument("--max-body-bytes", type=_INT, default=None, metavar="N",
                     help="the largest request body read; larger ones are answered 413 (default 1 MiB)")
    sch = s.add_argument_group("the scheduler and the KV pool")
    sch.add_argument("--policy", type=_TEXT, default="chunked", metavar="P[,P...]",
                     help="prefill-first | chunked (chunked prefill mixed with decode); a list makes a sweep")
    sch.add_argument("--preempt", default="recompute", choices=["recompute", "swap"],
                     help="when blocks run out: drop the cache and prefill again later, or swap to host memory")
    sch.add_argument("--max-batch-tokens", type=_INT, default=2048, help="tokens per iteration (the budget)")
    sch.add_argument("--max-seqs", type=_INT, default=64, help="sequences running at once (the largest graph)")
    sch.add_argument("--max-seq", type=_INT, default=None,
                     help="the longest sequence, prompt + output (default: the load's longest; with --http the "
                          "model's context, at most 4096)")
    sch.add_argument("--block-size", type=_INT, default=16, help="tokens per KV block")
    sch.add_argument("--kv-pool-gb", type=_GIB, default=None,
                     help="the KV pool's size (default: --kv-pool-frac of the free device memory; on a CPU, room "
                          "for --max-seqs sequences of --max-seq tokens)")
    sch.add_argument("--kv-pool-frac", type=_FINITE, default=0.5,
                     help="fraction of the device memory free after the weights load, for the KV pool")
    out = s.add_argument_group("records")
    out.add_argument("--slo-ttft-ms", type=_FINITE, default=None, help="goodput: time to first token at most this")
    out.add_argument("--slo-tpot-ms", type=_FINITE, default=None, help="goodput: time per output token at most this")
    out.add_argument("--granularity", default="phase", choices=GRANULARITIES,
                     help="phase: each iteration timed by CUDA events; layer/op: also inside eager iterations")
    out.add_argument("--out", type=_TEXT, default=None, help="run folder (a sweep: one subfolder per point)")
    out.add_argument("--no-nvtx", dest="nvtx", action="store_false", default=None, help="no NVTX ranges")
    out.add_argument("--nvml-interval-ms", type=_FINITE, default=20.0, help="NVML sampling period")
    out.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                     help="no progress bar on stderr")
    _add_json(s, "the run folder, its files and the summary's key numbers")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("sweep", help="every (seq, batch) pair as a run, one model load; appends to a CSV/Parquet")
    add_run_options(w)
    w.add_argument("--seq", required=True, help="comma-separated prompt lengths, e.g. 128,256,512")
    w.add_argument("--batch-sizes", required=True, help="comma-separated batch sizes, e.g. 1,2,4")
    w.add_argument("--out", type=_TEXT, required=True, help="FILE.csv or FILE.parquet")
    w.add_argument("--collapse-factor", type=_FINITE, default=2.0,
                   help="flag latency/throughput collapse beyond this factor of the best earlier configuration")
    w.add_argument("--resume", action="store_true", help="skip configurations the file already holds")
    w.add_argument("--nsys", nargs="?", const=True, default=None, type=_INPUT, metavar="PATH",
                   help="also capture every configuration under Nsight Systems (one nsys process, one report each) "
                        "and add its attribution columns; PATH: the nsys executable (default: $NSYS, PATH, usual "
                        "install folders)")
    w.add_argument("--nsys-flag", action="append", default=[], metavar="FLAG",
                   help="with --nsys: an extra `nsys profile` flag, repeatable (as in `kvscope nsys`)")
    w.add_argument("--keep-reports", default=None, choices=["on", "off"],
                   help="with --nsys: keep each capture's .nsys-rep and SQLite export beside its Parquet tables in "
                        "<out stem>-nsys/ (default on; off: the Parquet tables only)")
    _add_json(w, "the sweep file and each configuration's key numbers")


def _add_report(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="Markdown report with PNG plots of a run folder or a sweep file")
    rp.add_argument("source", type=_INPUT, help="a run folder (or a `kvscope nsys` folder), or a sweep .csv/.parquet")
    rp.add_argument("--out", type=_TEXT, default=None, help="report folder (default: <source>-report beside it)")
    rp.add_argument("--compare", type=_INPUT, default=None, metavar="B.csv",
                    help="a second sweep file of the same points (e.g. another engine's): adds a side-by-side section")
    _add_json(rp, "the report, its folder and files")


def _add_diff(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("diff", help="compare two run folders, captures (align/nsys folders, exports) or sweep files: "
                                    "each row with a 95%% interval and a verdict that says when it cannot tell")
    d.add_argument("a", type=_INPUT, help="the baseline: a run folder, a folder of run folders (repeats), an align "
                                          "or nsys folder, an nsys export (.sqlite, .nsys-rep) or a sweep file "
                                          "(.csv/.parquet)")
    d.add_argument("b", type=_INPUT, help="the one compared with it, of the same kind")
    d.add_argument("--threshold", type=_FINITE, default=2.0, metavar="PCT",
                   help="same when the 95%% interval of B / A lies inside ±PCT%%; slower/faster when beyond it")
    d.add_argument("--fail-if", action="append", default=None, metavar="slower:PCT[:ROW]",
                   help="a gate, repeatable: exit 1 when ROW (default: the decode step) is slower than PCT%% with "
                        "confidence, 0 when it is not, 2 when it cannot tell (the reason on stderr)")
    d.add_argument("--allow-different", action="store_true",
                   help="compare runs of different models, dtypes or shapes side by side (every verdict "
                        "'cannot tell'); refused otherwise")
    d.add_argument("--top", type=_INT, default=20, metavar="N", help="rows of the largest changes printed")
    d.add_argument("--out", type=_TEXT, default=None, help="also write diff.parquet and diff.md into this folder")
    _add_json(d, "every row with its interval and verdict, and each gate's answer")


def _add_capacity(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser("capacity", help="capacity planning from a measured batch sweep: the largest batch that fits "
                                         "memory and meets TPOT/TTFT targets, its throughput and request rate")
    cp.add_argument("--sweep", type=_INPUT, required=True, help="a batch sweep file (.csv/.parquet): one prompt length")
    cp.add_argument("--gpu-mem-gb", type=_GIB, required=True, help="the GPU's memory in GiB")
    cp.add_argument("--tpot-slo-ms", type=_FINITE, required=True, help="target time per output token (ms)")
    cp.add_argument("--ttft-slo-ms", type=_FINITE, required=True, help="target time to first token (ms)")
    cp.add_argument("--prompt", type=_INT, required=True, help="prompt tokens per request")
    cp.add_argument("--output", type=_INT, required=True, help="output tokens per request")
    cp.add_argument("--block-tokens", type=_INT, default=16, help="tokens per block of the paged cache")
    cp.add_argument("--reserve-gb", type=_GIB, default=1.0, help="kept free for context and workspaces (GiB)")
    cp.add_argument("--model", type=_INPUT, default=argparse.SUPPRESS,
                    help="the sweep's model, when the file's cannot be resolved (default: the sweep's own)")
    cp.add_argument("--out", type=_TEXT, default=None, help="also write the table to this CSV file")
    _add_json(cp, "the table's rows (each with its source), warnings and assumptions")


def _add_nsys(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser("nsys", help="profile a command (by default `kvscope run`; `serve ...`: a served load) under "
                                    "Nsight Systems, export and align it",
                       usage="kvscope nsys [--nsys PATH] [--out DIR] [--nsys-flag=FLAG ...] [--json] -- "
                             "(<kvscope run arguments> | serve <kvscope serve arguments> | COMMAND [ARG ...])")
    n.add_argument("--nsys", type=_INPUT, default=None,
                   help="nsys executable (default: $NSYS, PATH, usual install folders)")
    n.add_argument("--out", type=_TEXT, default=None, help="output folder (default traces/<time>-nsys)")
    n.add_argument("--nsys-flag", action="append", default=[], metavar="FLAG",
                   help="an extra `nsys profile` flag, repeatable; write --nsys-flag=--sample=cpu (or "
                        "--nsys-flag '-t cuda,nvtx,osrt'); it replaces kvscope's own value of the same option")
    _add_json(n, "the output folder, its files and the kernel time by class")
    n.add_argument("--tp", type=_INT, default=None, metavar="N",
                   help="profile `kvscope run --tp N`: every rank in one capture (nsys follows the spawned ranks), "
                        "then compute, communication and idle per rank and step, and the straggler rank")
    n.add_argument("run_args", nargs=argparse.REMAINDER,
                   help="after --: arguments of `kvscope run` (empty, or starting with -), `serve` and the arguments "
                        "of `kvscope serve` (one load: the per-iteration GPU attribution is written too), or any "
                        "command to profile")


def _add_tp(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tp", type=_INT, default=None, metavar="N",
                   help=f"tensor parallelism: {what} with the model split over N ranks (one GPU each, NCCL; gloo on "
                        "the CPU), spawned here or started by torchrun --nproc-per-node N")


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"last line of stdout: one JSON object with {what}")


def _add_kv_math(k: argparse.ArgumentParser) -> None:
    k.add_argument("--model", type=_INPUT, required=True, help="preset name, checkpoint folder, or config.json")
    k.add_argument("--batch-size", type=_INT, default=1, help="sequences (requests) in the batch")
    k.add_argument("--seq", type=_INT, default=0, help="context per request (default: the model's maximum)")
    k.add_argument("--dtype", type=_TEXT, default=None,
                   help="weights/activations dtype (default: the model's, bf16 for presets)")
    k.add_argument("--kv-dtype", default=None, choices=["bf16", "fp16", "fp8", "fp32"], help="default: --dtype")
    budget = k.add_mutually_exclusive_group()
    budget.add_argument("--gpu-mem-gb", type=_GIB, default=None, help="memory budget in GiB")
    budget.add_argument("--device", type=_TEXT, default=None, help="cuda: take the budget from the GPU present")
    k.add_argument("--reserve-gb", type=_GIB, default=1.0, help="kept free for context and workspaces (GiB)")
    k.add_argument("--rps", type=_PER_S, default=None, help="arrival rate, requests per second")
    k.add_argument("--latency-s", type=_PER_S, default=None, help="time a request stays in flight, seconds")
    k.add_argument("--page-size", type=_INT, default=None, help="tokens per KV page (paged cache waste)")
    k.add_argument("--tp", type=_INT, default=None, metavar="N",
                   help="tensor parallelism over N GPUs: KV bytes, weights, batch and context per GPU")
    k.add_argument("--json", action="store_true", help="stdout is one JSON object")


def _nsys_run_args(ns: argparse.Namespace) -> None:
    """`kvscope nsys`'s arguments after `--`. `kvscope run` arguments (none, or starting with `-`, or `kvscope run
    ...`): `ns.run_args` without the `--` and `ns.run`, the same parsed as `kvscope run` arguments (their errors are
    `run:` errors). `serve ...` (or `kvscope serve ...`): `ns.run_args` the serve arguments and `ns.serve` them parsed
    (`serve:` errors), `ns.run` None. Any other command: `ns.command_args`, and `ns.run` and `ns.serve` None."""
    run_args = list(ns.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    ns.serve = None
    if run_args[:1] == ["serve"] or run_args[:2] == [PROG, "serve"]:
        _nsys_serve_args(ns, run_args[run_args.index("serve") + 1:])
        return
    if run_args[:2] == [PROG, "run"]:
        run_args = run_args[2:]
    elif run_args and not run_args[0].startswith("-"):
        if getattr(ns, "tp", None) is not None:
            raise KvscopeError("nsys: --tp profiles `kvscope run --tp N`; another command starts its own processes")
        ns.command_args, ns.run_args, ns.run = run_args, [], None
        return
    ns.command_args = []
    if getattr(ns, "tp", None) is not None:
        if any(a == "--tp" or a.startswith("--tp=") for a in run_args):
            raise KvscopeError("nsys: give --tp once, before --")
        run_args = [*run_args, "--tp", str(ns.tp)]
    if any(a == "--out" or a.startswith("--out=") for a in run_args):
        raise KvscopeError("nsys: give --out before --, not among the run arguments")
    if "--no-nvtx" in run_args:
        raise KvscopeError("nsys: needs NVTX ranges: drop --no-nvtx")
    ns.run_args = run_args
    ns.run = parse_args(["run", *run_args])


# `kvscope serve` flags that make a sweep with several comma-separated values: `kvscope nsys` profiles one load
_SERVE_SWEEP_FLAGS = ("rps", "concurrency", "policy")


def _nsys_serve_args(ns: argparse.Namespace, serve_args: list[str]) -> None:
    """`kvscope nsys -- serve SERVE_ARGS`: parsed as `kvscope serve` arguments; one load (no sweep), NVTX on, the
    run folder kvscope's (`--out` goes before `--`), on one device (no `--tp`)."""
    if getattr(ns, "tp", None) is not None:
        raise KvscopeError("nsys: --tp profiles `kvscope run --tp N`; a served load runs on one device")
    serve = parse_args(["serve", *serve_args])
    if serve.out is not None:
        raise KvscopeError("nsys: give --out before --, not among the serve arguments")
    if serve.nvtx is False:
        raise KvscopeError("nsys: needs NVTX ranges: drop --no-nvtx")
    for flag in _SERVE_SWEEP_FLAGS:
        value = getattr(serve, flag)
        if value is not None and "," in value:
            raise KvscopeError(f"nsys: profiles one served load: give one --{flag} value, not {value!r} (a sweep)")
    ns.command_args, ns.run_args, ns.run, ns.serve = [], serve_args, None, serve


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# A value that starts with "-" but is no option: a negative number argparse does not recognise as one (its regex
# knows -1 and -.5, not -1,2 or -5;3 or -1e3 or -inf).
_DASH_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """`--flag -1,2` -> `--flag=-1,2`, before argparse sees it.

    argparse reads any argument that starts with "-" and is not a plain negative number as an option, so
    `--prompt-ids -1,2` failed with "expected one argument" instead of reaching the real error (token id -1 outside
    the vocabulary); `--gpu-mem-gb -inf` the same. No kvscope option starts with "-" and a digit, so such an argument
    after a long option is that option's value. `--flag=-1,2` is what argparse itself accepts. Arguments after `--`
    are left as they are (they belong to `kvscope run` under `kvscope nsys`, which applies this again)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return [*out, *argv[i:]]
        if (arg.startswith("--") and len(arg) > 2 and "=" not in arg and i + 1 < len(argv)
                and _DASH_VALUE.match(argv[i + 1])):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def join_flag_values(argv: Sequence[str], flag: str) -> list[str]:
    """`--nsys-flag --sample=cpu` -> `--nsys-flag=--sample=cpu` (before `--`): the value of such a flag is itself an
    option, which argparse would otherwise read as one."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return [*out, *argv[i:]]
        if argv[i] == flag and i + 1 < len(argv) and argv[i + 1] != "--":
            out.append(f"{flag}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; bad arguments raise KvscopeError (one line, naming the subcommand and the flag)."""
    ns = build_parser().parse_args(join_flag_values(join_dash_values(argv), "--nsys-flag"))
    if ns.command == "nsys":
        _nsys_run_args(ns)
    return ns


def run_command(ns: argparse.Namespace) -> int:
    """Hand the parsed arguments to their command: `kvscope.commands.<command>.command` (`kv-math`: `kv_math`),
    imported only now, so that a command that reads files never imports torch."""
    module = importlib.import_module(f"kvscope.commands.{ns.command.replace('-', '_')}")
    return int(module.command(ns))


def error_line(exc: KvscopeError) -> str:
    """The one stderr line of an error: `kvscope: error: <message>`, the message on one line, with no second
    `kvscope:` prefix (a message that carries its own is written once)."""
    msg = " ".join(str(exc).split())
    while msg.startswith(f"{PROG}:"):
        msg = msg.removeprefix(f"{PROG}:").strip().removeprefix("error:").strip()
    return f"{ERROR_PREFIX}{msg}"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the command's exit code; bad input is one line on stderr and exit code 2.

    Last resorts, so that no input ends in a traceback or in noise before its one error line: an OSError that a
    command did not turn into a KvscopeError (an unexpected file-system error) is one line too, naming the file and
    the system's reason; the warnings a command raises (a library's overflow warning on values near 2**63) are held
    until it ends, shown after its output when it succeeds, and dropped when it ends in an error line, which is
    then the only line. Ctrl-C and SIGTERM keep their behaviour."""
    # SIGTERM (sent by `timeout`, by job schedulers, by nsys at the end of a capture range) unwinds like an error,
    # so a run folder in the making is removed instead of left half-written. Set here, in the CLI, not on import.
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    held: list[warnings.WarningMessage] = []
    shown = True
    try:
        # the warnings machinery is process-wide and not thread-safe: held only from the main thread
        with warnings.catch_warnings(record=True) if main_thread else contextlib.nullcontext(held) as held:
            return run_command(parse_args(sys.argv[1:] if argv is None else argv))
    except KvscopeError as exc:
        shown = False
        print(error_line(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        shown = False
        if isinstance(exc, BrokenPipeError):  # stdout closed early (`| head`): nothing more can be printed there
            with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor: nothing to do
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(error_line(KvscopeError(os_error_message(exc))), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvscope: interrupted", file=sys.stderr)
        return 130
    finally:
        if shown:
            for w in held or ():
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def os_error_message(exc: OSError) -> str:
    """An OSError as one line: the file (and the second file of a rename) and the system's reason."""
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{files}: {os_reason(exc)}" if files else os_reason(exc)
