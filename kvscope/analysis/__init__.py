"""The reading side: files only (Parquet, nsys exports, sweep files), never torch; works on any program's export.
Three rooms and the run maths: `nsys/` (reading exports, projecting ranges), `align/` (the alignment pipeline,
kernel classes, attribution, traces), `report/` (Markdown reports and plots); at the top `inputs` (run folders and
timings read and checked), `sweep_file` (the one reader of sweep files: report, capacity and `sweep --resume`),
`kv_math`, `roofline`, `capacity`, `summary`, `explain`."""
