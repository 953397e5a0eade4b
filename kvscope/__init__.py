"""kvscope: where the time of one LLM token goes, on NVIDIA GPUs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvscope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+src"

__all__ = ["__version__"]
