#!/bin/bash
# What `benchmarks/serve_gpu_calls.sh D` (or B / C) brought back, unpacked and analysed here, on any machine (no GPU,
# no torch needed by the analysis):
#
#   bash benchmarks/serve_gpu_post.sh FILES_AT DEST
#
# FILES_AT: the folder the device's files landed in; DEST: where they go (e.g. docs/serving/<device>_<date>/). Then:
# - kvscope's loop against transformers' under Nsight (issue 25): `kvscope diff` of the two capture folders, with the
#   waterfall of the decode step by kernel class, GPU idle and overlap, and the share the parts leave unaccounted
#   (diff.md, diff.parquet, the JSON line in diff_kvscope_vs_transformers.json);
# - the served loads (issue 23): `kvscope report` of the Nsight-captured load and of the long points, and one line
#   per point with Little's law's ratios (whole run and steady window);
# - the HTTP front against the load in process (issue 24): the benchmark's table, from its JSON.
set -u
F=${1:?usage: serve_gpu_post.sh FILES_AT DEST}
D=${2:?usage: serve_gpu_post.sh FILES_AT DEST}
mkdir -p "$D"
for t in "$F"/*.tgz; do [ -e "$t" ] && tar xzf "$t" -C "$D"; done
for f in "$F"/*.json "$F"/*.txt; do [ -e "$f" ] && cp "$f" "$D/"; done
if [ -d "$D/cmp_kvscope" ] && [ -d "$D/cmp_transformers" ]; then
  python3 -m kvscope diff "$D/cmp_kvscope" "$D/cmp_transformers" --out "$D/diff_kvscope_vs_transformers" --json \
    > "$D/diff_kvscope_vs_transformers.log" 2>&1
  echo "diff kvscope vs transformers: rc $? ($D/diff_kvscope_vs_transformers/diff.md)"
  grep "^waterfall (" "$D/diff_kvscope_vs_transformers.log"
fi
for s in nsys_serve serve_long; do
  [ -d "$D/$s" ] && python3 -m kvscope report "$D/$s" > "$D/$s-report.log" 2>&1 && echo "report: $D/$s-report"
done
python3 - "$D" <<'PY'
import sys
from pathlib import Path

import pandas as pd

for summary in sorted(Path(sys.argv[1]).glob("*/**/summary.parquet")):
    row = pd.read_parquet(summary).iloc[0]
    if "little_ratio" not in row.index:
        continue
    print(f"{summary.parent}: offered {row.get('offered_rps', float('nan')):.2f} rps, little_ratio "
          f"{row['little_ratio']:.3f}, little_steady_ratio {row['little_steady_ratio']:.3f} over "
          f"{row['little_steady_s']:.1f} s")
PY
exit 0
