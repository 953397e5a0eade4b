"""`kvscope serve`: a served load over continuous batching (the load, the scheduler, its trace)."""
