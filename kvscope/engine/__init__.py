"""The engine layer: the hand-written prefill/decode loop over the model and its KV cache, CUDA-graph capture and
replay, and the run plan (batch, context, dtype, device). Imports model, kernels and profiler."""
