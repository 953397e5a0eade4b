"""Hand-written CUDA kernels, each with a PyTorch reference: sources in `cuda/`, built ahead of time by the root
CMakeLists.txt or compiled with NVRTC, loaded and launched through CuPy (`loader.py`, `launch.py`).

One Python module per source, `cuda/<stem>.cu` called through `<stem>.py`: `rms_norm`, `silu_mul`, `rope_kv`,
`stamp`, `gemv` and `decode_attention` (whose call is `split_kv_decode`), and `common` for what they share (the
dtypes, the boundary checks). Every call checks devices, dtypes, shapes and strides at the boundary and raises
`ValueError` with the shapes; the `*_ref` functions compute the same result with torch operations (rounding through
the tensor dtype at the same places), on any device."""
