"""The engine layer: the hand-written prefill/decode loop over the model and its KV cache, CUDA-graph capture and
replay, and the run plan (`plan.prepare`: a RunSpec checked and resolved into a RunPlan). Imports model, kernels,
analysis and profiler, never commands."""
