"""The model layer: torch-free architecture numbers (`config`), the torch modules (`layers`), attention, weights
loading and the KV cache. Imports nothing of kvscope but `errors`; `config` imports no torch."""
