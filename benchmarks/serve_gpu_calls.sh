#!/bin/bash
# The served load's GPU measurements (issue 23), in two device calls of under 600 s each, run from the repository
# root on the lent machine with `.carry` carried (`../shared/gpu/prepare-carry.sh` fills it):
#
#   git show 373b617^:kvscope/kernels/cuda/decode_attention.cu > .carry/decode_attention_before_paged.cu  # here
#   source .carry/device-env.sh; bash benchmarks/serve_gpu_calls.sh A     # device call 1
#   source .carry/device-env.sh; bash benchmarks/serve_gpu_calls.sh B     # device call 2
#   source .carry/device-env.sh; bash benchmarks/serve_gpu_calls.sh K     # device call 3 (kernels, instruments)
#
# A: the GPU tests of the served engine (tokens against each request alone, bf16), the
#    paged decode-only iteration against the static decode step (benchmarks/serve_decode_vs_static.py), a sweep over
#    arrival rates for both policies, the static batch sweep and `kvscope capacity`'s plan, the report with the
#    planner beside the measured rate (made afterwards: copy plan.csv into the sweep folder, `kvscope report`).
# B: a served load under Nsight Systems (`kvscope nsys -- serve`: kernels per iteration, the interference and the
#    per-request GPU cost from them), the HTTP front against the same load in process (issue 24,
#    benchmarks/serve_http_vs_inprocess.py: carry the wheels its docstring lists).
# C: kvscope's loop, transformers' loop and its compiled loop on one shape under Nsight Systems (issue 25: `kvscope
#    diff` of the folders afterwards), and minute-long points of the served load for Little's law (issue 23).
# D: the needed parts of B and C in one call (device time short), logs packed.
# K: what needs no served engine: the paged kernel against the contiguous one and against the kernel source before
#    the change (benchmarks/paged_decode.py), the instruments' cost with prefill graphs on (issue 25,
#    benchmarks/instrument_overhead.py), the existing decode-attention and the paged kernels' GPU tests.
# The reports are made afterwards on any machine: `kvscope report` on the fetched folders.
# Everything lands under $OUT; each step's exit status and elapsed time in $OUT/summary.txt.
# Environment: RATES (default 8,24,40,56 requests/s), DUR (seconds of arrivals per point, default 6), TTFT / TPOT
# (the SLOs in ms, default 300 / 40).
set -u
cd "$(dirname "$0")/.."
S=$OUT/summary.txt
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
DEADLINE=${DEADLINE:-570}  # seconds from the start: a step gets what is left of it, at most its own limit
step() {  # step NAME TIMEOUT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( DEADLINE - ($(date +%s) - t0) ))
  LAST_RC=124
  if [ "$left" -lt 20 ]; then echo "$(el) $name skipped (no time left)" | tee -a "$S"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  LAST_RC=$?
  echo "$(el) $name rc $LAST_RC" | tee -a "$S"
  tail -8 "$OUT/$log"
}
pack() {  # pack NAME: $OUT/NAME (a folder of many files) as $OUT/NAME.tgz, traces left out (the device returns
          # a limited count of files)
  [ -d "$OUT/$1" ] || return 0
  tar czf "$OUT/$1.tgz" --exclude=trace.json -C "$OUT" "$1"
  if [ "$(stat -c %s "$OUT/$1.tgz")" -gt 15000000 ]; then  # over what comes back (16 MiB a file): the kernel rows out
    echo "$1.tgz: $(stat -c %s "$OUT/$1.tgz") bytes, packed again without kernels.parquet" | tee -a "$S"
    tar czf "$OUT/$1.tgz" --exclude=trace.json --exclude=kernels.parquet -C "$OUT" "$1"
  fi
  rm -rf "${OUT:?}/$1"
}
TTFT=${TTFT:-300}
TPOT=${TPOT:-40}
# the steps B, C and D share, each with its time limit in seconds; the folders they write are packed (pack), the
# Nsight exports left out (the align tables beside them hold what the analysis reads)
drop_exports() { rm -f "$OUT/$1"/*.nsys-rep "$OUT/$1"/*.sqlite "$OUT/$1"/*.qdstrm; }
capture_run() {  # capture_run ENGINE LIMIT: one shape of `kvscope run` under Nsight Systems (issue 25's diff)
  step "nsys run $1" "$2" "nsys_$1.log" python3 -m kvscope nsys --out "$OUT/cmp_$1" -- run \
    --model qwen2.5-3b --batch-size 1 --seq 512 --gen-tokens 32 --warmup 2 --reps 6 --engine "$1"
  drop_exports "cmp_$1"
  pack "cmp_$1"
}
http_front() {  # http_front LIMIT: the HTTP front against the same load in process (issue 24)
  step "http vs in-process" "$1" http.log python3 benchmarks/serve_http_vs_inprocess.py --requests 120 --rps 8 \
    --rounds 1 --out "$OUT/http" --json "$OUT/serve_http_vs_inprocess.json"
  pack http
}
nsys_serve() {  # nsys_serve LIMIT: a served load under Nsight Systems (issue 23)
  step "nsys serve" "$1" nsys_serve.log python3 -m kvscope nsys --out "$OUT/nsys_serve" -- serve \
    --model qwen2.5-3b --rps 24 --requests 150 --prompt-len 512 --output-len 128 --max-seqs 64 --policy chunked \
    --slo-ttft-ms "$TTFT" --slo-tpot-ms "$TPOT" --no-progress
  drop_exports nsys_serve
  pack nsys_serve
}
serve_long() {  # serve_long LIMIT DURATION_S: long points of the served load for Little's law (issue 23)
  step "serve long" "$1" serve_long.log python3 -m kvscope serve --model qwen2.5-3b --rps "${LONG_RATES:-8,24}" \
    --policy chunked --duration "$2" --prompt-len 512 --output-len 128 --max-seqs 64 \
    --slo-ttft-ms "$TTFT" --slo-tpot-ms "$TPOT" --out "$OUT/serve_long" --no-progress
  pack serve_long
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
case "${1:-A}" in
A)
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  step "served engine tests" 150 served_gpu.log python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/engine/test_served_gpu.py -x
  if [ "$LAST_RC" != 0 ]; then  # the rest runs the same engine: stop here, with the failing test's trace
    step "served engine test, blocking launches" 90 served_gpu_blocking.log env CUDA_LAUNCH_BLOCKING=1 \
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_served_gpu.py -x
    exit 1
  fi
  step "paged vs static decode" 90 svs.log python3 benchmarks/serve_decode_vs_static.py --rounds 7 --steps 24 \
    --json "$OUT/serve_decode_vs_static.json"
  step "serve sweep" 200 serve_sweep.log python3 -m kvscope serve --model qwen2.5-3b --rps "${RATES:-8,24,40,56}" \
    --policy prefill-first,chunked --duration "${DUR:-6}" --prompt-len 512 --output-len 128 --max-seqs 64 \
    --slo-ttft-ms "$TTFT" --slo-tpot-ms "$TPOT" --out "$OUT/serve_sweep" --no-progress
  step "static sweep" 70 static_sweep.log python3 -m kvscope sweep --model qwen2.5-3b --seq 512 \
    --batch-sizes 1,16,32,64 --gen-tokens 64 --reps 2 --warmup 1 --out "$OUT/static_sweep.parquet"
  step "capacity" 30 capacity.log python3 -m kvscope capacity --sweep "$OUT/static_sweep.parquet" \
    --gpu-mem-gb $((MEM / 1024)) --tpot-slo-ms "$TPOT" --ttft-slo-ms "$TTFT" --prompt 512 --output 128 \
    --out "$OUT/plan.csv"
  pack serve_sweep
  ;;
B)
  nsys_serve 200
  http_front 150
  ;;
K)
  step "paged kernel benchmark" 90 paged_bench.log python3 benchmarks/paged_decode.py \
    --baseline-cu .carry/decode_attention_before_paged.cu --rounds 5 --json "$OUT/paged_decode.json"
  step "instrument overhead" 150 overhead.log python3 benchmarks/instrument_overhead.py --model qwen2.5-3b \
    --seqs 512 --rounds 24 --graphs on --configs bare,phase,default --json "$OUT/instrument_overhead.json"
  step "decode attention tests" 150 existing_gpu.log python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/kernels/test_decode_attention_gpu.py tests/kernels/test_kernels_gpu.py -x
  step "paged kernel tests" 100 paged_gpu.log python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/kernels/test_paged_kernels_gpu.py -x
  ;;
C)
  # issue 25: kvscope's loop against transformers' loops on the same shape, each under Nsight Systems (the diff and
  # its waterfall are made afterwards, on any machine: benchmarks/serve_gpu_post.sh); after the second, minute-long
  # points of the served load for Little's law (issue 23)
  for eng in kvscope transformers transformers-compiled; do
    capture_run "$eng" 150
    [ "$eng" = transformers ] && [ "${LONG:-1}" = 1 ] && serve_long "${LONG_S:-240}" "${DUR:-40}"
  done
  ;;
D)
  # what B and C measure, in one call when device time is short, the most needed first: kvscope's loop against
  # transformers' (issue 25), the HTTP front against the load in process (issue 24), the load under Nsight and
  # half-minute points for Little's law (issue 23); every log packed at the end (the device returns 8 files)
  capture_run kvscope 120
  capture_run transformers 120
  http_front 120
  nsys_serve 130
  serve_long 150 "${DUR:-30}"
  mkdir -p "$OUT/logs" && mv "$OUT"/*.log "$OUT"/gpu.txt "$OUT/logs/" 2>/dev/null; cp "$S" "$OUT/logs/"
  pack logs
  ;;
*) echo "usage: serve_gpu_calls.sh A|B|C|D|K" >&2; exit 2 ;;
esac
