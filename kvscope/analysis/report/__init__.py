"""`kvscope report`: `build` (read, build in memory, write whole), `run` (a run folder's sections), `sweep` (a sweep
file's sections and plots), `markdown` (tables, percentages, the report being built)."""
