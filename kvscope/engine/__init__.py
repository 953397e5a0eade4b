"""The engine layer: the hand-written prefill/decode loop over the model and its KV cache (`loop`), built with frozen
`options` that pick its strategies once (`layer_ops`: norms and products; `rope_kv`; `decode_attn`), CUDA-graph
capture and replay, and the run plan (`plan.prepare`: a RunSpec checked and resolved into a RunPlan). Imports model,
kernels and profiler (and schema, errors, io), never analysis, measure or commands."""
