"""The `kvscope` command line. Bad input ends in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Sequence

from kvscope.argtypes import GIB_MAX, NVML_INTERVAL_MAX_MS, UINT64_MAX, FloatArg, IntArg, TextArg
from kvscope.errors import KvscopeError

EXIT_BAD_INPUT = 2
PROG = "kvscope"
ERROR_PREFIX = f"{PROG}: error: "

_INT = IntArg()  # any int flag: 64 bits; its domain (>= 1, ...) is checked where the value is used
_SEED = IntArg(0, UINT64_MAX)  # what torch.Generator.manual_seed takes, negatives excluded
_TEXT = TextArg()  # any path or name: not empty
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


class _SubParser(_Parser):
    """A subcommand's parser: arguments it does not know are an error named by the subcommand
    (`run: unrecognized arguments: --bogus`), not handed back to the top-level parser, which would report them
    under `kvscope` alone."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_TEXT, default=None,
                   help="preset name, Hugging Face checkpoint folder, or config.json (random weights)")
    p.add_argument("--dtype", type=_TEXT, default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on "
                                                             "CUDA, float32 on CPU)")
    p.add_argument("--device", type=_TEXT, default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of random weights, 0 to 2**64-1 (default 0)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--graphs", default=None, choices=["on", "off"],
                   help="replay each decode step from a captured CUDA graph (default: on for CUDA)")
    p.add_argument("--kernels", default=None, choices=["on", "off"],
                   help="kvscope's CUDA kernels for RMSNorm, SiLU*up and RoPE + KV write (default: on for CUDA)")


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
    g.add_argument("--max-new-tokens", type=_INT, default=16)
    g.add_argument("--json", action="store_true", help='last line of stdout: {"tokens": [[...], ...]}')
    g.set_defaults(func=_cmd_generate)

    r = sub.add_parser("run", help="instrumented prefill + decode run; writes a run folder of Parquet files")
    _add_model_args(r)
    r.add_argument("--batch-size", type=_INT, default=1)
    r.add_argument("--seq", type=_INT, default=512, help="prompt tokens per sequence")
    r.add_argument("--gen-tokens", type=_INT, default=32, help="new tokens per sequence (the first from prefill)")
    r.add_argument("--warmup", type=_INT, default=2)
    r.add_argument("--reps", type=_INT, default=5)
    r.add_argument("--granularity", default="phase", choices=["none", "phase", "layer", "op"],
                   help="which regions get CUDA events (NVTX ranges are emitted at every level)")
    r.add_argument("--no-nvtx", action="store_true", help="no NVTX ranges (also KVSCOPE_NVTX=0)")
    r.add_argument("--nvml-interval-ms", type=FloatArg(NVML_INTERVAL_MAX_MS, "ms"), default=20.0)
    r.add_argument("--out", type=_TEXT, default=None, help="run folder (default traces/<time>-<model>-bs<B>-seq<L>/)")
    r.set_defaults(func=_cmd_run)

    w = sub.add_parser("sweep", help="every (seq, batch) pair as a run, one model load; appends to a CSV/Parquet")
    _add_model_args(w)
    w.add_argument("--seq", required=True, help="comma-separated prompt lengths, e.g. 128,256,512")
    w.add_argument("--batch-sizes", required=True, help="comma-separated batch sizes, e.g. 1,2,4")
    w.add_argument("--gen-tokens", type=_INT, default=32)
    w.add_argument("--warmup", type=_INT, default=2)
    w.add_argument("--reps", type=_INT, default=5)
    w.add_argument("--granularity", default="phase", choices=["none", "phase", "layer", "op"])
    w.add_argument("--out", type=_TEXT, required=True, help="FILE.csv or FILE.parquet")
    w.add_argument("--collapse-factor", type=_FINITE, default=2.0)
    w.add_argument("--resume", action="store_true", help="skip configurations the file already holds")
    w.set_defaults(func=_cmd_sweep)

    c = sub.add_parser("calibrate", help="measure copy bandwidth, bf16 matmul rate and the decode matvec chain")
    c.add_argument("--device", type=_TEXT, default="cuda")
    c.add_argument("--model", type=_TEXT, default="qwen2.5-3b", help="preset whose batch-1 matvec chain is timed")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_calibrate)

    rp = sub.add_parser("report", help="Markdown report with PNG plots of a run folder or a sweep file")
    rp.add_argument("source", type=_TEXT, help="a run folder (or a `kvscope nsys` folder), or a sweep .csv/.parquet")
    rp.add_argument("--out", type=_TEXT, default=None, help="report folder (default: <source>-report beside it)")
    rp.set_defaults(func=_cmd_report)

    k = sub.add_parser("kv-math", help="KV-cache memory maths: bytes per token, capacity, Little's law, paging")
    k.add_argument("--model", type=_TEXT, required=True, help="preset name, checkpoint folder, or config.json")
    k.add_argument("--batch-size", type=_INT, default=1)
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
    k.add_argument("--json", action="store_true", help="stdout is one JSON object")
    k.set_defaults(func=_cmd_kv_math)

    a = sub.add_parser("align", help="project an nsys export's NVTX ranges onto kernels and align with timings")
    a.add_argument("export", type=_TEXT, help="nsys export: .sqlite, parquetdir folder, or .nsys-rep (needs nsys)")
    a.add_argument("--timings", type=_TEXT, default=None, help="the kvscope run folder profiled in the export")
    a.add_argument("--out", type=_TEXT, required=True,
                   help="folder for ranges/kernels/align/steps/kernel_classes.parquet")
    a.add_argument("--nsys", type=_TEXT, default=None, help="nsys executable (for .nsys-rep input)")
    a.set_defaults(func=_cmd_align)

    n = sub.add_parser("nsys", help="profile `kvscope run` under Nsight Systems, export and align it",
                       usage="kvscope nsys [--nsys PATH] [--out DIR] -- <kvscope run arguments>")
    n.add_argument("--nsys", type=_TEXT, default=None,
                   help="nsys executable (default: $NSYS, PATH, usual install folders)")
    n.add_argument("--out", type=_TEXT, default=None, help="output folder (default traces/<time>-nsys)")
    n.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments of `kvscope run`, after --")
    n.set_defaults(func=_cmd_nsys)
    return parser


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kvscope.commands.run import CLASSIC_COLUMNS, RunSpec
    from kvscope.commands.sweep import SweepSpec, parse_int_list, run_sweep

    base = RunSpec(model=ns.model, gen_tokens=ns.gen_tokens, warmup=ns.warmup, reps=ns.reps,
                   granularity=ns.granularity, attn=ns.attn, dtype=ns.dtype, device=ns.device, seed=ns.seed,
                   graphs=_on_off(ns.graphs), kernels=_on_off(ns.kernels))
    sw = SweepSpec(base, parse_int_list(ns.seq, "--seq"), parse_int_list(ns.batch_sizes, "--batch-sizes"),
                   Path(ns.out), ns.collapse_factor, ns.resume)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sweep", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"sweep ({what})")

        rows = run_sweep(sw, progress=progress, log=lambda m: err.print(f"kvscope: {m}"))
    cols = [c for c in CLASSIC_COLUMNS if c in rows.columns]
    print(rows[cols].to_string(index=False))
    print(f"sweep: {sw.out} ({len(rows)} configuration(s))")
    return 0


