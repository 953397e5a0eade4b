"""kvscope: where the time of one LLM token goes, on NVIDIA GPUs.

The Python API (`kvscope.api`; docs/api.md): `run`, `load_run`, `load_export`, `project`, `align`, `kv_math`,
`serve`, `load_serve`, `diff`, the `Run` and `Serve` they return and `KvscopeError`, the one exception bad input
raises. They are imported on first use, so `import kvscope` stays light: it imports neither torch nor pandas, and only
`kvscope.run` and `kvscope.serve` ever import torch. Type checkers and editors read the names' types from
`__init__.pyi`. Nothing here imports `kvscope.api` itself (it ranks with this module in tests/test_import_rules.py):
`__getattr__` does, on first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("kvscope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+src"

# public name -> the module that defines it
_LAZY = {"run": "kvscope.api", "load_run": "kvscope.api", "load_export": "kvscope.api", "project": "kvscope.api",
         "align": "kvscope.api", "class_roofline": "kvscope.api", "kv_math": "kvscope.api", "Run": "kvscope.api",
         "KvscopeError": "kvscope.errors", "serve": "kvscope.api", "load_serve": "kvscope.api", "Serve": "kvscope.api",
         "diff": "kvscope.api"}

__all__ = ["KvscopeError", "Run", "Serve", "__version__", "align", "class_roofline", "diff", "kv_math", "load_export",
           "load_run", "load_serve", "project", "run", "serve"]


def __getattr__(name: str) -> Any:
    """The API's names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
