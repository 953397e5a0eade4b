#!/usr/bin/env bash
# Foreign-export fixtures: programs kvscope did not write (programs.py), profiled on a machine with a GPU and nsys
# (source .carry/device-env.sh first; it exports NSYS and puts the nvtx wheel on PYTHONPATH).
# Usage: tests/data/foreign/make_fixtures.sh OUT_DIR [NAME ...]   (names: plain multiproc nokernels hf)
# For each: NAME.sqlite, NAME.parquetdir/, and nsys's own nvtx_gpu_proj_trace and nvtx_gpu_proj_sum reports as CSV.
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
here=$(cd "$(dirname "$0")" && pwd)
nsys=${NSYS:-nsys}
for name in "${@:-plain multiproc nokernels hf}"; do
  for n in $name; do
    "$nsys" profile -t cuda,nvtx -s none --cpuctxsw=none -o "$out/$n" -f true python3 "$here/programs.py" "$n" \
      > "$out/$n.log" 2>&1 || echo "nsys profile $n: exit $?" >> "$out/$n.log"
    "$nsys" export --type sqlite -o "$out/$n.sqlite" -f true "$out/$n.nsys-rep" > /dev/null
    "$nsys" export --type parquetdir -o "$out/$n.parquetdir" -f true "$out/$n.nsys-rep" > /dev/null
    "$nsys" stats -r nvtx_gpu_proj_trace,nvtx_gpu_proj_sum --format csv -o "$out/$n" "$out/$n.sqlite" \
      >> "$out/$n.log" 2>&1 || true
  done
done
