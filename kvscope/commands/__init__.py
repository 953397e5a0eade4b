"""The commands: one module per `kvscope` subcommand (`kv_math` for kv-math), whose `command(ns)` the CLI calls with
the parsed arguments: parse, call the layers below (`kvscope.measure` for anything that measures, `kvscope.analysis`
for anything that reads), print. Shared printing: `json_out` (`--json`), `summary_table` (a run's terminal table).
Nothing imports a command module but the CLI."""
