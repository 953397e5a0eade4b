"""Reading any program's Nsight Systems export and projecting its NVTX ranges onto GPU operations: `export` (the
SQLite or parquetdir export, `.nsys-rep` converted), `tables` and `checks` (its tables, and their sense), `projection`
(ranges onto kernels), `filters` (domain, name, time window, process), `range_summary` (per range name)."""