def _cmd_calibrate(ns: argparse.Namespace) -> int:
    from kvscope.engine.plan import resolve_device
    from kvscope.model.config import ModelArgs
    from kvscope.profiler.calibrate import calibrate, save

    device = resolve_device(ns.device)
    result = calibrate(device, ModelArgs.from_preset(ns.model))
    path = save(result)
    if ns.json:
        print(json.dumps(result))
    else:
        chain = result["matvec_chain"]
        print(f"{result['gpu']}: copy {result['copy_gb_s']:,.0f} GB/s (read + written), bf16 matmul "
              f"{result['bf16_tflop_s']:,.0f} TFLOP/s, {chain['preset']} batch-1 matvec chain "
              f"({chain['products']} products, one CUDA graph) {chain['ms']:.3f} ms = {chain['gb_s']:,.0f} GB/s")
        print(f"cached in {path}")
    return 0


def _cmd_report(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from kvscope.analysis.report import make_report

    report = make_report(Path(ns.source), Path(ns.out) if ns.out else None)
    files = sorted(p.name for p in report.parent.iterdir())
    print(f"report: {report} ({', '.join(files)})")
    return 0


def _model_dtype(source: object) -> str:
    """The dtype a checkpoint or config.json names (`torch_dtype` / `dtype`), bfloat16 for presets."""
    from pathlib import Path

    spec = Path(source.spec)
    cfg = spec / "config.json" if spec.is_dir() else spec
    if cfg.is_file() and cfg.suffix == ".json":
        data = json.loads(cfg.read_text())
        value = data.get("torch_dtype") or data.get("dtype")
        if isinstance(value, str) and value in ("float32", "bfloat16", "float16"):
            return value
    return "bfloat16"


def _cmd_kv_math(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvscope.analysis.kvmath import GIB_BYTES, KvQuery, kv_math
    from kvscope.model.weights import resolve_model

    source = resolve_model(ns.model, need_weights=False)  # the architecture is all kv-math needs
    gpu_mem = None
    if ns.gpu_mem_gb is not None:
        if not ns.gpu_mem_gb > 0:
            raise KvscopeError(f"--gpu-mem-gb must be positive, got {ns.gpu_mem_gb}")
        gpu_mem = int(ns.gpu_mem_gb * GIB_BYTES)
    elif ns.device is not None:
        from kvscope.engine.plan import resolve_device

        dev = resolve_device(ns.device)
        if dev.type != "cuda":
            raise KvscopeError("--device for kv-math takes cuda (the budget is the GPU's memory)")
        import torch

        gpu_mem = int(torch.cuda.mem_get_info(dev)[1])
    if ns.reserve_gb < 0:
        raise KvscopeError(f"--reserve-gb must be >= 0, got {ns.reserve_gb}")
    dtype = ns.dtype or source.dtype_name()
    result = kv_math(KvQuery(source.args, batch=ns.batch_size, seq=ns.seq, dtype=dtype, kv_dtype=ns.kv_dtype,
                             gpu_mem_bytes=gpu_mem, reserve_bytes=int(ns.reserve_gb * GIB_BYTES), rps=ns.rps,
                             latency_s=ns.latency_s, page_size=ns.page_size))
    if ns.json:
        print(json.dumps(result))
        return 0
    table = Table(title=f"KV-cache maths: {result['model']}, batch {result['batch']} x seq {result['seq']}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, int) and "bytes" in key:
            shown = f"{value:,} B ({value / GIB_BYTES:.3f} GiB)"
        elif isinstance(value, float):
            shown = f"{value:,.1f}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, shown)
    Console().print(table)
    return 0


def _print_align(result: object) -> None:
    from rich.console import Console

    from kvscope.analysis.report_align import summary_tables

    con = Console()
    for table in summary_tables(result):
        con.print(table)


def _cmd_align(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from kvscope.analysis.report_align import OUTPUT_FILES, analyse, output_folder, write

    out = Path(ns.out)
    folder = output_folder(out)  # checked before the analysis; written whole or not at all
    result = analyse(Path(ns.export), Path(ns.timings) if ns.timings else None, nsys=ns.nsys)
    with folder as tmp:
        write(result, tmp, {"command": " ".join(sys.argv), "timings": ns.timings})
    _print_align(result)
    print(f"align: {out} ({', '.join(OUTPUT_FILES)})")
    return 0


def _cmd_nsys(ns: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    from kvscope.analysis.nsys import export_rep
    from kvscope.analysis.report_align import analyse, write
    from kvscope.commands.nsys import capture
    from kvscope.commands.run import OutputFolder, prepare

    run_args = list(ns.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    if any(a == "--out" or a.startswith("--out=") for a in run_args):
        raise KvscopeError("nsys: give --out before --, not among the run arguments")
    if "--no-nvtx" in run_args:
        raise KvscopeError("nsys: needs NVTX ranges: drop --no-nvtx")
    prepare(_run_spec(parse_args(["run", *run_args])))  # validate before starting nsys
    final = Path(ns.out) if ns.out else Path("traces") / f"{datetime.now():%Y%m%d-%H%M%S}-nsys"
    folder = OutputFolder(final)
    try:
        rep, run_dir = capture(run_args, folder.tmp, ns.nsys)
        sqlite = export_rep(rep, ns.nsys, out=folder.tmp / "report.sqlite")
        result = analyse(sqlite, run_dir)
        write(result, folder.tmp, {"command": " ".join(sys.argv), "run_args": run_args})
        done = folder.commit()
    except BaseException:
        folder.discard()
        raise
    _print_align(result)
    print(f"nsys: {done} (report.nsys-rep, report.sqlite, run/, ranges, kernels, align, steps, kernel_classes)")
    return 0


def _on_off(value: str | None) -> bool | None:
    """An `on|off` flag: True / False, or None when not given (the default then depends on the device)."""
    return None if value is None else value == "on"


def _run_spec(ns: argparse.Namespace):  # -> RunSpec
    from kvscope.commands.run import RunSpec

    return RunSpec(model=ns.model, batch_size=ns.batch_size, seq=ns.seq, gen_tokens=ns.gen_tokens,
                   warmup=ns.warmup, reps=ns.reps, granularity=ns.granularity, attn=ns.attn, dtype=ns.dtype,
                   device=ns.device, out=ns.out, nvtx=False if ns.no_nvtx else None,
                   nvml_interval_ms=ns.nvml_interval_ms, seed=ns.seed, graphs=_on_off(ns.graphs),
                   kernels=_on_off(ns.kernels))


def _cmd_run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvscope.commands.run import execute
    from kvscope.commands.summary_table import summary_table

    spec = _run_spec(ns)
    err = Console(stderr=True)
    # no bar when stderr is not a terminal: rich would leave a blank line there, before any error line
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, object] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind] = bar.add_task(kind, total=total)
            bar.update(tasks[kind], completed=done)

        result = execute(spec, progress=progress, log=lambda msg: err.print(f"kvscope: {msg}"))
    Console().print(summary_table(result.summary))
    files = sorted(p.name for p in result.out_dir.iterdir())
    print(f"run folder: {result.out_dir} ({', '.join(files)})")
    return 0


def parse_prompt_ids(text: str) -> list[list[int]]:
    prompts: list[list[int]] = []
    for i, part in enumerate(text.split(";")):
        items = [x.strip() for x in part.split(",")]
        if items == [""]:
            raise KvscopeError(f"--prompt-ids: prompt {i} is empty")
        ids: list[int] = []
        for item in items:
            try:
                ids.append(int(item))
            except ValueError:
                raise KvscopeError(f"--prompt-ids: {item!r} in prompt {i} is not an integer token id") from None
        prompts.append(ids)
    return prompts


def _cmd_generate(ns: argparse.Namespace) -> int:
    from kvscope.commands.run import use_graphs, use_kernels
    from kvscope.engine.loop import Engine, check_prompts
    from kvscope.engine.plan import RunConfig, parse_dtype, resolve_device
    from kvscope.model.weights import load_model, resolve_model

    if ns.model is None:
        raise KvscopeError("generate: --model is required (a preset, a checkpoint folder or a config.json)")
    if ns.max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    source = resolve_model(ns.model)
    device = resolve_device(ns.device)
    dtype = parse_dtype(ns.dtype, device)
    tokenizer = None
    if ns.prompt is not None:
        tokenizer = _load_tokenizer(source.folder, ns.model)
        prompts = [tokenizer.encode(text) for text in ns.prompt]
        if any(len(p) == 0 for p in prompts):
            raise KvscopeError("--prompt: a prompt encodes to no tokens")
    else:
        prompts = parse_prompt_ids(ns.prompt_ids)
    check_prompts(prompts, source.args.vocab_size)
    longest = max(len(p) for p in prompts)
    max_seq = longest + ns.max_new_tokens
    if longest > source.args.max_position_embeddings:
        raise KvscopeError(f"prompt of {longest} tokens exceeds {source.args.name}'s maximum context of "
                           f"{source.args.max_position_embeddings}")
    cfg = RunConfig(batch_size=len(prompts), max_seq=max_seq, dtype=dtype, device=device, attn=ns.attn)
    cfg.check(source.args)
    graphs = use_graphs(_on_off(ns.graphs), device)
    kernels = use_kernels(_on_off(ns.kernels), device, dtype)
    model, ready_s = load_model(source, device, dtype, seed=ns.seed)
    print(f"kvscope: {source.args.name} ({source.kind}{', random weights' if source.random_weights else ''}) "
          f"on {device} in {str(dtype).removeprefix('torch.')}, ready in {ready_s:.2f} s", file=sys.stderr)
    engine = Engine(model, cfg, graphs=graphs, kernels=kernels)
    tokens = engine.generate(prompts, ns.max_new_tokens)
    for row in tokens:
        print(json.dumps(row))
        if tokenizer is not None:
            print(f"kvscope: text: {tokenizer.decode(row)!r}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"tokens": tokens}))
    return 0


def _load_tokenizer(folder: object, spec: str):  # -> transformers tokenizer
    if folder is None:
        raise KvscopeError(f"--prompt needs a checkpoint folder with a tokenizer; {spec} has none (use --prompt-ids)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, AttributeError... for a bad file
        from kvscope.model.weights import one_line

        detail = one_line(str(exc), 400) or "no message"
        raise KvscopeError(f"cannot load a tokenizer from {folder} ({type(exc).__name__}): {detail}") from None


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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; bad arguments raise KvscopeError (one line, naming the subcommand and the flag)."""
    return build_parser().parse_args(join_dash_values(argv))


def error_line(exc: KvscopeError) -> str:
    """The one stderr line of an error: `kvscope: error: <message>`, the message on one line, with no second
    `kvscope:` prefix (a message that carries its own is written once)."""
    msg = " ".join(str(exc).split())
    while msg.startswith(f"{PROG}:"):
        msg = msg.removeprefix(f"{PROG}:").strip().removeprefix("error:").strip()
    return f"{ERROR_PREFIX}{msg}"


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (sent by `timeout`, by job schedulers, by nsys at the end of a capture range) unwinds like an error,
    # so a run folder in the making is removed instead of left half-written. Set here, in the CLI, not on import.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        ns = parse_args(sys.argv[1:] if argv is None else argv)
        return int(ns.func(ns))
    except KvscopeError as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvscope: interrupted", file=sys.stderr)
        return 130
