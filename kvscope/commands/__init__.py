"""The commands: one module per `kvscope` subcommand (`kv_math` for kv-math), whose `command(ns)` the CLI calls with
the parsed arguments, each a thin orchestration over the layers below; and what they share: `options` (flags to
RunSpec), `run_output` (the run folder), `memory` (out of memory), `sweep_file` and `sweep_out` (the sweep file and
its path), `summary_table` (the terminal table of a run)."""
