"""Where a `--model` argument points, resolved without torch: a preset name, a Hugging Face checkpoint folder or a
`config.json` file becomes a `ModelSource` (the architecture from the preset or the config.json, whose duplicate keys
are refused; the dtype it names; for a checkpoint, its weight files listed and checked to lie inside the folder).
Loading the weights is `kvscope.model.weights`. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kvscope.errors import KvscopeError
from kvscope.model.config import PRESETS, RUN_DTYPE_BYTES, ModelArgs, show_value


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
        if isinstance(value, str) and value in RUN_DTYPE_BYTES:
            return value
        raise KvscopeError(f"{self.spec}: config.json names torch_dtype {show_value(value)}, not one of "
                           f"{', '.join(RUN_DTYPE_BYTES)}; pass --dtype")


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
            if not safetensors_files(path, required=False):
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


def safetensors_files(folder: Path, required: bool = True) -> list[Path]:
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
