"""Per range name and process: how often it ran and what it projected onto the GPU, like nsys's
`nvtx_gpu_proj_sum` report, one row per (pid, domain, name, style).

Columns (ns, int64 unless said):
- `ranges`: every instance; `gpu_ranges`: the instances with at least one GPU operation (nsys's "Range Instances",
  which counts only those);
- `proj_total_ns`, `proj_mean_ns`, `proj_median_ns`, `proj_p90_ns`, `proj_min_ns`, `proj_max_ns`, `proj_std_ns`:
  the projected duration (first GPU start to last GPU end) of the instances with GPU work (nsys's "Total Proj
  Time", "Proj Avg/Med/Min/Max/StdDev"; the standard deviation with n - 1, 0 for one instance; p90 by linear
  interpolation); float64 statistics, NaN where no instance had GPU work;
- `range_total_ns`: the CPU duration of the instances with GPU work (nsys's "Total Range Time");
  `cpu_total_ns`: of every instance;
- `gpu_busy_ns`: summed busy time (the union of each instance's operations, summed over instances);
- `gpu_ops`: summed distinct correlation ids (nsys's "Total GPU Ops"); `gpu_ops_mean` per GPU instance;
- `level_mean`, `num_child_mean`: nsys's "Avg Range Lvl" and "Avg Num Child", over the GPU instances.

Ordered by `proj_total_ns` descending (rows without GPU work last), then by name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

P90 = 0.9
_GROUP = ["pid", "domain", "name", "style"]


def range_summary(ranges: pd.DataFrame) -> pd.DataFrame:
    """The summary of projected ranges (columns of projection.project's ranges)."""
    r = ranges[[*_GROUP, "start_ns", "end_ns", "gpu_start_ns", "gpu_end_ns", "gpu_busy_ns", "gpu_ops", "level",
                "num_child"]].copy()
    for col in ("domain", "name", "style"):
        r[col] = r[col].fillna("").astype(str)
    r["cpu_ns"] = r["end_ns"] - r["start_ns"]
    gpu = (r["gpu_ops"] > 0).to_numpy()
    r["proj_ns"] = (r["gpu_end_ns"] - r["gpu_start_ns"]).astype("Float64").astype(np.float64)
    g_all = r.groupby(_GROUP, sort=False)
    out = g_all.agg(ranges=("cpu_ns", "size"), cpu_total_ns=("cpu_ns", "sum"))
    g = r.loc[gpu].groupby(_GROUP, sort=False)
    proj = g["proj_ns"]
    stats = pd.DataFrame({
        "gpu_ranges": g.size(), "proj_total_ns": proj.sum(), "proj_mean_ns": proj.mean(),
        "proj_median_ns": proj.median(), "proj_p90_ns": proj.quantile(P90), "proj_min_ns": proj.min(),
        "proj_max_ns": proj.max(), "proj_std_ns": proj.std(ddof=1).fillna(0.0),
        "range_total_ns": g["cpu_ns"].sum(), "gpu_busy_ns": g["gpu_busy_ns"].sum(), "gpu_ops": g["gpu_ops"].sum(),
        "gpu_ops_mean": g["gpu_ops"].mean(), "level_mean": g["level"].mean(), "num_child_mean": g["num_child"].mean(),
    })
    out = out.join(stats, how="left")
    for col in ("gpu_ranges", "range_total_ns", "gpu_busy_ns", "gpu_ops"):
        out[col] = out[col].fillna(0).astype(np.int64)
    out["proj_total_ns"] = out["proj_total_ns"].fillna(0).astype(np.int64)
    out = out.reset_index()
    out["pid"] = out["pid"].astype(np.int64)
    order = np.lexsort((out["name"].to_numpy(), -out["proj_total_ns"].to_numpy()))
    return out.iloc[order].reset_index(drop=True)
