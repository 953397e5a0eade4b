"""`kvscope generate --tp N`: greedy generation with the model split over N ranks (kvscope.measure.tp_launch); the
same tokens as without `--tp`. `rank_generate` is also what the tensor-parallel tests run in every rank."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunPlan
from kvscope.engine.tp import TensorParallel
from kvscope.measure.tp_launch import RankContext, check_plan, run_ranks
from kvscope.model.tp import ShardPlan
from kvscope.model.weights import load_model


@dataclass(frozen=True)
class Generated:
    """What rank 0 hands back: the tokens (one list per prompt) and, when asked, the full logits (B, V) of the
    prefill and of every decode step, on the CPU."""

    tokens: list[list[int]]
    logits: list[torch.Tensor]
    ready_s: float


def generate_tp(plan: RunPlan, prompts: list[list[int]], max_new_tokens: int, tp: int,
                keep_logits: bool = False) -> Generated | None:
    """Greedy generation over `tp` ranks; checks the split and the devices before any rank starts. None in a
    torchrun rank other than 0."""
    check_plan(plan, tp)
    ranked = run_ranks(tp, plan.cfg.device, rank_generate, plan, prompts, max_new_tokens, keep_logits)
    return ranked.value if ranked.rank == 0 else None


def rank_generate(ctx: RankContext, plan: RunPlan, prompts: list[list[int]], max_new_tokens: int,
                  keep_logits: bool) -> Generated:
    """One rank's part of the generation (every rank computes the same tokens and full logits)."""
    shard = ShardPlan(plan.source.args, ctx.tp, ctx.rank)
    cfg = replace(plan.cfg, device=ctx.device)
    model, ready_s = load_model(plan.source, ctx.device, cfg.dtype, seed=plan.spec.seed, shard=shard)
    engine = Engine(model, cfg, options=EngineOptions(graphs=plan.graphs, kernels=plan.kernels),
                    tp=TensorParallel(shard, ctx.group))
    if not keep_logits:
        return Generated(engine.generate(prompts, max_new_tokens), [], ready_s)
    tokens, lengths = pad_prompts(prompts, engine.vocab_size, ctx.device)
    out = [engine.prefill(tokens, lengths).clone()]
    logits = [engine.logits.float().cpu()]
    for _ in range(max_new_tokens - 1):
        out.append(engine.decode_step().clone())
        logits.append(engine.logits.float().cpu())
    return Generated(torch.stack(out, dim=1).tolist(), logits, ready_s)
