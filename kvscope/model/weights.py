"""Where a model's weights come from: a local Hugging Face checkpoint folder, or seeded random values.

Modules are built on the meta device and materialised once on the target device in the target dtype, so no copy
of the model is ever made on the host or twice on the device. A checkpoint is read tensor by tensor, shard by shard
(safetensors memory-maps each shard), and each tensor is copied into its slice of our fused parameters. Nothing is
downloaded: a model source is a preset name, a folder, or a `config.json` file on disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs, show_value
from kvscope.model.dtypes import dtype_name
from kvscope.model.layers import Transformer
from kvscope.model.source import ModelSource, one_line, safetensors_files
from kvscope.model.tp import ShardPlan

INIT_STD = 0.02  # standard deviation of random weights (the usual initializer_range of these families)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)



def empty_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """The modules with uninitialised storage on `device` in `dtype` (built on meta, materialised once)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_random(model: Transformer, seed: int) -> None:
    """Seeded normal weights on the model's own device (norm weights 1, never zeros), in a fixed name order."""
    device = model.tok_embeddings.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # tied weights listed once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            _draw(param, gen)


def _draw(t: torch.Tensor, gen: torch.Generator) -> None:
    """One random weight tensor, in place."""
    t.normal_(0.0, INIT_STD, generator=gen)


@torch.no_grad()
def init_random_shard(model: Transformer, shard: ShardPlan, seed: int) -> None:
    """A tensor-parallel rank's modules (of `shard.local`) filled with its slices of the tp=1 random weights: every
    full parameter drawn in `init_random`'s order with the same generator, then sliced (`ShardPlan.param_slice`), so
    tp=N holds exactly the numbers of tp=1. One full tensor at a time is on the device."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    with torch.device("meta"):
        full_model = Transformer(shard.args)
    if shard.args.tie_word_embeddings:
        full_model.output.weight = full_model.tok_embeddings.weight
    local = dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, meta in sorted(full_model.named_parameters(), key=lambda kv: kv[0]):  # tied weights listed once
        if name.endswith("norm.weight"):
            local[name].fill_(1.0)
            continue
        full = torch.empty(meta.shape, dtype=dtype, device=device)
        _draw(full, gen)
        part = shard.param_slice(name, full)
        if part.shape != local[name].shape:
            raise ValueError(f"shard of {name}: {tuple(part.shape)} does not fit the rank's {tuple(local[name].shape)}")
        local[name].copy_(part)


def hf_targets(model: Transformer) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Hugging Face parameter name -> (our parameter, first row, end row) of the slice it fills."""
    a = model.args
    q, kv, ff = a.q_size, a.kv_size, a.intermediate_size
    t: dict[str, tuple[torch.Tensor, int, int]] = {}

    def whole(name: str, p: torch.Tensor) -> None:
        t[name] = (p, 0, p.shape[0])

    whole("model.embed_tokens.weight", model.tok_embeddings.weight)
    whole("model.norm.weight", model.norm.weight)
    if not a.tie_word_embeddings:
        whole("lm_head.weight", model.output.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        att, mlp = layer.attention, layer.feed_forward
        for kind in ("weight", "bias") if a.qkv_bias else ("weight",):
            fused = getattr(att.wqkv, kind)
            t[p + f"self_attn.q_proj.{kind}"] = (fused, 0, q)
            t[p + f"self_attn.k_proj.{kind}"] = (fused, q, q + kv)
            t[p + f"self_attn.v_proj.{kind}"] = (fused, q + kv, q + 2 * kv)
        whole(p + "self_attn.o_proj.weight", att.wo.weight)
        if a.o_bias:
            whole(p + "self_attn.o_proj.bias", att.wo.bias)
        t[p + "mlp.gate_proj.weight"] = (mlp.w13.weight, 0, ff)
        t[p + "mlp.up_proj.weight"] = (mlp.w13.weight, ff, 2 * ff)
        whole(p + "mlp.down_proj.weight", mlp.w2.weight)
        whole(p + "input_layernorm.weight", layer.attention_norm.weight)
        whole(p + "post_attention_layernorm.weight", layer.ffn_norm.weight)
    return t


@torch.no_grad()
def load_hf_tensors(model: Transformer, tensors: Iterable[tuple[str, torch.Tensor]], origin: str = "state dict"
                    ) -> None:
    """Copy Hugging Face-named tensors into the model's (fused) parameters; every parameter must be filled once, from
    a floating-point tensor whose values are finite in the model's dtype."""
    targets = hf_targets(model)
    seen: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.args.tie_word_embeddings):
            continue
        if name not in targets:
            raise KvscopeError(f"{origin}: unexpected tensor {name!r} for a {model.args.family} model")
        if name in seen:
            raise KvscopeError(f"{origin}: tensor {name!r} is given twice")
        param, lo, hi = targets[name]
        dst = param[lo:hi]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise KvscopeError(f"{origin}: {name} has shape {tuple(tensor.shape)}, config implies {tuple(dst.shape)}")
        if not tensor.is_floating_point():
            raise KvscopeError(f"{origin}: {name} has dtype {dtype_name(tensor.dtype)}, expected "
                               "floating-point weights")
        dst.copy_(tensor)
        if not _all_finite(dst):
            dtype = dtype_name(dst.dtype)
            why = ("holds NaN or infinite values" if not _all_finite(tensor)
                   else f"holds values beyond the range of {dtype} (finite in the file, as "
                        f"{dtype_name(tensor.dtype)})")
            raise KvscopeError(f"{origin}: tensor {name} {why}; refusing weights that make NaN logits")
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise KvscopeError(f"{origin}: missing tensors {', '.join(missing[:3])}{more}")


