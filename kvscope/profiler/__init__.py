"""The hand-written decode loop: model architecture, weights, KV cache, engine and (later) instrumentation."""
