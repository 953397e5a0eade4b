"""Decode step time of transformers and kvscope on the same GPU, same random weights, one process.

Implementations: `hf-eager` (transformers forward loop with its DynamicCache), `hf-static-compiled`
(`generate(cache_implementation="static")`, which compiles; the first call per shape takes minutes),
`kvscope-eager`, `kvscope-graphs` (decode steps replayed from one CUDA graph). For every batch and context:
decode ms per step (median of CUDA-event step times after warm-up; for `hf-static-compiled`, the difference of
two `generate` calls divided by the extra steps), tokens/s, and MBU against the calibrated copy bandwidth
(`kvscope calibrate`; bytes per step counted by `kvscope.analysis.roofline.decode_cost`), and the ratio to the
step's matrix products alone at that batch, replayed from one CUDA graph (`matvec_chain_ms`, measured here).

    python3 benchmarks/decode_vs_hf.py --model qwen2.5-3b --batches 1,8,64 --contexts 512,4096
        --impls hf-eager,kvscope-eager,kvscope-graphs --json docs/benchmarks/decode_vs_hf.json

Pick `--impls` / `--batches` / `--contexts` so that one call fits the device's per-command limit; rows are merged
into the JSON file, keyed by (impl, batch, context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from kvscope.analysis.roofline import decode_cost
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.io import write_json
from kvscope.model.config import ModelArgs
from kvscope.profiler.calibrate import load_ceilings, matvec_chain_ms
from kvscope.profiler.timing import event_ms, median_event_ms

IMPLS = ("hf-eager", "hf-static-compiled", "kvscope-eager", "kvscope-graphs")
CUDA = torch.device("cuda")


def reference_models(args: ModelArgs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' model of `args` (sdpa attention, bfloat16, random weights at the scale of our own init) and
    kvscope's model holding the same weights: the test suite's reference set-up (tests/helpers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import hf_model, hf_to, ours_from_hf

    hf = hf_to(hf_model(args, seed=0, device=CUDA, attn="sdpa", std=0.02, norm_jitter=0.0), torch.bfloat16)
    return hf, ours_from_hf(hf, args, CUDA, torch.bfloat16)


@torch.inference_mode()
def hf_eager_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    out = model(prompt, use_cache=True, logits_to_keep=1)  # (B, 1, V): no full-sequence logits
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(steps + 3):
        holder = {}

        def step(t: torch.Tensor = tok, p: object = past, h: dict = holder) -> None:
            h["out"] = model(t, past_key_values=p, use_cache=True)

        ms = event_ms(step)
        past, tok = holder["out"].past_key_values, holder["out"].logits[:, -1].argmax(-1, keepdim=True)
        if i >= 3:
            times.append(ms)
    return statistics.median(times)


@torch.inference_mode()
def hf_static_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    kw = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0, "eos_token_id": None,
          "attention_mask": torch.ones_like(prompt)}
    for n in (1, steps + 1):  # compile both lengths' paths outside the timing
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
    short = statistics.median(event_ms(lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw))
                              for _ in range(3))
    long = statistics.median(event_ms(lambda: model.generate(prompt, max_new_tokens=steps + 1,
                                                              min_new_tokens=steps + 1, **kw)) for _ in range(3))
    return (long - short) / steps


def kvscope_ms(engine: Engine, prompt: torch.Tensor, steps: int) -> float:
    lengths = [prompt.shape[1]] * prompt.shape[0]
    engine.prefill(prompt, lengths)
    return median_event_ms(engine.decode_step, reps=steps, warmup=3)


def _merge_json(path: Path, model: str, rows: list[dict]) -> None:
    """Rows into the JSON file, replacing earlier rows of the same (impl, batch, context); atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new_keys = {(n["impl"], n["batch"], n["context"]) for n in rows}
    keep = [r for r in old if (r["impl"], r["batch"], r["context"]) not in new_keys]
    write_json({"device": torch.cuda.get_device_name(), "date": datetime.now(UTC).date().isoformat(),
                "model": model, "torch": torch.__version__, "rows": keep + rows}, path, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--json", default="docs/benchmarks/decode_vs_hf.json")
    p.add_argument("--kernels", default="on", choices=["on", "off"], help="kvscope's CUDA kernels in its rows")
    ns = p.parse_args()
    args = ModelArgs.from_preset(ns.model)
    impls = ns.impls.split(",")
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"unknown impl(s): {bad}; choose from {IMPLS}")
    ceilings = load_ceilings(torch.cuda.get_device_name())
    hf, ours = reference_models(args)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {ns.model} bf16, "
          f"copy ceiling {ceilings.copy_gb_s if ceilings else 'not calibrated'} GB/s")
    print("| impl | batch | context | decode ms/step | tok/s | MBU | x matmul chain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in [int(b) for b in ns.batches.split(",")]:
        chain_ms = matvec_chain_ms(args, CUDA, batch=batch)[0]  # the step's matrix products alone, one graph
        torch.cuda.empty_cache()
        print(f"| matmul chain alone (one CUDA graph) | {batch} | - | {chain_ms:.3f} | | | 1.00 |")
        for ctx in [int(c) for c in ns.contexts.split(",")]:
            prompt = torch.randint(0, args.vocab_size, (batch, ctx), device=CUDA)
            for impl in impls:
                if impl == "hf-eager":
                    ms = hf_eager_ms(hf, prompt, ns.steps)
                elif impl == "hf-static-compiled":
                    ms = hf_static_ms(hf, prompt, ns.steps)
                else:
                    cfg = RunConfig(batch, ctx + ns.steps + 8, torch.bfloat16, CUDA)
                    options = EngineOptions(graphs=impl == "kvscope-graphs", kernels=ns.kernels == "on")
                    ms = kvscope_ms(Engine(ours, cfg, options=options), prompt, ns.steps)
                moved, _ = decode_cost(args, batch, ctx + ns.steps // 2, 2, 2)
                mbu = moved / (ms / 1e3) / 1e9 / ceilings.copy_gb_s if ceilings else None
                rows.append({"impl": impl, "batch": batch, "context": ctx, "decode_ms_per_step": ms,
                             "tok_s": batch / (ms / 1e3), "mbu": mbu, "matmul_chain_ms": chain_ms,
                             **({"kernels": ns.kernels == "on"} if impl.startswith("kvscope") else {})})
                print(f"| {impl} | {batch} | {ctx} | {ms:.3f} | {batch / (ms / 1e3):,.0f} | "
                      f"{'' if mbu is None else f'{mbu:.1%}'} | {ms / chain_ms:.2f} |", flush=True)
                _merge_json(Path(ns.json), ns.model, rows)  # after every row: a later timeout loses nothing
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
