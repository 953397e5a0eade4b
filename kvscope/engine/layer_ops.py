"""The norms and products of a forward pass (embedding, each decoder layer's maths around its attention, the
lm_head): one strategy per phase, chosen from what the engine was built with, never re-decided inside a layer.

- `TorchOps` (`--kernels off`): torch's RMSNorm, cuBLAS products (the residual add as the product's beta=1,
  `linear_residual_`), torch's SiLU and multiply.
- `KernelOps` (`--kernels on`): kvscope's RMSNorm kernel (it also writes the instrument's pending timestamp,
  `Instrument.take_stamp`) and SiLU*up kernel; cuBLAS products.
- `GemvOps` (kernels and gemv on, at most GEMV_NORM_MAX_ROWS rows): every product through kvscope's gemv kernels:
  qkv (+bias) and gate/up (+SiLU*up) with the RMSNorm before them inside (one launch, the kernel writes the
  timestamp; the `norm` region stays empty), o_proj and down with the residual add in their epilogue, lm_head with
  the final norm inside.
- `GemvNormFirstOps` (more rows, up to `EngineOptions.gemv_max_rows`): the same products, the RMSNorm kernel first
  (each warp of a fused product normalises the x vectors it reads, work that grows with the rows;
  benchmarks/kernels.py measures both ways).
- `TensorParallelOps` wraps `TorchOps` or `KernelOps` (`kvscope.engine.tp`): the embedding summed over the ranks,
  o_proj and down as this rank's row-parallel part, each followed by its all-reduce in its own region
  (`L07.allreduce_attn`, `L07.allreduce_mlp`), the logits gathered over the vocabulary.

`choose_ops` builds the candidates once, at construction, into an `OpsChoice`; `OpsChoice.pick(rows)` returns one
of them for a forward of `rows` rows, a host int: B in a decode step (fixed by the batch: the engine picks it once)
and in any lm_head, B*S in a prefill (picked once per prefill, before its first layer). No choice reads device data,
so a decode step stays capturable in a CUDA graph. Whether the gemv kernels take the model's products (device, dtype,
shapes, alignment of the weights) is checked once, in `choose_ops`; the x the engine hands them are its own fresh
row-major tensors. What a layer runs differently (a model family's q/k norms, a new fused kernel) is a new strategy,
a subclass picked in `choose_ops`, not a branch in the engine's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvscope.engine.options import EngineOptions
from kvscope.engine.regions import EngineRegions
from kvscope.engine.tp import TensorParallel
from kvscope.kernels import gemv as k_gemv
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.layers import Transformer, linear_residual_
from kvscope.profiler.instrument import Instrument

# rows up to which the gemv kernels normalise their input themselves (RMSNorm fused into the product): each warp
# normalises the x vectors it reads, work that grows with the rows (benchmarks/kernels.py measures both ways)
GEMV_NORM_MAX_ROWS = 4


class LayerOps:
    """One strategy: the maths of a forward pass around attention, for the engine's model and instrument.

    `_layer` calls, in this order, inside the layer's regions: `input_norm` (region `norm`), `qkv` (`qkv`), the
    attention, `o_proj_` (`o_proj`), `join_attention`, `mlp_` (`mlp`), `join_mlp`. `o_proj_` and `mlp_` add into the
    residual stream through `residual_`; the `join_*` steps are empty on one device."""

    def __init__(self, model: Transformer, ins: Instrument) -> None:
        self.model, self.ins, self.layers = model, ins, model.layers
        a = model.args
        self.heads, self.head_dim = a.n_heads + 2 * a.n_kv_heads, a.head_dim  # of the fused projection

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> h (B, S, dim)."""
        raise NotImplementedError

    def input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        """Layer i's input RMSNorm of h (B, S, dim) -> (B, S, dim); None where the qkv product normalises h."""
        raise NotImplementedError

    def qkv(self, i: int, h: torch.Tensor, h2: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The fused q/k/v product of x (from `input_norm`), or of h (B, S, dim) and its rows h2 (B*S, dim) where
        the product normalises them itself -> (B, S, H+2H_kv, D)."""
        raise NotImplementedError

    def activation(self, i: int, h2: torch.Tensor) -> torch.Tensor:
        """Layer i's post-attention norm, gate/up product and SiLU*up of h2 (N, dim) -> (N, F)."""
        raise NotImplementedError

    def residual_(self, h2: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
        """h2 += linear(x), h2 (N, dim) in place."""
        raise NotImplementedError

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """The final norm and the lm_head of h_last (B, dim) -> logits (B, V)."""
        raise NotImplementedError

    def o_proj_(self, i: int, h2: torch.Tensor, y: torch.Tensor) -> None:
        """h2 (N, dim) += the attention output projection of y (N, H*D)."""
        self.residual_(h2, y, self.layers[i].attention.wo)

    def join_attention(self, i: int, h2: torch.Tensor) -> None:
        """After `o_proj_`: nothing on one device."""

    def mlp_(self, i: int, h2: torch.Tensor) -> None:
        """h2 (N, dim) += the MLP of its post-attention norm."""
        self.residual_(h2, self.activation(i, h2), self.layers[i].feed_forward.w2)

    def join_mlp(self, i: int, h2: torch.Tensor) -> None:
        """After `mlp_`: nothing on one device."""


class TorchOps(LayerOps):
    """Torch operations and cuBLAS products."""

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return norm(x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)  # (B, S, dim)

    def input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self.norm(self.layers[i].attention_norm, h)  # (B, S, dim)

    def qkv(self, i: int, h: torch.Tensor, h2: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        return self.layers[i].attention.qkv(x)  # (B, S, H+2H_kv, D)

    def activation(self, i: int, h2: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return layer.feed_forward.hidden_act(self.norm(layer.ffn_norm, h2))  # (N, F)

    def residual_(self, h2: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
        linear_residual_(h2, x, linear)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.model.output(self.norm(self.model.norm, h_last))  # (B, V), with tp (B, V/tp)


class KernelOps(TorchOps):
    """kvscope's RMSNorm (writing the pending timestamp) and SiLU*up kernels; cuBLAS products."""

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return k_rms_norm.rms_norm(x, norm.weight, norm.eps, stamp=self.ins.take_stamp())

    def activation(self, i: int, h2: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return layer.feed_forward.hidden_act(self.norm(layer.ffn_norm, h2), k_silu_mul.silu_mul)  # (N, F)


class GemvOps(KernelOps):
    """Every product through kvscope's gemv kernels, the RMSNorm before qkv, gate/up and lm_head fused into them."""

    def __init__(self, model: Transformer, ins: Instrument, launch: dict[str, Any]) -> None:
        super().__init__(model, ins)
        self.launch = launch  # the launch choice every gemv call gets (EngineOptions.gemv_launch)

    def normed(self, x2: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        """The x and the keyword arguments of a product that reads norm(x2): x2 itself and the norm's weight, eps
        and the pending timestamp (the kernel normalises and writes the timestamp)."""
        return x2, {"norm_weight": norm.weight, "eps": norm.eps, "stamp": self.ins.take_stamp()}

    def input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return None  # the qkv product normalises h itself

    def qkv(self, i: int, h: torch.Tensor, h2: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        layer, wqkv = self.layers[i], self.layers[i].attention.wqkv
        x2, norm = self.normed(h2, layer.attention_norm)  # (B*S, dim)
        y = k_gemv.gemv(x2, wqkv.weight, bias=wqkv.bias, **norm, **self.launch)  # (B*S, (H+2H_kv)*D)
        return y.view(h.shape[0], h.shape[1], self.heads, self.head_dim)  # (B, S, H+2H_kv, D)

    def activation(self, i: int, h2: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        x2, norm = self.normed(h2, layer.ffn_norm)
        return k_gemv.gemv_silu_mul(x2, layer.feed_forward.w13.weight, **norm, **self.launch)  # (N, F)

    def residual_(self, h2: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
        k_gemv.gemv_residual_(h2, x, linear.weight, linear.bias, **self.launch)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        out = self.model.output
        x2, norm = self.normed(h_last, self.model.norm)
        return k_gemv.gemv(x2, out.weight, bias=out.bias, **norm, **self.launch)  # (B, V)


class GemvNormFirstOps(GemvOps):
    """The gemv products of `GemvOps`, each norm run first by the RMSNorm kernel (it writes the timestamp)."""

    def normed(self, x2: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.norm(norm, x2), {}


class TensorParallelOps(LayerOps):
    """One rank of tensor parallelism around `inner` (TorchOps or KernelOps): its norms, qkv and activation; the
    embedding, the row-parallel products, their all-reduces and the logits' gather through `tp`."""

    def __init__(self, inner: TorchOps, tp: TensorParallel) -> None:
        super().__init__(inner.model, inner.ins)
        self.inner, self.tp = inner, tp

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tp.embed(self.model.tok_embeddings, tokens)  # (B, S, dim), this rank's rows summed over ranks

    def input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self.inner.input_norm(i, h)

    def qkv(self, i: int, h: torch.Tensor, h2: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        return self.inner.qkv(i, h, h2, x)

    def activation(self, i: int, h2: torch.Tensor) -> torch.Tensor:
        return self.inner.activation(i, h2)

    def residual_(self, h2: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
        self.tp.partial_residual_(h2, x, linear)  # this rank's part; the all-reduce follows (join_*)

    def join_attention(self, i: int, h2: torch.Tensor) -> None:
        with self.ins.region_with(*self.tp.regions[i]["allreduce_attn"]):
            self.tp.all_reduce_(h2)

    def join_mlp(self, i: int, h2: torch.Tensor) -> None:
        with self.ins.region_with(*self.tp.regions[i]["allreduce_mlp"]):
            self.tp.all_reduce_(h2)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_logits(self.inner.logits(h_last))  # (B, V/tp) on each rank -> (B, V)


@dataclass(frozen=True)
class OpsChoice:
    """The strategies one engine may run, built once; `pick(rows)` says which runs a forward of `rows` rows."""

    base: LayerOps  # TorchOps, KernelOps or TensorParallelOps: above `gemv_max_rows` or without gemv
    gemv: GemvOps | None = None  # fused norms, up to GEMV_NORM_MAX_ROWS rows (and `gemv_max_rows`)
    gemv_norm_first: GemvNormFirstOps | None = None  # norms first, above GEMV_NORM_MAX_ROWS
    gemv_max_rows: int = 0

    def pick(self, rows: int) -> LayerOps:
        """The strategy for `rows` rows (a host int: B*S in a prefill, B in a decode step and any lm_head)."""
        if self.gemv is None or self.gemv_norm_first is None or rows > self.gemv_max_rows:
            return self.base
        return self.gemv if rows <= GEMV_NORM_MAX_ROWS else self.gemv_norm_first


def gemv_takes(model: Transformer) -> bool:
    """Whether the gemv kernels take every product of `model` (device, dtype, shapes, weights contiguous and
    aligned), for an x of one fresh row-major row; checked once per engine, no launch, no sync."""
    out = model.output.weight
    products = [out] + [w for layer in model.layers for w in (
        layer.attention.wqkv.weight, layer.attention.wo.weight, layer.feed_forward.w13.weight,
        layer.feed_forward.w2.weight)]
    xs = {k: torch.empty(1, k, dtype=out.dtype, device=out.device) for k in {w.shape[1] for w in products}}  # (1, K)
    return all(k_gemv.gemv_fits(xs[w.shape[1]], w) for w in products)


def choose_ops(model: Transformer, ins: Instrument, options: EngineOptions, tp: TensorParallel | None = None
               ) -> OpsChoice:
    """The strategies of an engine built with `options` (its kernels already checked against the device): torch
    or kernel operations; with tp, those wrapped by TensorParallelOps; with gemv wanted and taken by the model's
    products, the two gemv strategies up to `options.gemv_max_rows` rows."""
    base = (KernelOps if options.kernels else TorchOps)(model, ins)
    if tp is not None:
        options.gemv_wanted(tensor_parallel=True)  # raises for gemv=True
        return OpsChoice(TensorParallelOps(base, tp))
    if not options.gemv_wanted(tensor_parallel=False) or not gemv_takes(model):
        return OpsChoice(base)
    launch = options.gemv_launch.kwargs()
    return OpsChoice(base, GemvOps(model, ins, launch), GemvNormFirstOps(model, ins, launch), options.gemv_max_rows)


def run_layer(ins: Instrument, regions: EngineRegions, i: int, h: torch.Tensor,
              attend: Callable[[int, torch.Tensor], torch.Tensor], ops: LayerOps) -> None:
    """One decoder layer, updating h (B, S, dim) in place, its norms and products run by `ops` (picked for B*S
    rows); `attend(i, qkv)` takes the fused projection (B, S, H + 2*H_kv, D), applies RoPE, writes the cache and
    returns the attention output (B*S, H*D). Every engine's layer is this maths between its regions."""
    region, r = ins.region_with, regions.ops[i]
    b, s, dim = h.shape
    h2 = h.view(b * s, dim)  # (B*S, dim), the residual stream, updated in place
    with region(*regions.layers[i]):
        with region(*r["norm"]):  # empty where the qkv product normalises h itself (gemv)
            x = ops.input_norm(i, h)  # (B, S, dim) or None
        with region(*r["qkv"]):
            qkv = ops.qkv(i, h, h2, x)  # (B, S, H+2H_kv, D)
        y = attend(i, qkv)  # (B*S, H*D)
        with region(*r["o_proj"]):
            ops.o_proj_(i, h2, y)  # with tp: this rank's row-parallel part
        ops.join_attention(i, h2)  # with tp: the all-reduce, in its own region
        with region(*r["mlp"]):
            ops.mlp_(i, h2)  # post-attention norm, gate/up, SiLU*up, down and the residual add
        ops.join_mlp(i, h2)