_FINITE_CHUNK = 1 << 26  # elements per isfinite pass: bounds the temporary boolean tensor to 64 MiB


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite: one `isfinite(...).all()` per 2**26 elements, on t's own device."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_FINITE_CHUNK))


def _shard_error(path: Path, exc: BaseException) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        return f"safetensors file {path} is empty"
    detail = one_line(str(exc) or type(exc).__name__, 200)
    return f"safetensors file {path} is truncated or corrupt ({size} bytes): {detail}"


def _open_shard(path: Path) -> Any:
    """safe_open(path), with an unreadable, empty, truncated or corrupt file refused in one line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (OSError, SafetensorError) as exc:
        raise KvscopeError(_shard_error(path, exc)) from None


def _checkpoint_keys(files: list[Path]) -> dict[str, Path]:
    """Every tensor name in the shards -> the shard that holds it, from the headers alone (nothing is loaded);
    a tensor present in two shards is refused, naming both."""
    owner: dict[str, Path] = {}
    for path in files:
        with _open_shard(path) as f:
            keys = list(f.keys())
        for key in keys:
            if key in owner:
                raise KvscopeError(f"tensor {show_value(key)} is in two shards: {owner[key]} and {path}")
            owner[key] = path
    return owner


def _iter_checkpoint(files: list[Path], shard: ShardPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the shards; with a tensor-parallel `shard`, only the rank's slice of each
    sharded tensor is read (`get_slice`)."""
    from safetensors import SafetensorError

    _checkpoint_keys(files)  # every header read and every name unique before any tensor is loaded
    for path in files:
        with _open_shard(path) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                try:
                    part = shard.checkpoint_slice(key) if shard is not None else None
                    if part is None:
                        tensor = f.get_tensor(key)
                    else:
                        dim, lo, hi = part
                        tensor = f.get_slice(key)[lo:hi] if dim == 0 else f.get_slice(key)[:, lo:hi]
                except (OSError, SafetensorError, RuntimeError) as exc:  # RuntimeError: a dtype torch lacks
                    raise KvscopeError(f"{_shard_error(path, exc)} (tensor {show_value(key)})") from None
                yield key, tensor


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0,
               shard: ShardPlan | None = None) -> tuple[Transformer, float]:
    """Build the model for `source` on `device` in `dtype`; returns it and the seconds it took (synchronised).
    `shard`: a tensor-parallel rank's part only (modules of `shard.local`, see kvscope.model.tp)."""
    t0 = time.perf_counter()
    model = empty_model(source.args if shard is None else shard.local, device, dtype)
    if source.folder is not None:
        load_hf_tensors(model, _iter_checkpoint(safetensors_files(source.folder), shard), origin=str(source.folder))
    elif shard is not None:
        init_random_shard(model, shard, seed)
    else:
        init_random(model, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # named sync: the ready time includes the device work
    return model, time.perf_counter() - t0
