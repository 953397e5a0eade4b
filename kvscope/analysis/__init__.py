"""Analysis of kvscope runs and Nsight Systems exports (parsing apart from analysis, one analysis per module)."""
