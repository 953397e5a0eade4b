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
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import PRESETS, ModelArgs, show_value
from kvscope.model.layers import Transformer

INIT_STD = 0.02  # standard deviation of random weights (the usual initializer_range of these families)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` argument."""

    kind: str  # "preset" | "checkpoint" | "config"
    spec: str
    args: ModelArgs
    folder: Path | None = None
    config_dtype: object = None  # config.json's `torch_dtype` (transformers 5: `dtype`) as written; None: not named

    @property
    def random_weights(self) -> bool:
        return self.kind != "checkpoint"

    def dtype_name(self) -> str:
        """The dtype the config.json names (float32, bfloat16 or float16); bfloat16 when it names none (presets).
        A value kvscope cannot size is refused rather than replaced by a default."""
        value = self.config_dtype
        if value is None:
            return "bfloat16"
        if isinstance(value, str) and value in _CONFIG_DTYPES:
            return value
        raise KvscopeError(f"{self.spec}: config.json names torch_dtype {show_value(value)}, not one of "
                           f"{', '.join(_CONFIG_DTYPES)}; pass --dtype")


_CONFIG_DTYPES = ("float32", "bfloat16", "float16")


def resolve_model(spec: str, need_weights: bool = True) -> ModelSource:
    """Turn `--model` (a preset name, a checkpoint folder or a config.json file) into a `ModelSource`.

    need_weights: the caller will load the folder's weights (run, generate, sweep): a folder without safetensors
    files is refused, and the shard list is checked. False: only the architecture is needed (kv-math): a folder that
    holds only its config.json resolves as a `config` source, and weight files are not looked at beyond their
    presence.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise KvscopeError(f"--model is empty ({spec!r}): give a preset name, a checkpoint folder or a config.json")
    if spec.lower() in PRESETS:
        return ModelSource("preset", spec, ModelArgs.from_preset(spec))
    try:
        path = Path(spec).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long for the file system; `~user` without a home
        raise KvscopeError(f"--model {show_value(spec)}: cannot be looked up: {one_line(str(exc), 200)}") from None
    if is_dir:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise KvscopeError(f"model folder {spec} has no config.json")
        config = _read_json(cfg_path)
        args = ModelArgs.from_hf_config(config, name=path.resolve().name)
        dtype = _declared_dtype(config)
        if need_weights:
            if not _safetensors_files(path, required=False):
                raise KvscopeError(f"model folder {spec} has no *.safetensors weights (pass its config.json for "
                                   "random weights)")
        elif not _has_weight_files(path):
            return ModelSource("config", spec, args, config_dtype=dtype)
        return ModelSource("checkpoint", spec, args, folder=path, config_dtype=dtype)
    if is_file:
        if path.suffix != ".json":
            raise KvscopeError(f"--model {spec}: expected a preset, a checkpoint folder or a config.json file")
        config = _read_json(path)
        return ModelSource("config", spec, ModelArgs.from_hf_config(config, name=path.stem),
                           config_dtype=_declared_dtype(config))
    if "/" in spec or spec.endswith(".json") or spec.startswith("."):
        raise KvscopeError(f"model folder or file not found: {spec}")
    raise KvscopeError(f"unknown preset {show_value(spec)}; presets: {', '.join(PRESETS)}")


def _declared_dtype(config: dict[str, Any]) -> object:
    """config.json's `torch_dtype` (transformers 4), else its `dtype` (transformers 5), as written; None: neither."""
    value = config.get("torch_dtype")
    return value if value is not None else config.get("dtype")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key written twice is refused (json would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise KvscopeError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError) as exc:
        raise KvscopeError(f"cannot read {path}: {one_line(str(exc), 200)}") from None
    except KvscopeError as exc:
        raise KvscopeError(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; an integer of > 4300 digits; deep nesting
        raise KvscopeError(f"{path} is not valid JSON: {one_line(str(exc), 200)}") from None
    if not isinstance(data, dict):
        raise KvscopeError(f"{path} does not hold a JSON object")
    return data


def one_line(text: str, limit: int = 400) -> str:
    """`text` on one line (its whitespace runs, newlines included, become one space), at most `limit` characters:
    a longer text is cut after its last full sentence that fits, or at a word, and marked with "..."."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = flat[:limit - 4]  # room for " ..."
    ends = [i + 1 for i, ch in enumerate(head) if ch in ".!?" and (i + 1 == len(head) or head[i + 1] == " ")]
    if ends and ends[-1] >= limit // 3:
        return head[:ends[-1]] + " ..."
    cut = head.rsplit(" ", 1)[0] if " " in head[limit // 3:] else head
    return cut + "..."


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
    """Copy Hugging Face-named tensors into the model's (fused) parameters; every parameter must be filled once, from
    a floating-point tensor whose values are finite in the model's dtype."""
    targets = _hf_targets(model)
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
            raise KvscopeError(f"{origin}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                               "floating-point weights")
        dst.copy_(tensor)
        if not _all_finite(dst):
            dtype = str(dst.dtype).removeprefix("torch.")
            why = ("holds NaN or infinite values" if not _all_finite(tensor)
                   else f"holds values beyond the range of {dtype} (finite in the file, as "
                        f"{str(tensor.dtype).removeprefix('torch.')})")
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


def _allowed_roots(folder: Path) -> list[Path]:
    """Folders a checkpoint's weight files may resolve into: the folder itself and, for a snapshot folder of the
    Hugging Face hub cache (`models--org--name/snapshots/<revision>/`), whose files are links to
    `models--org--name/blobs/`, that blobs folder."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _check_inside(path: Path, folder: Path, roots: list[Path], what: str) -> None:
    target = path.resolve()
    if not any(target.is_relative_to(r) for r in roots):
        raise KvscopeError(f"{folder}: {what} {path.name} resolves to {target}, outside the checkpoint folder")


def _has_weight_files(folder: Path) -> bool:
    """Whether the folder holds weights at all (an index or a *.safetensors file), without reading them."""
    return (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))


def _safetensors_files(folder: Path, required: bool = True) -> list[Path]:
    """The checkpoint's shard files: those its `model.safetensors.index.json` names, else every *.safetensors file.
    Every file must lie inside the folder (after links are followed; see `_allowed_roots`)."""
    roots = _allowed_roots(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KvscopeError(f"{index} has no weight_map")
        names: set[str] = set()
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name.strip():
                raise KvscopeError(f"{index}: weight_map entry {show_value(key)} is {show_value(name)}, not a file "
                                   "name")
            rel = PurePosixPath(name)
            if rel.is_absolute() or ".." in rel.parts:
                raise KvscopeError(f"{index}: weight_map entry {show_value(key)} points outside the checkpoint folder: "
                                   f"{show_value(name)}")
            names.add(name)
        files = [folder / name for name in sorted(names)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise KvscopeError(f"{folder}: shard(s) named in the index are missing: {', '.join(absent)}")
        for f in files:
            _check_inside(f, folder, roots, "shard")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files and required:
        raise KvscopeError(f"model folder {folder} has no *.safetensors weights")
    for f in files:
        _check_inside(f, folder, roots, "weights file")
    return files


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


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError

    _checkpoint_keys(files)  # every header read and every name unique before any tensor is loaded
    for path in files:
        with _open_shard(path) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                try:
                    tensor = f.get_tensor(key)
                except (OSError, SafetensorError, RuntimeError) as exc:  # RuntimeError: a dtype torch lacks
                    raise KvscopeError(f"{_shard_error(path, exc)} (tensor {show_value(key)})") from None
                yield key, tensor


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
