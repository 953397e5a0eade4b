"""The loops `--engine` chooses between, torch-free (the command line lists them without importing torch):
`kvscope` (the hand-written loop, `kvscope.engine.loop`), `transformers` (transformers' model and its forward over a
DynamicCache) and `transformers-compiled` (a StaticCache and the decode forward transformers' `generate` compiles);
the two transformers loops are `kvscope.engine.hf`."""

from __future__ import annotations

KVSCOPE_ENGINE = "kvscope"
HF_EAGER_ENGINE = "transformers"
HF_COMPILED_ENGINE = "transformers-compiled"
ENGINES = (KVSCOPE_ENGINE, HF_EAGER_ENGINE, HF_COMPILED_ENGINE)
