"""The alignment pipeline on top of a projected export: `pipeline` (read, project, label, align, write: `kvscope
align`), `join` (projected ranges against a run's CUDA-event timings), `phase_map` (another engine's ranges labelled),
`kernel_classes`, `attribution` (a sweep point's GPU time by phase and class), `ranks` (one capture split per rank),
`trace_export` (a Kineto-shaped Chrome/Perfetto trace)."""
