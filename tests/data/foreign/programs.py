"""Small GPU programs that kvscope did not write, profiled under nsys to make the foreign-export fixtures
(make_fixtures.sh beside this file). `python3 programs.py NAME`:

- `plain`: torch with `torch.cuda.nvtx` push/pop ranges (default domain) on the main thread and on a worker thread,
  a start/end range that spans threads, and ranges in a named domain through the `nvtx` package;
- `multiproc`: two processes (spawned), each with its own ranges and kernels;
- `nokernels`: NVTX ranges around host work only: an export with no GPU operation;
- `hf`: transformers' `generate` on a small random Qwen2 model, one NVTX range around each call.
"""

from __future__ import annotations

import sys
import threading


def _matmuls(tag: str, n: int) -> None:
    import torch
    import torch.cuda.nvtx as tnvtx

    x = torch.randn(512, 512, device="cuda")
    for i in range(n):
        tnvtx.range_push(f"{tag} iter {i}")
        y = torch.relu(x @ x)
        y.sum()
        tnvtx.range_pop()
    torch.cuda.synchronize()


def plain() -> None:
    import nvtx
    import torch
    import torch.cuda.nvtx as tnvtx

    torch.ones(1, device="cuda")  # context
    tnvtx.range_push("main")
    _matmuls("main", 3)
    handle = tnvtx.range_start("across threads")
    worker = threading.Thread(target=_matmuls, args=("worker", 2))
    worker.start()
    worker.join()
    tnvtx.range_end(handle)
    with nvtx.annotate("named op", domain="myengine", color="green"):
        torch.randn(1024, 1024, device="cuda").softmax(-1)
    tnvtx.range_pop()
    torch.cuda.synchronize()


def _child(rank: int) -> None:
    import torch

    torch.cuda.set_device(0)
    _matmuls(f"rank{rank}", 2 + rank)


def multiproc() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(r,)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def nokernels() -> None:
    import torch.cuda.nvtx as tnvtx

    for i in range(3):
        tnvtx.range_push(f"host step {i}")
        sum(k * k for k in range(20000))
        tnvtx.range_pop()


def hf() -> None:
    import torch
    import torch.cuda.nvtx as tnvtx
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up, outside a range
        for i in range(2):
            tnvtx.range_push(f"generate {i}")
            model.generate(ids, max_new_tokens=4, do_sample=False)
            tnvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    {"plain": plain, "multiproc": multiproc, "nokernels": nokernels, "hf": hf}[sys.argv[1]]()
