"""The measuring layer, between the engine and the commands: what a measurement is, whoever asks for it (the
commands, the Python API, the benchmarks). `run` (model load, engine construction, warm-up, timed repetitions, the
host clock, the facts of a run), `output` (the run folder), `memory` (out of memory), `options` (command-line flags as
a `RunSpec`), `sweep` (the sweep loop) with `sweep_file` (the file resumed and appended to) and `sweep_out` (its path
and lock), `nsys` and `sweep_nsys` (runs under Nsight Systems), `tp_launch`, `tp_run`, `tp_generate` (tensor-parallel
ranks), `kv_math` (the numbers of `kvscope kv-math`)."""
