"""Where a model's weights come from: a local Hugging Face checkpoint folder, or seeded random values.

Modules are built on the meta device and materialised once on the target device in the target dtype, so no copy
of the model is ever made on the host or twice on the device. A checkpoint is read tensor by tensor, shard by shard
(safetensors memory-maps each shard), and each tensor is copied into its slice of our fused parameters. Nothing is
downloaded: a model source is a preset name, a folder, or a `config.json` file on disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvscope.errors import KvscopeError
from kvscope.profiler.model import PRESETS, ModelArgs, Transformer

INIT_STD = 0.02  # standard deviation of random weights (the usual initializer_range of these families)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` argument."""

    kind: str  # "preset" | "checkpoint" | "config"
    spec: str
    args: ModelArgs
    folder: Path | None = None

    @property
    def random_weights(self) -> bool:
        return self.kind != "checkpoint"


def resolve_model(spec: str) -> ModelSource:
    """Turn `--model` (a preset name, a checkpoint folder or a config.json file) into a `ModelSource`."""
    if spec.lower() in PRESETS:
        return ModelSource("preset", spec, ModelArgs.from_preset(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise KvscopeError(f"model folder {spec} has no config.json")
        args = ModelArgs.from_hf_config(_read_json(cfg_path), name=path.resolve().name)
        if not _safetensors_files(path, required=False):
            raise KvscopeError(f"model folder {spec} has no *.safetensors weights (pass its config.json for random "
                               "weights)")
        return ModelSource("checkpoint", spec, args, folder=path)
    if path.is_file():
        if path.suffix != ".json":
            raise KvscopeError(f"--model {spec}: expected a preset, a checkpoint folder or a config.json file")
        return ModelSource("config", spec, ModelArgs.from_hf_config(_read_json(path), name=path.stem))
    if "/" in spec or spec.endswith(".json") or spec.startswith("."):
        raise KvscopeError(f"model folder or file not found: {spec}")
    raise KvscopeError(f"unknown preset {spec!r}; presets: {', '.join(PRESETS)}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise KvscopeError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise KvscopeError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise KvscopeError(f"{path} does not hold a JSON object")
    return data


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
            param.normal_(0.0, INIT_STD, generator=gen)


def _hf_targets(model: Transformer) -> dict[str, tuple[torch.Tensor, int, int]]:
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
    """Copy Hugging Face-named tensors into the model's (fused) parameters; every parameter must be filled once."""
    targets = _hf_targets(model)
    seen: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.args.tie_word_embeddings):
            continue
        if name not in targets:
            raise KvscopeError(f"{origin}: unexpected tensor {name!r} for a {model.args.family} model")
        param, lo, hi = targets[name]
        dst = param[lo:hi]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise KvscopeError(f"{origin}: {name} has shape {tuple(tensor.shape)}, config implies {tuple(dst.shape)}")
        dst.copy_(tensor)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise KvscopeError(f"{origin}: missing tensors {', '.join(missing[:3])}{more}")


def _safetensors_files(folder: Path, required: bool = True) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KvscopeError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise KvscopeError(f"{folder}: shard(s) named in the index are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files and required:
        raise KvscopeError(f"model folder {folder} has no *.safetensors weights")
    return files


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, f.get_tensor(key)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, KvscopeError):
                raise
            raise KvscopeError(f"cannot read safetensors file {path}: {exc}") from None


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0
               ) -> tuple[Transformer, float]:
    """Build the model for `source` on `device` in `dtype`; returns it and the seconds it took (synchronised)."""
    t0 = time.perf_counter()
    model = empty_model(source.args, device, dtype)
    if source.folder is not None:
        load_hf_tensors(model, _iter_checkpoint(_safetensors_files(source.folder)), origin=str(source.folder))
    else:
        init_random(model, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # named sync: the ready time includes the device work
    return model, time.perf_counter() - t0
