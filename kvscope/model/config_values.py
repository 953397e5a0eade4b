"""Checked reading of config.json values, torch-free (for `kvscope.model.config`): every value is checked for its
JSON type before use; a message names the key and shows the value as config.json spells it."""

from __future__ import annotations

import json
import math
from typing import Any

from kvscope.errors import KvscopeError

# Largest value of any integer field, and of any fused weight dimension (q + 2 kv rows, gate + up rows): torch and the
# CUDA kernels index a dimension with 32-bit integers, and no published decoder comes within orders of magnitude.
MAX_SIZE = 2**31 - 1
REQUIRED: Any = object()  # marks a config.json key without a default


def show_value(value: object, limit: int = 80) -> str:
    """A value as it reads in config.json (strings quoted, true/false/null, Infinity), cut to `limit` characters."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_int(value: object, what: str, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """`value` as an int in [minimum, maximum]: a Python/JSON int, or a finite float with no fraction (64.0);
    never a bool, a string, null or a fraction."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    if number is None:
        raise KvscopeError(f"{what} must be an integer, got {show_value(value)}")
    if not minimum <= number <= maximum:
        raise KvscopeError(f"{what} must be an integer in [{minimum}, {maximum}], got {show_value(value)}")
    return number


def check_positive(value: object, what: str, floor: float = 0.0) -> float:
    """`value` as a finite float > 0 and >= `floor` (an int or a float, never a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KvscopeError(f"{what} must be a number, got {show_value(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not (math.isfinite(number) and number > 0 and number >= floor):
        bound = f">= {floor:.3g} (float32's smallest normal number)" if floor > 0 else "> 0"
        raise KvscopeError(f"{what} must be a finite number {bound}, got {show_value(value)}")
    return number


def get_key(config: dict[str, Any], key: str, name: str, default: Any) -> Any:
    """config[key]; absent or null: `default`, or an error naming the key when it has none."""
    value = config.get(key)
    if value is not None:
        return value
    if default is REQUIRED:
        raise KvscopeError(f"{name}: config.json lacks required key {key!r}" if key not in config
                           else f"{name}: config.json key {key!r} is null, and it is required")
    return default


def int_key(config: dict[str, Any], key: str, name: str, default: Any = REQUIRED, prefix: str = "") -> int:
    if config.get(key) is None:
        return get_key(config, key, name, default)
    return check_int(config[key], f"{name}: {prefix}{key}")


def number_key(config: dict[str, Any], key: str, name: str, default: Any = REQUIRED, prefix: str = "",
               floor: float = 0.0) -> float:
    value = get_key(config, key, name, default)
    return check_positive(value, f"{name}: {prefix}{key}", floor)


def bool_key(config: dict[str, Any], key: str, name: str, default: bool) -> bool:
    value = get_key(config, key, name, default)
    if not isinstance(value, bool):
        raise KvscopeError(f"{name}: {key} must be true or false, got {show_value(value)}")
    return value


def str_list(config: dict[str, Any], key: str, name: str) -> list[str]:
    """A list-of-strings key; a single string counts as a list of one, absent or null as an empty list."""
    value = config.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KvscopeError(f"{name}: {key} must be a list of strings, got {show_value(value)}")
    return value
