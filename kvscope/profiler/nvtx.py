"""NVTX ranges of kvscope's regions: the `kvscope` domain, registered event attributes, push and pop.

Ranges are emitted only while NVTX is requested (`KVSCOPE_NVTX`, `--no-nvtx`) and a tool such as Nsight Systems is
attached; otherwise `nvtx_ranges()` gives None and the instrument makes no NVTX call at all. A range's category is
its phase (or its level outside a phase), so nsys separates prefill from decode; a step's payload is its number.
Attributes are registered once per (name, step, phase) and reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kvscope.schema import NVTX_DOMAIN

NVTX_ENV = "KVSCOPE_NVTX"
_ENV_OFF = ("0", "false", "off", "no")
_COLORS = {"run": 0x4C72B0, "rep": 0x8172B2, "prefill": 0xC44E52, "decode": 0x55A868, "layer": 0xCCB974,
           "op": 0x64B5CD}
_OTHER_COLOR = 0x999999
_REQUEST_COLOR = 0xDD8452  # a served request's range (`req <id>`)
_PHASE_COLORED = ("phase", "step")  # levels colored by their phase rather than by their level


def nvtx_enabled_by_env() -> bool:
    """`KVSCOPE_NVTX=0` (or `false`, `off`, `no`) switches NVTX ranges off."""
    return os.environ.get(NVTX_ENV, "1").strip().lower() not in _ENV_OFF


def open_domain() -> Any:
    """The `kvscope` NVTX domain, or None when no tool is attached (nvtx then hands out a do-nothing domain) or the
    nvtx package is not installed."""
    try:
        import nvtx
    except ImportError:
        return None
    domain = nvtx.get_domain(NVTX_DOMAIN)
    return None if type(domain).__name__ == "DummyDomain" else domain


class NvtxRanges:
    """Push/pop ranges in one NVTX domain, with each range's event attributes registered once."""

    __slots__ = ("_attrs", "_domain")

    def __init__(self, domain: Any) -> None:
        self._domain = domain
        self._attrs: dict[tuple[str, int | None, str | None], Any] = {}

    def push(self, name: str, level: str, phase: str | None, step: int | None) -> None:
        """Open a range named `name` of `level` inside `phase`, with `step` as its payload."""
        attrs = self._attrs.get((name, step, phase))
        if attrs is None:
            attrs = self._register(name, level, phase, step)
        self._domain.push_range(attrs)

    def pop(self) -> None:
        """Close the innermost range."""
        self._domain.pop_range()

    def _register(self, name: str, level: str, phase: str | None, step: int | None) -> Any:
        color = _COLORS.get(phase if level in _PHASE_COLORED else level, _OTHER_COLOR)
        attrs = self._domain.get_event_attributes(message=name, color=color, category=phase or level, payload=step)
        self._attrs[(name, step, phase)] = attrs
        return attrs


def nvtx_ranges(requested: bool) -> NvtxRanges | None:
    """Ranges in the `kvscope` domain when `requested` and a tool is attached; None otherwise."""
    domain = open_domain() if requested else None
    return None if domain is None else NvtxRanges(domain)


def start_end_ranges(requested: bool) -> Callable[[str], Callable[[], None]] | None:
    """Start/end ranges (not push/pop: they may overlap and end on another thread, as a server's requests do) in the
    `kvscope` domain: `start(message)` opens one and gives the function that ends it. None when NVTX is off (not
    requested, or no tool attached): the caller then makes no NVTX call at all."""
    domain = open_domain() if requested else None
    if domain is None:
        return None

    def start(message: str) -> Callable[[], None]:
        attrs = domain.get_event_attributes(message=message, color=_REQUEST_COLOR, category="request")
        range_id = domain.start_range(attrs)
        return lambda: domain.end_range(range_id)

    return start
