"""The instruments: regions with CUDA events (or the host clock) and NVTX ranges, marks inside CUDA graphs, NVML
sampled from a child process, timing helpers and the calibration of a GPU's ceilings."""
