"""Compare kvscope's projection with `nsys stats -r nvtx_gpu_proj_trace --format csv` of the same export, range for
range: projected start and duration, CPU start and duration, GPU op count, level, parent, range stack.

    python3 benchmarks/check_projection.py report.sqlite report_nvtx_gpu_proj_trace.csv
"""

from __future__ import annotations

import sys

import pandas as pd

from kvscope.analysis.nsys.export import load_export
from kvscope.analysis.nsys.projection import project


def main() -> None:
    export, csv = sys.argv[1], sys.argv[2]
    ours = project(load_export(export)).ranges
    ours = ours[ours["gpu_ops"] > 0]
    ref = pd.read_csv(csv)
    m = ref.merge(ours, left_on="RangeId", right_on="range_id", how="outer", indicator=True)
    both = m[m["_merge"] == "both"]
    checks = {
        "name": (both["domain"] + ":" + both["name"]) == both["Name"],
        "projected start": both["gpu_start_ns"].astype("int64") == both["Projected Start (ns)"],
        "projected duration": (both["gpu_end_ns"] - both["gpu_start_ns"]).astype("int64")
        == both["Projected Duration (ns)"],
        "cpu start": both["start_ns"] == both["Orig Start (ns)"],
        "cpu duration": (both["end_ns"] - both["start_ns"]) == both["Orig Duration (ns)"],
        "gpu ops": both["gpu_ops"] == both["NumGPUOps"],
        "level": both["level"] == both["Lvl"],
        "parent": both["parent_id"].fillna(-1).astype("int64") == both["ParentId"].fillna(-1).astype("int64"),
        "range stack": both["range_stack"] == both["RangeStack"],
    }
    only = m["_merge"].value_counts()
    print(f"nsys ranges {len(ref)}, kvscope ranges with GPU ops {len(ours)}, matched {len(both)}, "
          f"only nsys {only.get('left_only', 0)}, only kvscope {only.get('right_only', 0)}")
    for name, ok in checks.items():
        print(f"  {name}: {int(ok.sum())}/{len(both)} equal")
    good = len(both) == len(ref) == len(ours) and all(bool(ok.all()) for ok in checks.values())
    print("MATCH" if good else "MISMATCH")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
