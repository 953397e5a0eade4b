"""The regions one engine opens, as `(name, level, keys)` built once per engine from the names of
`kvscope.schema`, so the hot loop only looks them up.

Keys the instrument reads inside a CUDA-graph capture: `chain`: the region follows its sibling with no GPU work
between (inside a captured graph it reuses the sibling's end mark as its start, see Instrument); `stamped`: its first
GPU work is a kernel that takes the instrument's pending timestamp (`Instrument.take_stamp`), kvscope's RMSNorm kernel
here, so only with kernels on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvscope.schema import NAMED_LAYERS, OPS, PHASES, layer_name, op_name

EMBED, LM_HEAD, SAMPLE = NAMED_LAYERS
PREFILL, DECODE = PHASES


class RegionSpec(NamedTuple):
    """Arguments of `Instrument.region_with` (`ins.region_with(*spec)`)."""

    name: str
    level: str
    keys: dict[str, Any]


class EngineRegions:
    """Every layer-level and op-level region of an engine of `n_layers` layers."""

    def __init__(self, n_layers: int, stamped: bool) -> None:
        stamp: dict[str, Any] = {"stamped": True} if stamped else {}
        # L07: the layer, opened by its input norm (the RMSNorm kernel that writes the layer's start timestamp)
        self.layers = [RegionSpec(layer_name(i, n_layers), "layer", {"layer": i, "chain": True, **stamp})
                       for i in range(n_layers)]
        # L07.norm ... L07.mlp; `norm` (the input norm) starts with the layer's RMSNorm kernel too
        self.ops = [{op: RegionSpec(op_name(i, n_layers, op), "op",
                                    {"layer": i, "op": op, "chain": True, **(stamp if op == "norm" else {})})
                     for op in OPS}
                    for i in range(n_layers)]
        self.prefill_embed = RegionSpec(EMBED, "layer", {})
        self.decode_embed = RegionSpec(EMBED, "layer", {"chain": True})
        self.lm_head = RegionSpec(LM_HEAD, "layer", {"chain": True, **stamp})  # opens with the final RMSNorm
        self.sample = RegionSpec(SAMPLE, "layer", {"chain": True})
