"""`kvscope diff A B`: two runs, captures or sweeps compared row by row, each row with a 95% interval and a verdict
that abstains when it cannot tell. `sources` (what each side is, read and checked), `rows` (the samples' table),
`run_rows`, `capture_rows`, `sweep_rows` (each kind's rows), `stats` (the intervals), `verdicts` (the table),
`waterfall` (where the step's time moved), `gate` (`--fail-if`), `compare` (the pipeline), `output` (diff.parquet,
diff.md)."""
