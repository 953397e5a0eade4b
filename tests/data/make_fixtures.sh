#!/usr/bin/env bash
# Makes the Nsight Systems fixtures of tests/data on a machine with a GPU and nsys (the lent H100: source
# .carry/device-env.sh first, which exports NSYS). Usage: tests/data/make_fixtures.sh OUT_DIR [MODEL ...]
# For each model: a `kvscope run` (layer granularity, 2 reps) under nsys, its run folder, the report exported as
# SQLite and as a Parquet directory, and nsys's own nvtx_gpu_proj_trace report as CSV (the projection reference).
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
root=$(cd "$(dirname "$0")/../.." && pwd)
nsys=${NSYS:-nsys}
for model in "${@:-tiny}"; do
  name=${model//./}
  (cd "$root" && "$nsys" profile -t cuda,nvtx -s none --cpuctxsw=none --capture-range=cudaProfilerApi \
      --capture-range-end=stop -o "$out/$name" -f true \
      python3 -m kvscope run --model "$model" --seq 32 --gen-tokens 4 --reps 2 --warmup 1 --granularity layer \
      --out "$out/$name-run") > "$out/$name.log" 2>&1
  "$nsys" export --type sqlite -o "$out/$name.sqlite" -f true "$out/$name.nsys-rep" > /dev/null
  "$nsys" export --type parquetdir -o "$out/$name.parquetdir" -f true "$out/$name.nsys-rep" > /dev/null
  "$nsys" stats -r nvtx_gpu_proj_trace --format csv -o "$out/$name" "$out/$name.sqlite" > /dev/null
done
